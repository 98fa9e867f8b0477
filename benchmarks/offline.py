"""Offline throughput: N requests of fixed input/output length, all at once, through shardserve's
`LLMEngine` and through transformers `generate` on the same model, in the same run.

    python benchmarks/offline.py [--model PATH] [--num-requests 16] [--input-len 128] [--output-len 128]
                                 [--dtype float32|bfloat16] [--skip-baseline] [--json]
    python benchmarks/offline.py --device cuda --arch llama3-8b [--quantization fp8] [--num-requests 1024]
                                 [--baseline-batch 256] [--decode-step] [--json]
    python benchmarks/offline.py --device cuda --arch llama3-70b --tp 4 [--pp 1] --skip-baseline

CPU (default): PATH defaults to the bundled SmolLM2 GGUF; prints output tokens/s of both and their
ratio (best of --repeats alternating runs, since a shared 2-core machine is noisy).

`--arch`: a Llama of that shape with random weights made on the device (no download, no disk:
`model.load_format: dummy`); the transformers baseline is the same config initialised on the
device, run first and freed. Besides tokens/s it prints mean TTFT, mean time per output token
and, with --decode-step, the batch-1 decode step against the memory roofline (weight bytes over
the device-to-device copy bandwidth measured in the same run).

`--tp N --pp M` (with --arch): an engine built with `--no-weights` for that layout; its ranks (one
GPU each, spawned by the engine, NCCL) make their cuts of the same random checkpoint. The
transformers baseline runs on one device, so such runs compare against published figures instead
(--skip-baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# Published shapes (config.json of each model); weights are random.
ARCHS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, tie_word_embeddings=True),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, tie_word_embeddings=False, vocab_size=4096),
}  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip


@dataclass
class Result:
    name: str
    seconds: float
    output_tokens: int
    ttft_s: float | None = None  # mean over requests, from the start of the run
    tpot_s: float | None = None  # mean over requests: (last token − first token) / (tokens − 1)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def write_arch(root: Path, name: str) -> Path:
    """config.json of a Llama with `ARCHS[name]`'s shape, and a small word-level tokenizer."""
    from build_memory import write_tokenizer  # benchmarks/build_memory.py

    shape = dict(ARCHS[name])
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=shape.pop("vocab_size", 128256),
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
        torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, **shape,
    )  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    write_tokenizer(root)
    return root


def weightless_engine(source: Path, out: Path, args: argparse.Namespace) -> Path:
    """An engine of `source`'s shape for `args.tp` × `args.pp` ranks, without weights (load_format dummy)."""
    from shardserve.builder.build import BuildOptions, build_engine

    build_engine(source, out, BuildOptions(tp=args.tp, pp=args.pp, dtype=args.dtype, weights=False, progress=False))
    return out


def engine_sections(args: argparse.Namespace, model: str, num_seqs: int) -> dict[str, dict[str, Any]]:
    model_section: dict[str, Any] = {"path": model, "dtype": args.dtype, "device": args.device}
    if args.arch:
        model_section |= {"load_format": "dummy", "max_model_len": args.input_len + args.output_len + 8}
    if args.quantization != "none":
        model_section["quantization"] = args.quantization
    if args.eager:
        model_section["cuda_graphs"] = False
    model_section["cuda_graph_max_batch"] = min(num_seqs, args.max_num_seqs)
    return {
        "model": model_section,
        "parallel": {"comm": args.comm},
        "cache": {"kv_cache_dtype": args.kv_cache_dtype}
        | ({"kv_cache_free_gpu_mem_fraction": args.kv_cache_fraction} if args.kv_cache_fraction else {}),
        "scheduler": {
            "max_num_sequences": min(num_seqs, args.max_num_seqs),
            "max_num_tokens": args.max_num_tokens,
            "policy": args.policy,
        },
    }


