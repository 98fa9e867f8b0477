"""The Llama family (Llama, Llama-3 rope scaling, Mistral sliding window, Qwen2 qkv bias, tied
embeddings) against transformers on the same tiny checkpoints: greedy tokens identical with
requests arriving at different steps; logits within 1e-4 relative."""

from __future__ import annotations

import pytest

from tests.checkpoints import assert_greedy_matches, prompt_logits_error

FAMILIES = ["llama", "llama3", "mistral", "qwen2"]
pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers(tiny_checkpoint, family: str) -> None:
    assert_greedy_matches(*tiny_checkpoint(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_logits_within_1e_4(tiny_checkpoint, family: str) -> None:
    # 40 tokens: 5 scattered blocks, and past Mistral's 24-token window
    assert prompt_logits_error(*tiny_checkpoint(family)) < 1e-4
