"""Offline throughput: N requests of fixed input/output length, all at once, through shardserve's
`LLMEngine` and through transformers `generate` on the same checkpoint, in the same run.

    python benchmarks/offline.py [--model PATH] [--num-requests 16] [--input-len 128] [--output-len 128]
                                 [--dtype float32|bfloat16] [--skip-baseline] [--json]

Prints output tokens/s of both and their ratio (best of --repeats alternating runs, since a shared
2-core machine is noisy). PATH defaults to the bundled SmolLM2 GGUF.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Result:
    name: str
    seconds: float
    output_tokens: int
    ttft_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def run_shardserve(model: str | None, prompts: list[list[int]], output_len: int, dtype: str) -> Result:
    from shardserve.engine.engine import LLMEngine
    from shardserve.engine.request import SamplingParams

    engine = LLMEngine.from_model(
        model, model={"dtype": dtype}, scheduler={"max_num_sequences": len(prompts), "max_num_tokens": 4096}
    )
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.add_request(prompts[0][:8], SamplingParams(max_tokens=2))  # warm-up
    while engine.has_unfinished_requests():
        engine.step()
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    tokens, first = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += len(out.new_token_ids)
            first = first if first is not None else time.perf_counter() - start
    return Result("shardserve", time.perf_counter() - start, tokens, first)


def load_transformers(model: str, dtype: str):  # noqa: ANN201 - a transformers model
    from transformers import AutoModelForCausalLM

    path = Path(model)
    torch_dtype = getattr(torch, dtype)
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)


def run_transformers(model: str, prompts: list[list[int]], output_len: int, dtype: str) -> Result:
    hf = load_transformers(model, dtype).eval()
    ids = torch.tensor(prompts)
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        warm = ids[:1, :8]
        hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, **kwargs)
        start = time.perf_counter()
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len, **kwargs
        )
        seconds = time.perf_counter() - start
    return Result("transformers", seconds, (out.shape[1] - ids.shape[1]) * ids.shape[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF dir or .gguf (default: the bundled SmolLM2)")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--skip-baseline", action="store_true", help="do not run transformers")
    ap.add_argument("--repeats", type=int, default=2, help="alternate the engines this often; report each one's best")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)

    from shardserve.demo import default_model_path

    model = args.model or str(default_model_path())
    from shardserve.builder.checkpoint import open_checkpoint

    vocab = int(open_checkpoint(model).config["vocab_size"])
    prompts = make_prompts(args.num_requests, args.input_len, vocab)
    runners = [run_shardserve] + ([] if args.skip_baseline else [run_transformers])
    runs = [[run(model, prompts, args.output_len, args.dtype) for run in runners] for _ in range(args.repeats)]
    results = [min(column, key=lambda r: r.seconds) for column in zip(*runs, strict=True)]
    report = {
        "model": model,
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "all_tokens_per_s": [[round(r.tokens_per_s, 1) for r in row] for row in runs],
        "results": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in results],
    }
    if len(results) == 2:
        report["ratio"] = results[0].tokens_per_s / results[1].tokens_per_s
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.num_requests} requests × {args.input_len} in / {args.output_len} out, {args.dtype}, {report['device']}, "
          f"best of {args.repeats} alternating runs (all: {report['all_tokens_per_s']} tok/s)")
    print(f"{'engine':<14}{'seconds':>10}{'out tokens':>12}{'tok/s':>10}")
    for r in results:
        print(f"{r.name:<14}{r.seconds:>10.2f}{r.output_tokens:>12}{r.tokens_per_s:>10.1f}")
    if "ratio" in report:
        print(f"ratio shardserve / transformers: {report['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