def run_shardserve(args: argparse.Namespace, model: str, prompts: list[list[int]], output_len: int) -> Result:
    from shardserve.config import DeploymentConfig
    from shardserve.engine.engine import LLMEngine
    from shardserve.engine.request import SamplingParams

    engine = LLMEngine(DeploymentConfig.from_dict(engine_sections(args, model, len(prompts))))
    breakdown = instrument(engine) if args.breakdown else None
    try:
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, detokenize=args.detokenize)
        engine.add_request(prompts[0][:8], SamplingParams(max_tokens=2))  # warm-up
        while engine.has_unfinished_requests():
            engine.step()
        _sync()
        start = time.perf_counter()
        for p in prompts:
            engine.add_request(p, params)
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        counts: dict[str, int] = {}
        steps = 0
        while engine.has_unfinished_requests():
            with profiled(args, steps, engine):
                outs = engine.step()
            steps += 1
            now = time.perf_counter() - start
            for out in outs:
                if out.new_token_ids:
                    first.setdefault(out.request_id, now)
                    last[out.request_id] = now
                    counts[out.request_id] = counts.get(out.request_id, 0) + len(out.new_token_ids)
        seconds = time.perf_counter() - start
        stats = engine.scheduler.stats  # the warm-up request included
        args.scheduler_stats = {"steps": stats.num_steps, "preemptions": stats.num_preemptions,
                                "run_ahead_tokens": stats.num_run_ahead}  # fmt: skip
    finally:
        engine.shutdown()
        del engine
        _free()
    if breakdown is not None:
        args.breakdown_ms = {k: round(v / steps * 1e3, 3) for k, v in breakdown.items()} | {"steps": steps}
    tpots = [(last[r] - first[r]) / (counts[r] - 1) for r in first if counts[r] > 1]
    return Result(
        "shardserve", seconds, sum(counts.values()), statistics.fmean(first.values()),
        statistics.fmean(tpots) if tpots else None,
    )  # fmt: skip


def instrument(engine: Any) -> dict[str, float]:
    """Seconds spent in each part of a step (leader and a local rank), summed over the run."""
    totals: dict[str, float] = {}
    runner = engine.executor.worker.runner
    parts = [(engine.scheduler, "schedule"), (engine.executor, "run"), (runner, "_prepare"), (runner, "_sample"),
             (engine.scheduler, "update"), (engine, "_on_token")]  # fmt: skip
    if runner.graphs is not None:
        parts.append((runner.graphs, "run"))
    for obj, name in parts:
        key = f"{type(obj).__name__}.{name}"
        inner = getattr(obj, name)

        def timed(*a: Any, _inner: Any = inner, _key: str = key, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                totals[_key] = totals.get(_key, 0.0) + time.perf_counter() - t

        setattr(obj, name, timed)
    return totals


@contextlib.contextmanager
def profiled(args: argparse.Namespace, step: int, engine: Any) -> Iterator[None]:
    """With --profile FILE: --profile-steps steps (default 10) from --profile-from (default 40) under
    the torch profiler, its table to FILE (the run's last step closes it if that comes first)."""
    first, last = args.profile_from, args.profile_from + args.profile_steps - 1
    if not args.profile or not first <= step <= last:
        yield
        return
    global _PROFILER, _PROFILED_FROM
    if step == first:
        _PROFILER = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        )
        _PROFILER.__enter__()
        _PROFILED_FROM = time.perf_counter()
    yield
    if step == last or not engine.has_unfinished_requests():
        _sync()
        wall = time.perf_counter() - _PROFILED_FROM
        _PROFILER.__exit__(None, None, None)
        table = _PROFILER.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60)
        Path(args.profile).write_text(f"steps {first}-{step}, wall {wall * 1e3:.1f} ms (profiled)\n{table}")
        _PROFILER = None


_PROFILER: Any = None
_PROFILED_FROM = 0.0


