"""Greedy tokens of tp × pp layouts against the first layout (tp=1), on one random checkpoint.

    python benchmarks/parallel_tokens.py --device cuda --arch llama3-8b --layouts 1x1,2x1,1x2,2x2
                                         [--num-requests 32] [--input-len 128] [--output-len 128] [--json]
    python benchmarks/parallel_tokens.py --arch llama3-8b --layouts 1x1:float32,2x1:float32,1x1,2x1

Every layout but 1x1 is an engine built with `--no-weights`: `model.load_format: dummy` makes each
rank's cut of the same random checkpoint (one seed per tensor name), so every layout holds the same
model and only the order of the bf16 reductions differs. A layout may name its dtype
(`2x1:float32`; default --dtype). Per layout it prints the share of output tokens equal to the
reference's at the same position, the requests equal throughout, the mean position of the first
difference, and how many of those first differences are near-ties: each run's token is among the
other's top 5 there (vLLM's `check_logprobs_close`), i.e. the two runs disagree on which of two
almost equally likely tokens comes first, not on the model. A layout needing more GPUs than are
visible is skipped.
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

Run = tuple[list[list[int]], list[list[Any]]]  # per request: output tokens, their TokenLogprobs


TOP = 5


def run_layout(args: argparse.Namespace, model: str, prompts: list[list[int]]) -> tuple[Run, float]:
    from shardserve.config import DeploymentConfig
    from shardserve.engine.engine import LLMEngine
    from shardserve.engine.request import SamplingParams

    engine = LLMEngine(DeploymentConfig.from_dict(engine_sections(args, model, len(prompts))))
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[Any]] = {}
    try:
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True, detokenize=False,
                                logprobs=TOP)  # fmt: skip
        ids = [engine.add_request(p, params) for p in prompts]
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                logprobs[out.request_id] = out.logprobs or []
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
    return ([tokens[i] for i in ids], [logprobs[i] for i in ids]), seconds


def compare(ref_run: Run, got_run: Run) -> dict[str, float | None]:
    (reference, ref_lp), (got, got_lp) = ref_run, got_run
    equal = sum(a == b for r, g in zip(reference, got, strict=True) for a, b in zip(r, g, strict=True))
    total = sum(len(r) for r in reference)
    firsts = [next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), len(r))
              for r, g in zip(reference, got, strict=True)]  # fmt: skip
    diverged = [(i, p) for i, p in enumerate(firsts) if p < len(reference[i])]
    ties = sum(got[i][p] in ref_lp[i][p].top and reference[i][p] in got_lp[i][p].top for i, p in diverged)
    return {
        "tokens_equal": equal / total,
        "requests_equal": sum(r == g for r, g in zip(reference, got, strict=True)) / len(reference),
        "mean_first_difference": statistics.fmean(firsts),
        "first_differences_at_near_ties": ties / len(diverged) if diverged else None,
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
    comm, dtype = args.comm, args.dtype
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
            shape, _, layout_dtype = layout.split("/")[0].partition(":")
            args.tp, args.pp = (int(x) for x in shape.split("x"))
            args.dtype = layout_dtype or dtype
            args.max_num_seqs = max(1, args.num_requests // 2) if layout.endswith("/half-batch") else 256
            args.comm = comm if args.tp * args.pp > 1 else "auto"  # a world of one runs in-process
            if gpus is not None and args.tp * args.pp > gpus:
                rows.append({"layout": layout, "skipped": f"needs {args.tp * args.pp} GPUs, {gpus} visible"})
                continue
            name = layout.replace("/", "-").replace(":", "-")
            model = source if args.tp * args.pp == 1 else weightless_engine(source, Path(tmp) / name, args)
            got, seconds = run_layout(args, str(model), prompts)
            reference = reference or got
            rows.append({"layout": layout, "seconds": round(seconds, 2), **compare(reference, got)})
    report = {"arch": args.arch, "device": torch.cuda.get_device_name() if gpus else "cpu", "gpus": gpus,
              "dtype": dtype, "requests": args.num_requests, "input_len": args.input_len,
              "output_len": args.output_len, "layouts": rows}  # fmt: skip
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['arch']} {report['dtype']} on {report['device']} ({report['gpus']} GPUs): {report['requests']} "
        f"greedy requests × {report['input_len']} in / {report['output_len']} out, against the first layout",
        f"{'layout':<18}{'seconds':>9}{'tokens equal':>14}{'requests equal':>16}{'first diff (mean)':>19}"
        f"{'diffs at near-ties':>20}",
    ]
    for r in report["layouts"]:
        if "skipped" in r:
            lines.append(f"{r['layout']:<18}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['layout']:<18}{r['seconds']:>9.2f}{r['tokens_equal']:>14.2%}{r['requests_equal']:>16.2%}"
                     f"{r['mean_first_difference']:>19.1f}{_share(r['first_differences_at_near_ties']):>20}")  # fmt: skip
    return "\n".join(lines)


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


if __name__ == "__main__":
    sys.exit(main())
