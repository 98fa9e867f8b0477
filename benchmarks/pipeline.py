"""Pipeline parallelism: output tokens/s and each rank's bubble (share of its time not computing)
of a tp × pp engine with one micro-batch in flight (the baseline: stages take turns) and with one
per stage (the default), in the same run. The engine is built from a random Llama checkpoint.

    python benchmarks/pipeline.py [--pp 2] [--tp 1] [--layers 8] [--hidden 512] [--requests 16]
                                  [--input-len 64] [--output-len 64] [--comm gloo|nccl] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def make_engine(root: Path, args: argparse.Namespace) -> Path:
    from build_memory import write_tokenizer  # benchmarks/build_memory.py: a word-level test tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardserve.builder.build import BuildOptions, build_engine

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "hf")
    write_tokenizer(root / "hf")
    build_engine(root / "hf", root / "engine", BuildOptions(tp=args.tp, pp=args.pp, progress=False))
    return root / "engine"


def run(engine_dir: Path, args: argparse.Namespace, in_flight: int) -> dict[str, Any]:
    from shardserve.engine.engine import LLMEngine
    from shardserve.engine.request import SamplingParams

    engine = LLMEngine.from_model(
        engine_dir,
        cache={"num_blocks": 512, "block_size": 16},
        scheduler={"max_num_sequences": args.requests, "max_num_tokens": 4096},
        parallel={"comm": args.comm, "max_in_flight_batches": in_flight},
    )
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, 4000, (args.requests, args.input_len), generator=g).tolist()
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    try:
        start = time.perf_counter()
        for p in prompts:
            engine.add_request(p, params)
        tokens = 0
        while engine.has_unfinished_requests():
            tokens += sum(len(out.new_token_ids) for out in engine.step())
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
    stats = engine.executor.rank_stats  # type: ignore[attr-defined]
    return {"in_flight": in_flight, "tok_s": tokens / seconds, "seconds": seconds,
            "bubble": {s.rank: round(s.bubble, 3) for s in stats}}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("pp", 2), ("tp", 1), ("layers", 8), ("hidden", 512), ("requests", 16),
                          ("input-len", 64), ("output-len", 64)):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--comm", default="gloo")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = make_engine(Path(tmp), args)
        rows = [run(engine_dir, args, 1), run(engine_dir, args, args.pp)]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"tp={args.tp} pp={args.pp} comm={args.comm}, {args.requests} requests × {args.input_len}/{args.output_len}")
    print("micro-batches in flight  tok/s    seconds  bubble per rank")
    for r in rows:
        bubbles = "  ".join(f"r{k}={v:.0%}" for k, v in r["bubble"].items())
        print(f"{r['in_flight']:>23}  {r['tok_s']:>7.1f}  {r['seconds']:>7.2f}  {bubbles}")
    print(f"speed-up of {args.pp} in flight over 1: {rows[1]['tok_s'] / rows[0]['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
