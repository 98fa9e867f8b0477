"""GLM (transformers `glm`: partial interleaved rotary, fused gate_up, q/k/v bias) against transformers
on a tiny checkpoint: greedy tokens identical with requests arriving at different steps; logits within
1e-4 relative; a 2-stage pipeline split holds every checkpoint tensor exactly once.

`GLM` (the tiny config) is shared with the ChatGLM tests."""

from __future__ import annotations

import pytest

from shardserve.models.registry import parse_arch
from tests.checkpoints import (
    VOCAB,
    hf_recipe,
)

pytestmark = pytest.mark.timeout(300)

GLM = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    pad_token_id=0,  # GlmConfig's default (151329) is outside the tiny vocab
    bos_token_id=1,
    eos_token_id=2,
)
RECIPES = {"glm": hf_recipe("glm", **GLM)}


def test_config_glm4_9b_hf() -> None:
    """The published THUDM/glm-4-9b-chat-hf config keys (transformers < 5: factor at the top level)."""
    cfg = {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "vocab_size": 151552,
        "hidden_size": 4096,
        "intermediate_size": 13696,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "partial_rotary_factor": 0.5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1.5625e-07,
        "attention_bias": True,
        "eos_token_id": [151329, 151336, 151338],
    }
    arch = parse_arch(cfg)
    assert arch.extra["rotary_dim"] == 64 and arch.attention_bias and not arch.o_proj_bias
    assert (arch.num_kv_heads, arch.eos_token_ids) == (2, (151329, 151336, 151338))
