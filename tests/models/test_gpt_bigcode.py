"""GPT-BigCode (StarCoder) against transformers on tiny random checkpoints: greedy tokens identical
with requests arriving at different steps, logits within 1e-4 relative, and a 2-stage split that
covers the checkpoint once.

Variants: "multi_query" (the default: one shared k/v head, tied lm_head, gelu_pytorch_tanh);
"multi_head" (multi_query=False: per-head interleaved c_attn, own lm_head, scale_attn_weights=False)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.checkpoints import (
    Checkpoints,
    arch_of,
    hf_recipe,
)
from tests.models.test_gpt2 import BASE

pytestmark = pytest.mark.timeout(300)

VARIANTS: dict[str, dict[str, Any]] = {
    "multi_query": {},
    "multi_head": {"multi_query": False, "tie_word_embeddings": False, "scale_attn_weights": False},
}
RECIPES = {variant: hf_recipe("gpt_bigcode", **BASE, **overrides) for variant, overrides in VARIANTS.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory, "gpt_bigcode", RECIPES)


@pytest.mark.parametrize(("variant", "kv_heads"), [("multi_query", 1), ("multi_head", 4)])
def test_kv_heads_follow_multi_query(checkpoint: Checkpoints, variant: str, kv_heads: int) -> None:
    arch = arch_of(checkpoint(variant)[0])
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (4, kv_heads, 16)
