"""Checkpoint reading: sharded safetensors, pytorch_model.bin, and clear errors before any weight loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardserve.builder.checkpoint import open_checkpoint
from shardserve.builder.errors import CheckpointError
from shardserve.engine.engine import LLM
from shardserve.engine.request import SamplingParams
from shardserve.models.registry import parse_arch
from tests.checkpoints import hf_greedy

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 33, 70, 101]


@pytest.fixture()
def llama_copy(tiny_checkpoint, tmp_path: Path) -> tuple[Path, object]:
    src, hf = tiny_checkpoint("llama")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst, hf


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_other_layouts_give_the_same_tokens(llama_copy, layout: str) -> None:
    path, hf = llama_copy
    (path / "model.safetensors").unlink()
    if layout == "sharded":
        hf.save_pretrained(str(path), max_shard_size="100KB")
        assert (path / "model.safetensors.index.json").is_file()
        assert len(open_checkpoint(path).weight_files) > 1
    else:
        torch.save(hf.state_dict(), path / "pytorch_model.bin")
    out = LLM(path).generate(PROMPT, GREEDY)[0]
    assert out.token_ids == hf_greedy(hf, PROMPT, GREEDY.max_tokens)


def test_missing_shard_named(llama_copy) -> None:
    path, hf = llama_copy
    (path / "model.safetensors").unlink()
    hf.save_pretrained(str(path), max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard files: {victim}"):
        open_checkpoint(path)


@pytest.mark.parametrize("cut", [4, 200, 1000])
def test_truncated_safetensors(llama_copy, cut: int) -> None:
    path, _ = llama_copy
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:cut] if cut < 100 else data[:-cut])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors"):
        open_checkpoint(path)


def test_corrupt_header(llama_copy) -> None:
    path, _ = llama_copy
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        open_checkpoint(path)


def test_missing_model_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model not found"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        open_checkpoint(tmp_path)


def test_unknown_architecture_lists_supported(llama_copy) -> None:
    path, _ = llama_copy
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    with pytest.raises(
        CheckpointError, match="unsupported architecture 'FooForCausalLM'; supported: .*LlamaForCausalLM"
    ):
        parse_arch(cfg)


def test_missing_tensor_named(llama_copy) -> None:
    path, hf = llama_copy
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors: model.norm.weight"):
        LLM(path)


TEXTS = ["hello world", "  spaced   out ", "ünïcödé and 123", "</s> inside"]


@pytest.mark.parametrize("saved_as", ["TokenizersBackend", "PreTrainedTokenizerFast"])
def test_plain_fast_tokenizer_equals_auto_tokenizer(llama_copy, saved_as: str) -> None:
    from transformers import AutoTokenizer

    path, _ = llama_copy
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "tokenizer_class": saved_as}))
    ours = open_checkpoint(path).load_tokenizer()
    auto = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert type(ours) is type(auto)
    assert (ours.bos_token_id, ours.eos_token_id, len(ours)) == (auto.bos_token_id, auto.eos_token_id, len(auto))
    for text in TEXTS:
        ids = auto.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)


LOAD_AND_LIST = """
import sys
from shardserve.builder.checkpoint import open_checkpoint
open_checkpoint(sys.argv[1]).load_tokenizer()
print("transformers.models.auto.tokenization_auto" in sys.modules)
"""


@pytest.mark.parametrize(("tokenizer_class", "auto"), [("TokenizersBackend", False), ("GPT2TokenizerFast", True)])
def test_only_other_tokenizers_import_auto_tokenizer(llama_copy, tokenizer_class: str, auto: bool) -> None:
    """The plain fast tokenizer loads without AutoTokenizer's imports (seconds of a cold start);
    any other class still goes through AutoTokenizer."""
    path, _ = llama_copy
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}))
    out = subprocess.run([sys.executable, "-c", LOAD_AND_LIST, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(auto)
