"""Loading a rank's model: random weights (`load_format: dummy`) and quantization at load time."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from shardserve.builder.build import BuildOptions, build_engine
from shardserve.builder.errors import CheckpointError
from shardserve.engine.engine import LLM
from shardserve.engine.request import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def test_dummy_weights_need_only_config_and_tokenizer(tiny_checkpoint, tmp_path: Path) -> None:
    path, _ = tiny_checkpoint("llama")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in path.iterdir():
        if not f.name.endswith((".safetensors", ".bin", ".json.index")):
            shutil.copy(f, bare / f.name)
    with pytest.raises(CheckpointError, match="no weights"):
        LLM(bare)
    llm = LLM(bare, load_format="dummy", cache={"num_blocks": 32, "block_size": 8})
    model = llm.engine.executor.worker.runner.model
    weight = model.model.layers["0"].mlp.down_proj.weight
    assert 0.01 < float(weight.std()) < 0.03  # N(0, 0.02²), made on the device
    assert bool((model.model.norm.weight == 1).all())
    out = llm.generate([[5, 6, 7, 8, 9]], GREEDY)[0]
    assert len(out.token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize("method", ["int8_weight_only", "fp8"])
def test_quantizing_at_load_equals_a_quantized_engine(tmp_path: Path, method: str) -> None:
    from tests.builder.test_build import CHAIN_PROMPTS, chain, train_cycle_model

    path = train_cycle_model(tmp_path / "m")
    build_engine(path, tmp_path / "q", BuildOptions(quantization=method, progress=False))
    prompts = [chain(start, n) for start, n in CHAIN_PROMPTS]
    at_load = LLM(path, quantization=method)
    linear = at_load.engine.executor.worker.runner.model.model.layers["0"].self_attn.qkv_proj
    assert linear.weight.dtype in (torch.int8, torch.float8_e4m3fn) and linear.weight_scale.dtype == torch.float32
    built = LLM(tmp_path / "q")
    got = [o.token_ids for o in at_load.generate(prompts, GREEDY)]
    assert got == [o.token_ids for o in built.generate(prompts, GREEDY)]


def test_engine_quantization_cannot_be_changed_at_load(tmp_path: Path) -> None:
    from tests.builder.test_build import train_cycle_model

    path = train_cycle_model(tmp_path / "m")
    build_engine(path, tmp_path / "q", BuildOptions(quantization="int8_weight_only", progress=False))
    with pytest.raises(CheckpointError, match="built with quantization int8_weight_only"):
        LLM(tmp_path / "q", quantization="fp8")


def test_fp8_kv_cache_needs_cuda(tiny_checkpoint) -> None:
    from shardserve.config import ConfigError

    path, _ = tiny_checkpoint("llama")
    with pytest.raises(ConfigError, match="kv_cache_dtype fp8 needs a CUDA device"):
        LLM(path, device="cpu", cache={"kv_cache_dtype": "fp8"})
