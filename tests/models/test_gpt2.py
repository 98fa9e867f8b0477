"""GPT-2 against transformers on tiny random checkpoints: greedy tokens identical with requests
arriving at different steps, logits within 1e-4 relative; a 2-stage split covers the checkpoint
once; the original OpenAI tensor names (no `transformer.` prefix, mask buffers) load the same.

Variants: "tied" (the defaults: tied lm_head, gelu_new, 1/sqrt(head_dim)); "untied_layer_scaled"
(own lm_head, exact gelu, scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn on transformers'
eager path — the same math in fp32)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from shardserve.builder.errors import CheckpointError
from shardserve.models.registry import model_class, parse_arch
from tests.checkpoints import (
    VOCAB,
    Checkpoints,
    arch_of,
    hf_recipe,
)

pytestmark = pytest.mark.timeout(300)

# Tiny GPT-2-shaped config (GPT-BigCode's tests reuse it).
BASE: dict[str, Any] = {
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": 128,
    "vocab_size": VOCAB,
    "n_positions": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "tied": {},
    "untied_layer_scaled": {
        "tie_word_embeddings": False,
        "activation_function": "gelu",
        "scale_attn_by_inverse_layer_idx": True,
        "reorder_and_upcast_attn": True,
        "attn_implementation": "eager",
    },
}
RECIPES = {variant: hf_recipe("gpt2", **BASE, **overrides) for variant, overrides in VARIANTS.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory, "gpt2", RECIPES)


def test_original_openai_names_load_the_same(checkpoint: Checkpoints) -> None:
    path, hf = checkpoint("tied")
    arch = arch_of(path)
    cls = model_class(arch)
    state = hf.state_dict()
    legacy = {name.removeprefix("transformer."): t for name, t in state.items() if name != "lm_head.weight"}
    for i in range(arch.num_layers):  # the causal-mask buffers saved by the original checkpoints
        legacy[f"h.{i}.attn.bias"] = torch.ones(1, 1, arch.max_position_embeddings, arch.max_position_embeddings)
        legacy[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    ours, ref = cls(arch), cls(arch)
    assert ours.load_weights(legacy.items()) == ref.load_weights(state.items())
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("override", "message"),
    [({"add_cross_attention": True}, "add_cross_attention"), ({"activation_function": "mish"}, "mish")],
)
def test_unsupported_config_is_refused(checkpoint: Checkpoints, override: dict[str, Any], message: str) -> None:
    cfg = json.loads((checkpoint("tied")[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match=message):
        parse_arch({**cfg, **override})
