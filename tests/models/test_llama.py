"""The Llama family (Llama, Llama-3 rope scaling, Mistral sliding window, Qwen2 qkv bias, tied
embeddings) against transformers on the same tiny checkpoints: greedy tokens identical with
requests arriving at different steps; logits within 1e-4 relative; a 2-stage pipeline split holds
every checkpoint tensor exactly once. A later pipeline stage takes its layers' own sliding windows."""

from __future__ import annotations

import pytest
import torch

from shardserve.models.arch import ArchConfig
from shardserve.models.base import Stage
from shardserve.models.llama import LlamaForCausalLM
from tests.checkpoints import (
    BASE,
    LLAMA_RECIPES,
)

pytestmark = pytest.mark.timeout(300)
RECIPES = LLAMA_RECIPES  # llama, llama3 (rope scaling), mistral (sliding window), qwen2 (bias, tied)


def test_stage_layers_take_their_global_sliding_window() -> None:
    layer_types = ["full_attention", "sliding_attention"]
    arch = ArchConfig.from_hf({**BASE, "model_type": "mistral", "sliding_window": 24, "layer_types": layer_types})
    with torch.device("meta"):
        stages = [LlamaForCausalLM(arch, stage=Stage(i, i + 1, 2)) for i in range(2)]
    attns = [layer.self_attn for s in stages for layer in s.model.layers.values()]
    # (global layer, index into the stage's KV caches, sliding window)
    assert [(a.layer, a.local_layer, a.window) for a in attns] == [(0, 0, None), (1, 0, 24)]