def decode_step(args: argparse.Namespace, model: str, vocab: int) -> dict[str, float]:
    """Batch 1: median time between output tokens (host work included) against the roofline."""
    from shardserve.config import DeploymentConfig
    from shardserve.engine.engine import LLMEngine
    from shardserve.engine.request import SamplingParams

    engine = LLMEngine(DeploymentConfig.from_dict(engine_sections(args, model, 1)))
    try:
        weights = sum(p.numel() * p.element_size() for p in engine.executor.worker.runner.model.parameters())  # type: ignore[attr-defined]
        embed = engine.executor.worker.runner.model.model.embed_tokens.weight  # type: ignore[attr-defined]
        if not ARCHS[args.arch]["tie_word_embeddings"]:
            weights -= embed.numel() * embed.element_size()  # a step reads one row of it
        engine.add_request(make_prompts(1, args.input_len, vocab)[0], SamplingParams(max_tokens=64, ignore_eos=True))
        arrivals = []  # when each output token reached the caller
        while engine.has_unfinished_requests():
            if any(out.new_token_ids for out in engine.step()):
                arrivals.append(time.perf_counter())
    finally:
        engine.shutdown()
        del engine
        _free()
    step = statistics.median(b - a for a, b in zip(arrivals[2:], arrivals[3:], strict=False))
    bandwidth = copy_bandwidth()
    roofline = weights / bandwidth
    return {"step_ms": step * 1e3, "weight_gb": weights / 1e9, "copy_gb_s": bandwidth / 1e9,
            "roofline_ms": roofline * 1e3, "vs_roofline": step / roofline, "achieved_gb_s": weights / step / 1e9}  # fmt: skip


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), best of 10."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        _sync()
        t = time.perf_counter()
        dst.copy_(src)
        _sync()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def load_transformers(args: argparse.Namespace, model: str):  # noqa: ANN201 - a transformers model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model)
    dtype = getattr(torch, args.dtype)
    if args.arch:  # random weights made on the device, like ours
        with torch.device(args.device):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=dtype)
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(args.device)


def run_transformers(args: argparse.Namespace, model: str, prompts: list[list[int]], output_len: int) -> Result:
    hf = load_transformers(args, model).eval()
    ids = torch.tensor(prompts[: args.baseline_batch or None], device=args.device)
    kwargs = dict(do_sample=False, pad_token_id=0)
    try:
        with torch.inference_mode():
            warm = ids[:1, :8]
            hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, **kwargs)
            _sync()
            start = time.perf_counter()
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len, **kwargs
            )
            _sync()
            seconds = time.perf_counter() - start
    finally:
        del hf
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return Result("transformers", seconds, (out.shape[1] - ids.shape[1]) * ids.shape[0])


