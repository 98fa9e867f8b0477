"""`shardserve build`: shard plans that join back to the source exactly, rank files holding exactly
what their rank uses, quantized engines close to the unquantized one, and clear errors first."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from shardserve.builder.build import BuildOptions, build_engine
from shardserve.builder.checkpoint import open_checkpoint
from shardserve.builder.engine_dir import rank_file
from shardserve.builder.errors import CheckpointError
from shardserve.builder.safetensors_io import iter_tensors
from shardserve.engine.engine import LLM
from shardserve.engine.request import SamplingParams
from shardserve.models.registry import parse_arch
from tests.checkpoints import assert_rank_files_split_checkpoint, make_checkpoint

pytestmark = pytest.mark.timeout(300)
OPTS = dict(progress=False)


@pytest.fixture(scope="module")
def odd_vocab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """Llama with tied embeddings and a vocab (322) that tp=4 does not divide."""
    return make_checkpoint(tmp_path_factory.mktemp("odd"), "llama", vocab_size=322, tie_word_embeddings=True)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2])
def test_rank_files_join_to_the_source(odd_vocab, tmp_path: Path, tp: int, pp: int) -> None:
    path, _ = odd_vocab
    out = tmp_path / "engine"
    info = build_engine(path, out, BuildOptions(tp=tp, pp=pp, **OPTS))
    assert (info.tp, info.pp, len(info.ranks)) == (tp, pp, tp * pp)
    assert_rank_files_split_checkpoint(path, out)


def test_engine_dir_loads_only_its_rank_file(odd_vocab, tmp_path: Path) -> None:
    path, _ = odd_vocab
    build_engine(path, tmp_path / "e", BuildOptions(**OPTS))
    shutil.copytree(path, tmp_path / "hf")
    ref = LLM(tmp_path / "hf").generate([5, 6, 7, 8], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    (tmp_path / "hf" / "model.safetensors").unlink()  # the engine must not need the source
    got = LLM(tmp_path / "e").generate([5, 6, 7, 8], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert got[0].token_ids == ref[0].token_ids


CYCLE = 64  # tokens 3 .. 66 follow each other in a fixed random order


def successors() -> torch.Tensor:
    return torch.randperm(CYCLE, generator=torch.Generator().manual_seed(0)) + 3


def chain(start: int, n: int) -> list[int]:
    """n tokens of the cycle from `start` (in distribution for the trained model below)."""
    succ, out = successors(), [start]
    while len(out) < n:
        out.append(int(succ[out[-1] - 3]))
    return out


def train_cycle_model(path: Path) -> Path:
    """A tiny Llama trained for a few seconds to continue a fixed cyclic sequence: its greedy choices
    have real margins (as a trained model's do), so quantization is judged on signal, not on the
    near-ties of random weights."""
    _, hf = make_checkpoint(path, "llama", hidden_size=128, intermediate_size=256)
    g = torch.Generator().manual_seed(1)
    successor = successors()  # token t is followed by successor[t - 3]
    hf.train()
    opt = torch.optim.Adam(hf.parameters(), lr=1e-2)
    for _ in range(60):  # loss ~6 → ~0.01
        start = torch.randint(3, 3 + CYCLE, (16, 1), generator=g)
        seq = [start]
        for _ in range(63):  # longer than any prompt + 32 generated tokens below
            seq.append(successor[seq[-1] - 3])
        ids = torch.cat(seq, dim=1)
        loss = hf(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    hf.eval()
    hf.save_pretrained(str(path))
    return path


CHAIN_PROMPTS = ((5, 2), (20, 5), (33, 9), (60, 16))  # (start, length) of in-distribution prompts


@pytest.fixture(scope="module")
def decisive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cycle_model(tmp_path_factory.mktemp("dec"))


# Stated bounds: max |logits(quantized) − logits(float)| / max |logits(float)| over a 48-token sequence.
LOGIT_BOUNDS = {"int8_weight_only": 0.02, "fp8": 0.08}


@pytest.mark.parametrize("method", ["int8_weight_only", "fp8"])
def test_quantized_engine_close_to_float(decisive: Path, tmp_path: Path, method: str) -> None:
    build_engine(decisive, tmp_path / "f", BuildOptions(**OPTS))
    build_engine(decisive, tmp_path / "q", BuildOptions(quantization=method, **OPTS))
    assert json.loads((tmp_path / "q" / "engine.json").read_text())["quantization"] == method
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = [chain(start, n) for start, n in CHAIN_PROMPTS]
    ref = LLM(tmp_path / "f").generate(prompts, params)
    got = LLM(tmp_path / "q").generate(prompts, params)
    same = sum(a == b for r, q in zip(ref, got, strict=True) for a, b in zip(r.token_ids, q.token_ids, strict=True))
    assert same / (32 * len(prompts)) >= 0.9
    assert _logits_error(tmp_path / "f", tmp_path / "q", ref[3].prompt_token_ids + ref[3].token_ids) < LOGIT_BOUNDS[method]


def _logits_error(float_dir: Path, quant_dir: Path, prompt: list[int]) -> float:
    from tests.checkpoints import engine_logits

    ref, got = engine_logits(float_dir, prompt), engine_logits(quant_dir, prompt)
    return float((got - ref).abs().max() / ref.abs().max())


def test_quantized_rank_files_hold_quantized_weights(decisive: Path, tmp_path: Path) -> None:
    build_engine(decisive, tmp_path / "q", BuildOptions(tp=2, quantization="fp8", **OPTS))
    tensors = dict(iter_tensors(tmp_path / "q" / rank_file(1)))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64,)  # split with its rows
    assert tensors["model.layers.0.self_attn.o_proj.weight_scale"].shape == (128,)  # row-parallel: whole
    assert tensors["model.norm.weight"].dtype == torch.float32


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(tp=3), "tp=3 does not divide num_attention_heads=4 .each rank takes whole attention heads"),
        (dict(tp=8), "tp=8 does not divide num_attention_heads=4"),
        (dict(pp=3), "pp=3 is more than the model's 2 layers"),
        (dict(quantization="int4"), "unknown quantization 'int4'"),
    ],
)
def test_bad_plans_fail_before_any_weight(tiny_checkpoint, tmp_path: Path, options: dict, message: str) -> None:
    path, _ = tiny_checkpoint("llama")
    with pytest.raises(CheckpointError, match=message):
        build_engine(path, tmp_path / "e", BuildOptions(**options, **OPTS))
    assert not (tmp_path / "e" / rank_file(0)).exists()


def test_kv_head_rule(tiny_checkpoint, tmp_path: Path) -> None:
    path = tmp_path / "m"
    make_checkpoint(path, "llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    with pytest.raises(CheckpointError, match="tp=2 and num_key_value_heads=3: one must divide the other"):
        build_engine(path, tmp_path / "e", BuildOptions(tp=2, **OPTS))


@pytest.mark.parametrize("breakage", ["unknown_arch", "truncated", "no_tokenizer"])
def test_bad_sources(tiny_checkpoint, tmp_path: Path, breakage: str) -> None:
    src, _ = tiny_checkpoint("llama")
    path = tmp_path / "m"
    shutil.copytree(src, path)
    if breakage == "unknown_arch":
        cfg = path / "config.json"
        cfg.write_text(cfg.read_text().replace('"LlamaForCausalLM"', '"FooForCausalLM"'))
        message = "unsupported architecture 'FooForCausalLM'; supported: .*LlamaForCausalLM"
    elif breakage == "truncated":
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        message = "truncated safetensors"
    else:
        (path / "tokenizer.json").unlink()
        (path / "tokenizer_config.json").unlink()
        message = "no tokenizer files"
    with pytest.raises(CheckpointError, match=message):
        build_engine(path, tmp_path / "e", BuildOptions(**OPTS))


@pytest.mark.parametrize("breakage", ["format_version", "missing_rank"])
def test_bad_engine_dirs(tiny_checkpoint, tmp_path: Path, breakage: str) -> None:
    src, _ = tiny_checkpoint("llama")
    engine = tmp_path / "e"
    build_engine(src, engine, BuildOptions(tp=2, **OPTS))
    if breakage == "format_version":
        meta = json.loads((engine / "engine.json").read_text())
        meta["format_version"] = 99
        (engine / "engine.json").write_text(json.dumps(meta))
        message = "engine format version 99, this shardserve reads version 1: rebuild"
    else:
        (engine / rank_file(1)).unlink()
        message = "missing rank files: rank1.safetensors"
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(engine)


def test_multi_rank_engine_refused_by_a_single_rank(tiny_checkpoint, tmp_path: Path) -> None:
    from shardserve.workers.worker import RankLayout, load_model

    src, _ = tiny_checkpoint("llama")
    build_engine(src, tmp_path / "e", BuildOptions(tp=2, **OPTS))
    checkpoint = open_checkpoint(tmp_path / "e")
    arch = parse_arch(checkpoint.config)
    layout = RankLayout.single(arch)
    with pytest.raises(CheckpointError, match="engine built for tp=2 × pp=1 = 2 ranks; this run has 1"):
        load_model(checkpoint, arch, torch.device("cpu"), torch.float32, layout, 64)


def test_cli_build_and_inspect(tiny_checkpoint, tmp_path: Path) -> None:
    src, _ = tiny_checkpoint("llama")
    engine = tmp_path / "e"
    cli = [sys.executable, "-m", "shardserve.cli"]
    res = subprocess.run(
        [*cli, "build", "--model-dir", str(src), "--output-dir", str(engine), "--tp", "2", "--pp", "2", "--dtype",
         "bfloat16", "--max-seq-len", "128"],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "tp=2 pp=2 bfloat16" in res.stdout
    res = subprocess.run([*cli, "inspect", str(engine), "--tensors"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "rank 3 (stage 1, tp rank 1)" in res.stdout and "max_seq_len=128" in res.stdout
    assert "model.layers.1.self_attn.q_proj.weight" in res.stdout and "bfloat16" in res.stdout
    res = subprocess.run(
        [*cli, "build", "--model-dir", str(src), "--output-dir", str(tmp_path / "x"), "--tp", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2 and "does not divide num_attention_heads" in res.stderr and "Traceback" not in res.stderr
