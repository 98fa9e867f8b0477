"""Greedy tokens of tp × pp layouts against the first layout (tp=1), on one random checkpoint.

    python benchmarks/parallel_tokens.py --device cuda --arch llama3-8b --layouts 1x1,2x1,1x2,2x2
                                         [--num-requests 32] [--input-len 128] [--output-len 128] [--json]

Every layout but 1x1 is an engine built with `--no-weights`: `model.load_format: dummy` makes each
rank's cut of the same random checkpoint (one seed per tensor name), so every layout holds the same
model and only the order of the bf16 reductions differs. Per layout it prints the share of output
tokens equal to the reference's at the same position, the requests equal throughout, and the
mean position of the first difference. A layout needing more GPUs than are visible is skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from offline import ARCHS, engine_sections, make_prompts, weightless_engine, write_arch  # benchmarks/offline.py


def run_layout(args: argparse.Namespace, model: str, prompts: list[list[int]]) -> tuple[list[list[int]], float]:
    from shardserve.config import DeploymentConfig
    from shardserve.engine.engine import LLMEngine
    from shardserve.engine.request import SamplingParams

    engine = LLMEngine(DeploymentConfig.from_dict(engine_sections(args, model, len(prompts))))
    tokens: dict[str, list[int]] = {}
    try:
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True, detokenize=False)
        ids = [engine.add_request(p, params) for p in prompts]
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
    return [tokens[i] for i in ids], seconds


def compare(reference: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    equal = sum(a == b for r, g in zip(reference, got, strict=True) for a, b in zip(r, g, strict=True))
    total = sum(len(r) for r in reference)
    firsts = [next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), len(r))
              for r, g in zip(reference, got, strict=True)]  # fmt: skip
    return {
        "tokens_equal": equal / total,
        "requests_equal": sum(r == g for r, g in zip(reference, got, strict=True)) / len(reference),
        "mean_first_difference": statistics.fmean(firsts),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--layouts", default="1x1,2x1,1x2,2x2", help="tp x pp, comma separated; the first is the reference")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--comm", default="auto", choices=["auto", "nccl", "gloo"])
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--noise-floor", action="store_true",
                    help="also rerun the first layout with half the batch: bf16 results change with the batch (GEMM shapes)")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.quantization, args.kv_cache_dtype, args.max_num_seqs, args.max_num_tokens = "none", "auto", 256, 8192
    comm = args.comm
    gpus = torch.cuda.device_count() if args.device == "cuda" else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        source = write_arch(Path(tmp) / args.arch, args.arch)
        vocab = int(json.loads((source / "config.json").read_text())["vocab_size"])
        prompts = make_prompts(args.num_requests, args.input_len, vocab)
        reference: list[list[int]] | None = None
        layouts = args.layouts.split(",")
        if args.noise_floor:
            layouts.insert(1, layouts[0] + "/half-batch")
        for layout in layouts:
            args.tp, args.pp = (int(x) for x in layout.split("/")[0].split("x"))
            args.max_num_seqs = max(1, args.num_requests // 2) if layout.endswith("/half-batch") else 256
            args.comm = comm if args.tp * args.pp > 1 else "auto"  # a world of one runs in-process
            if gpus is not None and args.tp * args.pp > gpus:
                rows.append({"layout": layout, "skipped": f"needs {args.tp * args.pp} GPUs, {gpus} visible"})
                continue
            model = source if args.tp * args.pp == 1 else weightless_engine(source, Path(tmp) / layout.replace("/", "-"), args)
            got, seconds = run_layout(args, str(model), prompts)
            reference = reference or got
            rows.append({"layout": layout, "seconds": round(seconds, 2), **compare(reference, got)})
    report = {"arch": args.arch, "device": torch.cuda.get_device_name() if gpus else "cpu", "gpus": gpus,
              "dtype": args.dtype, "requests": args.num_requests, "input_len": args.input_len,
              "output_len": args.output_len, "layouts": rows}  # fmt: skip
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['arch']} {report['dtype']} on {report['device']} ({report['gpus']} GPUs): {report['requests']} "
        f"greedy requests × {report['input_len']} in / {report['output_len']} out, against the first layout",
        f"{'tp x pp':<18}{'seconds':>9}{'tokens equal':>14}{'requests equal':>16}{'first diff (mean)':>19}",
    ]
    for r in report["layouts"]:
        if "skipped" in r:
            lines.append(f"{r['layout']:<18}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['layout']:<18}{r['seconds']:>9.2f}{r['tokens_equal']:>14.2%}{r['requests_equal']:>16.2%}"
                     f"{r['mean_first_difference']:>19.1f}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
