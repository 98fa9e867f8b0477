"""Peak memory of `shardserve build`: it streams, so peak RSS should stay within the baseline
plus about the largest tensor, not grow with the model.

    python benchmarks/build_memory.py [--hidden 2048 --layers 16 --intermediate 5504 --vocab 32000] [--tp 1] [--json]

Writes a random ~1B-parameter float16 Llama checkpoint (tensor by tensor, never whole), then measures
in fresh processes: the baseline (imports, checkpoint and tokenizer opened, rank models planned on
the meta device — everything but the tensor data) and the full build. Prints both, the largest
tensor and the target: build ≤ baseline + 1.5 × largest tensor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

BASELINE = """
import resource, sys
from shardserve.builder.build import BuildOptions, _Ranks
from shardserve.builder.checkpoint import open_checkpoint
from shardserve.builder.plan import ShardPlan
from shardserve.models.registry import parse_arch
ckpt = open_checkpoint(sys.argv[1]); ckpt.load_tokenizer(); arch = parse_arch(ckpt.config)
plan = ShardPlan.make(arch, int(sys.argv[2]), 1)
_Ranks(arch, plan, BuildOptions(tp=int(sys.argv[2])), __import__("torch").float16)
"""


def write_checkpoint(path: Path, hidden: int, layers: int, inter: int, vocab: int) -> int:
    """A random float16 Llama written one tensor at a time; returns the largest tensor's bytes."""
    from shardserve.builder.safetensors_io import StreamingWriter, TensorSpec

    heads = hidden // 128
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    specs = [TensorSpec(n, torch.float16, s) for n, s in shapes.items()]
    writer = StreamingWriter(path / "model.safetensors", specs)
    for spec in specs:
        writer.write(spec.name, (torch.randn(spec.shape) * 0.02).to(torch.float16))
    writer.close()
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
        max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="float16", bos_token_id=1, eos_token_id=2,
    )
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path)
    return max(s.nbytes for s in specs)


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(str(path))


BUILD = """
import sys
from shardserve.cli import main
main(["build", "--model-dir", sys.argv[1], "--output-dir", sys.argv[3], "--tp", sys.argv[2]])
"""
# Run `code`, then report the process's own high-water mark. VmHWM belongs to the address space
# made at exec (ru_maxrss would also count the parent's pages copied at fork).
REPORT = """
import sys
try:
    exec(compile(sys.argv.pop(1), "<bench>", "exec"))
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    open(sys.argv[-1], "w").write(hwm)
"""


def peak_rss(code: str, *args: str) -> int:
    """Peak resident set (bytes) of a fresh process running `code` with `args`."""
    with tempfile.NamedTemporaryFile() as report:
        subprocess.run([sys.executable, "-c", REPORT, code, *args, report.name], check=True, stdout=subprocess.DEVNULL)
        return int(Path(report.name).read_text()) * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "engine"
        src.mkdir()
        largest = write_checkpoint(src, args.hidden, args.layers, args.intermediate, args.vocab)
        params = (src / "model.safetensors").stat().st_size // 2
        baseline = peak_rss(BASELINE, str(src), str(args.tp))
        build = peak_rss(BUILD, str(src), str(args.tp), str(out))
    mib = 2**20
    report = {
        "parameters": params, "tp": args.tp, "largest_tensor_mib": largest / mib, "baseline_rss_mib": baseline / mib,
        "build_rss_mib": build / mib, "build_minus_baseline_mib": (build - baseline) / mib,
        "target_mib": 1.5 * largest / mib, "ok": build - baseline <= 1.5 * largest,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"checkpoint: {params / 1e9:.2f} B parameters, float16; largest tensor {largest / mib:.0f} MiB; tp={args.tp}")
        print(f"{'process':<12}{'peak RSS MiB':>14}")
        print(f"{'baseline':<12}{baseline / mib:>14.0f}")
        print(f"{'build':<12}{build / mib:>14.0f}")
        print(f"build − baseline = {(build - baseline) / mib:.0f} MiB; target ≤ 1.5 × largest = {1.5 * largest / mib:.0f} MiB"
              f" → {'ok' if report['ok'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
