"""The Falcon family against transformers on tiny checkpoints: greedy tokens identical with requests
arriving at different steps, logits within 1e-4 relative, and a 2-stage pipeline split whose
stages hold disjoint parameters covering every checkpoint tensor.

Variants: grouped (new decoder architecture, 2 kv groups, ln_attn + ln_mlp, rotary); multi_query
(old layout, one kv head, parallel attention, one shared LayerNorm, biases, untied lm_head);
sequential (old layout, parallel_attn=False, multi-head, ALiBi, biases — Falcon-RW style);
one_layernorm (new architecture with one kv head and one shared LayerNorm — Falcon-11B style;
logits only)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.checkpoints import (
    VOCAB,
    hf_recipe,
)

pytestmark = pytest.mark.timeout(300)

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    ffn_hidden_size=128,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)
VARIANTS: dict[str, dict[str, Any]] = {
    "grouped": dict(new_decoder_architecture=True, num_kv_heads=2),
    "multi_query": dict(multi_query=True, parallel_attn=True, bias=True, tie_word_embeddings=False),
    "sequential": dict(multi_query=False, parallel_attn=False, alibi=True, bias=True),
    "one_layernorm": dict(new_decoder_architecture=True, num_kv_heads=1, num_ln_in_parallel_attn=1),
}
RECIPES = {variant: hf_recipe("falcon", **BASE, **overrides) for variant, overrides in VARIANTS.items()}
GREEDY = ["grouped", "multi_query", "sequential"]  # transformers' generate dominates the time
