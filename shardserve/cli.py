"""`shardserve` command line: `generate` (the launch post's run.py), `build`, `inspect`, `worker`, `doctor`.

    shardserve build --model-dir HF_DIR|FILE.gguf --output-dir ENGINE_DIR [--tp N] [--pp M] [--quantization fp8]
                     [--no-weights]
    shardserve inspect ENGINE_DIR
    shardserve generate [--model-dir PATH] --input-text "How do I count to nine in French?" --max-output-len 100
    shardserve generate --model-dir PATH --batch-file prompts.txt --temperature 0.8 --seed 1
    mpiexec -n 4 shardserve worker --engine-dir ENGINE_DIR < requests.jsonl
    shardserve doctor --engine-dir ENGINE_DIR [--comm gloo|mpi|nccl]

PATH is a Hugging Face directory, a .gguf file or an engine directory (default: the bundled SmolLM2);
`generate` on a tp × pp engine starts its other ranks itself. Problems with the model or the
request are one line on stderr and exit status 2; a rank that fails, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from shardserve.builder.errors import CheckpointError
from shardserve.comm.base import CommError
from shardserve.config import ConfigError, DeploymentConfig
from shardserve.engine.request import InvalidRequestError, SamplingParams
from shardserve.workers.doctor import add_doctor_parser
from shardserve.workers.entry import add_worker_parser


def _generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate completions offline (in-flight batched)")
    p.add_argument(
        "--model-dir", "--engine-dir", dest="model_dir",
        help="HF checkpoint dir, .gguf file or engine dir (default: bundled SmolLM2)",
    )  # fmt: skip
    p.add_argument("--tokenizer-dir", help="tokenizer dir if not beside the model")
    p.add_argument("--config", help="deployment YAML (its model/cache/scheduler sections)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input-text", action="append", help="a prompt (repeatable)")
    src.add_argument("--batch-file", help="a file with one prompt per line, run as one in-flight batch")
    p.add_argument("--max-output-len", type=int, default=100)
    p.add_argument("--min-output-len", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-words", nargs="+", default=[])
    p.add_argument("--bad-words", nargs="+", default=[])
    p.add_argument("--end-id", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None)
    p.add_argument("--comm", choices=["auto", "gloo", "nccl"], default=None, help="collectives of a multi-rank engine")
    p.set_defaults(func=cmd_generate)


def _build_parser(sub: Any) -> None:
    p = sub.add_parser("build", help="build an engine directory: one safetensors file per rank")
    p.add_argument("--model-dir", required=True, help="HF checkpoint dir or .gguf file")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    p.add_argument("--quantization", choices=["none", "fp8", "int8_weight_only"], default="none")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--no-weights", dest="weights", action="store_false",
                   help="engine.json and tokenizer only: ranks make random weights (load_format dummy)")  # fmt: skip
    p.set_defaults(func=cmd_build)
    q = sub.add_parser("inspect", help="show an engine's config and per-rank tensors")
    q.add_argument("engine_dir")
    q.add_argument("--tensors", action="store_true", help="list every tensor of every rank")
    q.set_defaults(func=cmd_inspect)


def cmd_build(args: argparse.Namespace) -> int:
    from shardserve.builder.build import BuildOptions, build_engine

    options = BuildOptions(
        tp=args.tp,
        pp=args.pp,
        dtype=args.dtype,
        quantization=args.quantization,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        weights=args.weights,
    )
    info = build_engine(args.model_dir, args.output_dir, options)
    size = sum(r["bytes"] for r in info.ranks)
    files = "no weights (load_format dummy)"
    if info.weights:
        files = f"{len(info.ranks)} rank files, {size / 2**20:.1f} MiB"
    print(
        f"built {info.architecture} engine: tp={info.tp} pp={info.pp} {info.dtype} "
        f"quantization={info.quantization}, {files} → {args.output_dir}"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from shardserve.builder.inspect import describe_engine

    print(describe_engine(Path(args.engine_dir), list_tensors=args.tensors))
    return 0


def _config(args: argparse.Namespace) -> DeploymentConfig:
    base = DeploymentConfig.from_yaml(args.config) if args.config else DeploymentConfig()
    data = base.model_dump(mode="json")
    for key, value in (("path", args.model_dir), ("tokenizer", args.tokenizer_dir), ("dtype", args.dtype)):
        if value is not None:
            data["model"][key] = value
    if getattr(args, "comm", None) is not None:
        data["parallel"]["comm"] = args.comm
    return DeploymentConfig.from_dict(data)


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.batch_file:
        path = Path(args.batch_file)
        if not path.is_file():
            raise InvalidRequestError(f"batch file not found: {path}")
        prompts = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise InvalidRequestError(f"batch file {path} has no prompts")
        return prompts
    return args.input_text or ["How do I count to nine in French?"]


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_output_len,
        min_tokens=args.min_output_len,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_words=tuple(args.stop_words),
        bad_words=tuple(args.bad_words),
        end_id=args.end_id,
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from shardserve.engine.engine import LLM

    params = _params(args)
    prompts = _prompts(args)
    llm = LLM.from_config(_config(args))
    try:
        if args.chat:
            prompts = [apply_chat_template(llm.engine.tokenizer, p) for p in prompts]
        for i, out in enumerate(llm.generate(prompts, params)):
            print(f'Input [Text {i}]: "{args.input_text[i] if args.input_text else prompts[i]}"')
            print(f'Output [Text {i}]: "{out.text}"')
    finally:
        llm.engine.shutdown()
    stats = getattr(llm.engine.executor, "rank_stats", None)
    if stats and len(stats) > 1:
        from shardserve.workers.group import describe_stats

        print(describe_stats(stats), file=sys.stderr)
    return 0


def apply_chat_template(tokenizer: Any, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("--chat: this model's tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardserve", description="distributed LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _build_parser(sub)
    add_worker_parser(sub)
    add_doctor_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, InvalidRequestError, ConfigError) as exc:
        print(f"shardserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CommError as exc:
        # A failed world can leave collectives posted that would block interpreter exit: leave now.
        print(f"shardserve {args.command}: error: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
