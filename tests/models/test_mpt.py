"""The MPT family against transformers on tiny checkpoints: greedy tokens identical with requests
arriving at different steps, logits within 1e-4 relative, a 2-stage pipeline split covering every
checkpoint tensor, MPT's ALiBi slopes, and clear refusals of what it does not implement.

Variants: six_heads (6 heads of 16 — not a power of two, so the slopes interleave — clip_qkv,
softmax_scale, lm_head tied to transformer.wte); untied (4 heads, its own lm_head; logits only).
transformers' MptModel ignores `alibi_bias_max` (always 8), so other values are checked on the
slope formula alone, against transformers' `build_mpt_alibi_tensor` called with them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardserve.builder.errors import CheckpointError
from shardserve.models.mpt import MptForCausalLM, mpt_alibi_slopes
from tests.checkpoints import (
    VOCAB,
    hf_recipe,
)

pytestmark = pytest.mark.timeout(300)

BASE = dict(vocab_size=VOCAB, n_layers=2, max_seq_len=256, bos_token_id=1, eos_token_id=2)
VARIANTS: dict[str, dict[str, Any]] = {
    "six_heads": dict(d_model=96, n_heads=6, attn_config={"clip_qkv": 1.0, "softmax_scale": 0.2}),
    "untied": dict(d_model=64, n_heads=4, tie_word_embeddings=False),
}
RECIPES = {variant: hf_recipe("mpt", **BASE, **overrides) for variant, overrides in VARIANTS.items()}
# transformers' generate dominates the time: one variant (the untied one differs only at lm_head)
GREEDY = ["six_heads"]


@pytest.mark.parametrize("heads", [1, 4, 6, 12, 32])
@pytest.mark.parametrize("bias_max", [8, 16])
def test_alibi_slopes_match_transformers(heads: int, bias_max: int) -> None:
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    # transformers' bias for the last key position (-1 relative to the newest) is -slope per head
    ref = -build_mpt_alibi_tensor(heads, 2, bias_max)[:, 0, 0]
    assert torch.equal(mpt_alibi_slopes(heads, bias_max), ref)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"attn_config": {"alibi": False}}, "alibi=False"),
        ({"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}}, "kv_n_heads"),
        ({"attn_config": {"qk_ln": True}}, "qk_ln"),
        ({"no_bias": False}, "no_bias=False"),
    ],
)
def test_unsupported_configs_are_refused(overrides: dict[str, Any], named: str) -> None:
    cfg = {"architectures": ["MptForCausalLM"], "model_type": "mpt", **BASE, "d_model": 64, "n_heads": 4, **overrides}
    with pytest.raises(CheckpointError, match=named):
        MptForCausalLM.config_from_hf(cfg)
