"""Random checkpoints (`model.load_format: dummy`): every family's tensors by name, and engines built
with `--no-weights` whose tp × pp ranks hold the model a world of one holds (same greedy tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardserve.builder.build import BuildOptions, build_engine
from shardserve.builder.checkpoint import open_checkpoint
from shardserve.builder.dummy import checkpoint_specs, random_tensors
from shardserve.builder.errors import CheckpointError
from shardserve.builder.inspect import describe_engine
from shardserve.models.registry import parse_arch
from shardserve.workers.worker import RankLayout, load_model
from tests.builder.test_build_families import SPLIT
from tests.checkpoints import Checkpoints, run_staggered, staggered_prompts
from tests.models.families import FAMILIES
from tests.workers.ranks import SECTIONS, params

pytestmark = pytest.mark.timeout(300)
TRANSFORMERS_FAMILIES = [f for f in SPLIT if f not in ("chatglm", "baichuan")]  # remote code: not in transformers


def test_tensors_are_seeded_by_name() -> None:
    specs = [("a.weight", torch.Size([4, 3])), ("b.weight", torch.Size([4, 3])), ("n.weight", torch.Size([3]))]
    first = dict(random_tensors(specs, torch.device("cpu"), torch.float32))
    again = dict(random_tensors(specs[::-1], torch.device("cpu"), torch.float32))
    assert all(torch.equal(first[k], again[k]) for k in first)  # order does not matter, names do
    assert not torch.equal(first["a.weight"], first["b.weight"])
    assert bool((first["n.weight"] == 1).all())


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_every_parameter_of_every_family_is_made(tmp_path_factory: pytest.TempPathFactory, family: str) -> None:
    """The transformers skeleton names every tensor the loader needs: nothing left unset, no fallback."""
    source, _ = Checkpoints(tmp_path_factory, family, FAMILIES[family])(SPLIT[family])
    checkpoint = open_checkpoint(source)
    names = {name for name, _ in checkpoint.iter_tensor_specs()}
    specs = checkpoint_specs(checkpoint.config)
    assert specs is not None and names <= {name for name, _ in specs}
    arch = parse_arch(checkpoint.config)
    model = load_model(checkpoint, arch, torch.device("cpu"), torch.float32, RankLayout.single(arch), 64, "dummy")
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name


def test_remote_code_families_fill_parameters_directly(tmp_path_factory: pytest.TempPathFactory) -> None:
    source, _ = Checkpoints(tmp_path_factory, "chatglm", FAMILIES["chatglm"])(SPLIT["chatglm"])
    checkpoint = open_checkpoint(source)
    assert checkpoint_specs(checkpoint.config) is None
    arch = parse_arch(checkpoint.config)
    model = load_model(checkpoint, arch, torch.device("cpu"), torch.float32, RankLayout.single(arch), 64, "dummy")
    assert all(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if not n.endswith("bias"))


def _bare(source: Path, out: Path) -> Path:
    """config.json and tokenizer files only."""
    out.mkdir()
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and "index" not in f.name:
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_no_weights_engine_ranks_hold_the_world_of_one_model(tiny_checkpoint, tmp_path: Path) -> None:
    """tp=2 × pp=2 ranks (spawned, gloo), each making its own cut of the random checkpoint, give the
    greedy tokens of the same random checkpoint in one process."""
    from shardserve.engine.engine import LLMEngine

    source, _ = tiny_checkpoint("qwen2")  # tied head, q/k/v biases, 2 kv heads
    bare = _bare(source, tmp_path / "bare")
    info = build_engine(bare, tmp_path / "e", BuildOptions(tp=2, pp=2, weights=False, progress=False))
    assert not info.weights and not list((tmp_path / "e").glob("rank*.safetensors"))
    assert "weights: none" in describe_engine(tmp_path / "e")
    with pytest.raises(CheckpointError, match="built with --no-weights: its ranks need model.load_format: dummy"):
        LLMEngine.from_model(tmp_path / "e", **SECTIONS)
    one = LLMEngine.from_model(bare, **SECTIONS, model={"load_format": "dummy"})
    prompts = staggered_prompts(one.arch.vocab_size)
    want = run_staggered(one, prompts, params())
    ranks = LLMEngine.from_model(tmp_path / "e", **SECTIONS, model={"load_format": "dummy"}, parallel={"comm": "gloo"})
    try:
        got = run_staggered(ranks, prompts, params())
    finally:
        ranks.shutdown()
    assert got == want
    assert len({tuple(t) for t in want.values()}) > 1  # the random model does not say one thing to everyone


def test_no_weights_from_the_command_line(tiny_checkpoint, tmp_path: Path) -> None:
    """`build --no-weights`, then `doctor` joins its ranks; `generate` without dummy weights is a one-line error."""
    import subprocess
    import sys

    source, _ = tiny_checkpoint("llama")
    bare = _bare(source, tmp_path / "bare")
    cli = [sys.executable, "-m", "shardserve.cli"]
    engine = str(tmp_path / "e")
    res = subprocess.run([*cli, "build", "--model-dir", str(bare), "--output-dir", engine, "--tp", "2", "--no-weights"],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "no weights (load_format dummy)" in res.stdout
    res = subprocess.run([*cli, "doctor", "--engine-dir", engine, "--comm", "gloo"],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "all 2 ranks joined and answered" in res.stdout
    res = subprocess.run([*cli, "generate", "--model-dir", engine, "--input-text", "w1 w2"],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert res.returncode == 2
    assert "built with --no-weights: its ranks need model.load_format: dummy" in res.stderr.strip().splitlines()[-1]
