"""Paged attention (Triton, `workers/triton_attention.py`) against FlashAttention through torch's
`scaled_dot_product_attention` on the same shapes without paging, in the same run (CUDA).

    python benchmarks/attention.py [--heads 32] [--kv-heads 8] [--head-dim 128] [--kv-cache-dtype fp8]
                                   [--case decode=1024,1,192 ...] [--sweep] [--json]

Cases: a prefill step of 4 sequences × 2048 new tokens (causal, empty cache: what a 2048-token
prompt costs), decode steps of 256 sequences × 256 cached tokens and 64 × 2048. Prints ms per call
and TFLOP/s (causal prefill counts half the score matrix) of SDPA's FlashAttention and cuDNN
kernels on contiguous keys, the paged kernel, and for whole prompts the whole-prompt kernel (what
the engine runs for a prompt with no cached prefix). `--sweep` times every tile launch
(rows per prefill tile, key elements per block, warps, stages) for the prefill case and the
decode cases, to choose `ROWS_PREFILL`, `PREFILL_LAUNCH` and `DECODE_LAUNCH`.
`--kv-cache-dtype fp8` gives the paged kernel an fp8 (e4m3) cache (SDPA keeps bf16);
`--case NAME=SEQS,Q_LEN,CONTEXT` replaces the default cases.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from shardserve.workers import triton_attention as ta
from shardserve.workers.attention import SeqSpan, kv_cache_shape

PAGE = 64  # the engine's default block size
CASES = {"prefill 4×2048": (4, 2048, 2048), "decode 256×256": (256, 1, 256), "decode 64×2048": (64, 1, 2048)}


def make_case(seqs: int, q_len: int, context: int, args: argparse.Namespace) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(0)
    blocks_per_seq = -(-context // PAGE)
    shape = kv_cache_shape(seqs * blocks_per_seq + 1, PAGE, args.kv_heads, args.head_dim)
    cache = torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(seqs * blocks_per_seq, generator=g, device="cuda").tolist()  # scattered blocks
    spans = [
        SeqSpan(i * q_len, q_len, context, perm[i * blocks_per_seq : (i + 1) * blocks_per_seq]) for i in range(seqs)
    ]
    q = torch.randn(seqs * q_len, args.heads, args.head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    # the same keys and values, contiguous per sequence, for SDPA: [seqs, kv_heads, context, d]
    if args.kv_cache_dtype == "fp8":
        cache = cache.to(torch.float8_e4m3fn)
    table = torch.tensor([s.block_table for s in spans], device="cuda")
    k = cache[0][table].transpose(1, 2).flatten(2, 3)[:, :, :context].to(torch.bfloat16).contiguous()
    v = cache[1][table].transpose(1, 2).flatten(2, 3)[:, :, :context].to(torch.bfloat16).contiguous()
    return {"spans": spans, "q": q, "cache": cache, "k": k, "v": v, "seqs": seqs, "q_len": q_len, "context": context}


def run_triton(case: dict[str, Any], args: argparse.Namespace) -> Any:
    backend = ta.TritonAttentionBackend(args.heads, args.kv_heads)
    meta = backend.build_metadata(case["spans"], PAGE, torch.device("cuda"))
    out = torch.empty_like(case["q"])
    cache = case["cache"]
    group = args.heads // args.kv_heads
    return lambda: ta.paged_attention(case["q"], out, cache, meta, args.head_dim**-0.5, group)


def run_prompts(case: dict[str, Any], args: argparse.Namespace) -> Any:
    """The whole-prompt kernel over the case's prompts (their keys and values as the step's own rows)."""
    k, v = (case[x].transpose(1, 2).reshape(-1, args.kv_heads, args.head_dim) for x in ("k", "v"))
    tiles = ta.prompt_tiles(case["spans"], ta.PROMPT_LAUNCH[0])
    tiles_dev = torch.tensor(tiles, dtype=torch.int32, device="cuda").view(3, -1)
    out = torch.empty_like(case["q"])
    group = args.heads // args.kv_heads
    return lambda: ta.prompt_attention(case["q"], k, v, out, tiles_dev, args.head_dim**-0.5, group)


def run_sdpa(case: dict[str, Any], args: argparse.Namespace, backend: SDPBackend) -> Any:
    q = case["q"].view(case["seqs"], case["q_len"], args.heads, args.head_dim).transpose(1, 2)
    causal = case["q_len"] > 1
    fn = torch.nn.functional.scaled_dot_product_attention

    def call() -> None:
        with sdpa_kernel([backend]):
            fn(q, case["k"], case["v"], is_causal=causal, enable_gqa=True)

    return call


def timed(fn: Any, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def flops(case: dict[str, Any], args: argparse.Namespace) -> float:
    q_len, ctx = case["q_len"], case["context"]
    pairs = q_len * (q_len + 1) / 2 if q_len > 1 else ctx  # causal: each query sees its prefix
    return 4 * case["seqs"] * args.heads * pairs * args.head_dim


def row(name: str, what: str, ms: float, case: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {"case": name, "kernel": what, "ms": round(ms, 4), "tflops": round(flops(case, args) / ms / 1e9, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--case", action="append", default=[], help="NAME=SEQS,Q_LEN,CONTEXT (repeatable)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    cases = {c.split("=")[0]: tuple(int(x) for x in c.split("=")[1].split(",")) for c in args.case} or CASES
    for name, shape in cases.items():
        case = make_case(*shape, args)
        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                rows.append(row(name, f"sdpa ({label}, unpaged)", timed(run_sdpa(case, args, backend)), case, args))
            except RuntimeError as exc:  # a backend that does not take the shape
                print(f"{name}: sdpa {label}: {exc}", file=sys.stderr)
        rows.append(row(name, "triton paged kernel", timed(run_triton(case, args)), case, args))
        if case["q_len"] == case["context"] > 1:  # whole prompts: what the engine runs for them
            rows.append(row(name, "triton whole-prompt kernel", timed(run_prompts(case, args)), case, args))
        if args.sweep:
            rows += sweep(name, case, args)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        heads = f"{args.heads} heads / {args.kv_heads} kv heads × {args.head_dim}"
        cache = "fp8 cache" if args.kv_cache_dtype == "fp8" else "bf16 cache"
        print(f"{report['device']}, torch {report['torch']}, bf16, {cache}, {heads}")
        print(f"{'case':<16}{'kernel':<44}{'ms':>9}{'TFLOP/s':>9}")
        for r in rows:
            print(f"{r['case']:<16}{r['kernel']:<44}{r['ms']:>9.3f}{r['tflops']:>9.1f}")
    return 0


def sweep(name: str, case: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    prefill = case["q_len"] > 1
    saved = ta.ROWS_PREFILL, ta.PREFILL_LAUNCH, ta.DECODE_LAUNCH
    rows_options = (64, 128) if prefill else (ta.ROWS_DECODE,)
    out = []
    try:
        for rows, elements, warps, stages in itertools.product(rows_options, (4096, 8192, 16384), (4, 8), (2, 3, 4)):
            ta.ROWS_PREFILL = rows
            launch = (elements, warps, stages)
            if prefill:
                ta.PREFILL_LAUNCH = launch
            else:
                ta.DECODE_LAUNCH = launch
            try:
                ms = timed(run_triton(case, args))
            except Exception as exc:  # noqa: BLE001 - a launch that does not fit (shared memory) is skipped
                print(f"{name} rows {rows} {launch}: {type(exc).__name__}", file=sys.stderr)
                continue
            out.append(row(name, f"rows {rows}, elements {elements}, warps {warps}, stages {stages}", ms, case, args))
    finally:
        ta.ROWS_PREFILL, ta.PREFILL_LAUNCH, ta.DECODE_LAUNCH = saved
    return out


if __name__ == "__main__":
    sys.exit(main())