def _free() -> None:
    """Give an engine's GPU memory back before the next one starts (closures hold cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF dir or .gguf (default: the bundled SmolLM2)")
    ap.add_argument("--arch", choices=sorted(ARCHS), help="random weights of this shape instead of --model")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quantization", default="none", choices=["none", "fp8", "int8_weight_only"])
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (with --arch)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (with --arch)")
    ap.add_argument("--comm", default="auto", choices=["auto", "nccl", "gloo", "mpi"], help="parallel.comm")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on CPU, bfloat16 on CUDA")  # fmt: skip
    ap.add_argument("--max-num-seqs", type=int, default=256, help="scheduler.max_num_sequences")
    ap.add_argument("--max-num-tokens", type=int, default=4096, help="scheduler.max_num_tokens")
    ap.add_argument(
        "--kv-cache-fraction", type=float, help="cache.kv_cache_free_gpu_mem_fraction (default: the config's)"
    )
    ap.add_argument("--policy", default="max_utilization", choices=["max_utilization", "guaranteed_completion"],
                    help="scheduler.policy")  # fmt: skip
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--detokenize", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--breakdown", action="store_true", help="report ms per step in each part of the step")
    ap.add_argument("--profile", help="write a torch profiler table of --profile-steps steps to this file")
    ap.add_argument("--profile-from", type=int, default=40, help="the first profiled step")
    ap.add_argument("--profile-steps", type=int, default=10, help="how many steps to profile")
    ap.add_argument("--decode-step", action="store_true", help="also time the batch-1 decode step (CUDA)")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run transformers")
    ap.add_argument("--baseline-batch", type=int, default=0, help="transformers runs only the first N (0: all)")
    ap.add_argument("--repeats", type=int, default=None, help="alternate the engines this often (default 2 on CPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.repeats = args.repeats or (2 if args.device == "cpu" else 1)
    if args.tp * args.pp > 1 and not args.arch:
        ap.error("--tp/--pp need --arch (build a real checkpoint's engine with `shardserve build --tp`)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.arch:
            model = str(write_arch(Path(tmp) / args.arch, args.arch))
            if args.tp * args.pp > 1:
                model = str(weightless_engine(Path(model), Path(tmp) / "engine", args))
        else:
            from shardserve.demo import default_model_path

            model = args.model or str(default_model_path())
        report = run_all(args, model)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def run_all(args: argparse.Namespace, model: str) -> dict[str, Any]:
    from shardserve.builder.checkpoint import open_checkpoint

    vocab = int(open_checkpoint(model, require_weights=not args.arch).config["vocab_size"])
    prompts = make_prompts(args.num_requests, args.input_len, vocab)
    runners = ([] if args.skip_baseline else [run_transformers]) + [run_shardserve]  # baseline first: it frees
    runs = [[run(args, model, prompts, args.output_len) for run in runners] for _ in range(args.repeats)]
    results = [min(column, key=lambda r: r.seconds) for column in zip(*runs, strict=True)]
    report: dict[str, Any] = {
        "model": args.arch or model,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **{k: getattr(args, k) for k in ("num_requests", "input_len", "output_len", "dtype", "quantization")},
        "tp": args.tp,
        "pp": args.pp,
        "kv_cache_dtype": args.kv_cache_dtype,
        **{k: getattr(args, k) for k in ("max_num_seqs", "max_num_tokens", "eager", "detokenize", "repeats")},
        "baseline_batch": args.baseline_batch or args.num_requests,
        "all_tokens_per_s": [[round(r.tokens_per_s, 1) for r in row] for row in runs],
        "results": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in results],
    }
    if len(results) == 2:
        report["ratio"] = results[1].tokens_per_s / results[0].tokens_per_s
    if hasattr(args, "scheduler_stats"):
        report["scheduler"] = args.scheduler_stats
    if args.breakdown:
        report["breakdown_ms_per_step"] = args.breakdown_ms
    if args.decode_step and args.arch and args.device == "cuda" and args.tp * args.pp == 1:
        report["decode_step"] = decode_step(args, model, vocab)
    return report


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}: {report['num_requests']} requests × {report['input_len']} in / {report['output_len']} out, "
        f"{report['dtype']}, quantization {report['quantization']}, tp={report['tp']} pp={report['pp']}, "
        f"{report['device']} "
        f"(transformers: first {report['baseline_batch']}; all runs {report['all_tokens_per_s']} tok/s)",
        *(
            ["scheduler: " + ", ".join(f"{k} {v}" for k, v in report["scheduler"].items())]
            if "scheduler" in report
            else []
        ),
        f"{'engine':<14}{'seconds':>10}{'out tokens':>12}{'tok/s':>10}{'TTFT ms':>10}{'TPOT ms':>10}",
    ]
    for r in report["results"]:
        ttft = f"{r['ttft_s'] * 1e3:.1f}" if r["ttft_s"] is not None else "-"
        tpot = f"{r['tpot_s'] * 1e3:.2f}" if r["tpot_s"] is not None else "-"
        lines.append(
            f"{r['name']:<14}{r['seconds']:>10.2f}{r['output_tokens']:>12}{r['tokens_per_s']:>10.1f}{ttft:>10}{tpot:>10}"
        )
    if "ratio" in report:
        lines.append(f"ratio shardserve / transformers: {report['ratio']:.2f}")
    if "breakdown_ms_per_step" in report:
        lines.append("ms per step: " + ", ".join(f"{k} {v}" for k, v in report["breakdown_ms_per_step"].items()))
    if "decode_step" in report:
        d = report["decode_step"]
        lines.append(
            f"batch-1 decode step {d['step_ms']:.2f} ms; roofline {d['roofline_ms']:.2f} ms "
            f"({d['weight_gb']:.2f} GB at {d['copy_gb_s']:.0f} GB/s copy) → {d['vs_roofline']:.2f}× roofline, "
            f"{d['achieved_gb_s']:.0f} GB/s achieved"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
