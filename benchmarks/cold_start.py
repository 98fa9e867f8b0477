"""Cold start: seconds from `shardserve generate --engine-dir ENGINE` to its first token.

    python benchmarks/cold_start.py --arch llama3-8b [--dtype bfloat16] [--workdir DIR] [--json]

Writes a random checkpoint of that shape (made on the GPU when there is one, one tensor at a
time), builds a one-rank engine with `shardserve build`, then times a fresh `shardserve generate`
process asking for one token (process start, imports, weights, KV cache, CUDA graphs, kernels).
The engine is read after being written, so its files are in the page cache, as on a host that
serves the same engine again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_random_checkpoint(root: Path, arch: str, dtype: torch.dtype) -> None:
    """A Llama of `ARCHS[arch]`'s shape in HF names, written one tensor at a time."""
    from offline import ARCHS, write_arch  # benchmarks/offline.py

    from shardserve.builder.safetensors_io import StreamingWriter, TensorSpec

    write_arch(root, arch)
    cfg = json.loads((root / "config.json").read_text())
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * hidden // cfg["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not ARCHS[arch]["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}  # fmt: skip
    specs = [TensorSpec(name, dtype, shape) for name, shape in shapes.items()]
    writer = StreamingWriter(root / "model.safetensors", specs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for spec in specs:
        if len(spec.shape) == 1:
            writer.write(spec.name, torch.ones(spec.shape, dtype=dtype))
        else:
            writer.write(spec.name, (torch.randn(spec.shape, device=device) * 0.02).to(dtype).cpu())
    writer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--workdir", help="where to write the checkpoint and engine (default: a temp dir)")
    ap.add_argument("--starts", type=int, default=1, help="time this many `generate` processes, one after another")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp())
    exe = [sys.executable, "-m", "shardserve.cli"]
    t = time.perf_counter()
    write_random_checkpoint(root / "hf", args.arch, getattr(torch, args.dtype))
    written = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([*exe, "build", "--model-dir", str(root / "hf"), "--output-dir", str(root / "engine"),
                    "--dtype", args.dtype], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    built = time.perf_counter() - t
    starts = []
    for _ in range(args.starts):
        t = time.perf_counter()
        out = subprocess.run([*exe, "generate", "--engine-dir", str(root / "engine"), "--input-text", "w1 w2 w3",
                              "--max-output-len", "1"], check=True, capture_output=True, text=True)  # fmt: skip
        starts.append(time.perf_counter() - t)
    report = {"arch": args.arch, "dtype": args.dtype, "write_s": written, "build_s": built,
              "generate_to_first_token_s": starts[0], "later_starts_s": starts[1:],
              "output": out.stdout.strip()[-200:]}  # fmt: skip
    later = f" (later starts: {', '.join(f'{s:.1f}' for s in starts[1:])} s)" if starts[1:] else ""
    print(json.dumps(report, indent=2) if args.json else
          f"{args.arch} {args.dtype}: checkpoint written in {written:.1f} s, engine built in {built:.1f} s, "
          f"`shardserve generate --engine-dir` to its first token: {starts[0]:.1f} s{later}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
