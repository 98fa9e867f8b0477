"""The Llama family (Llama, Llama-3 rope scaling, Mistral sliding window, Qwen2 qkv bias, tied
embeddings) against transformers on the same tiny checkpoints: greedy tokens identical with
requests arriving at different steps; logits within 1e-4 relative; a 2-stage pipeline split holds
every checkpoint tensor exactly once."""

from __future__ import annotations

import pytest

from tests.checkpoints import (
    LLAMA_RECIPES,
    Checkpoints,
    assert_greedy_matches,
    assert_two_stages_split_checkpoint,
    prompt_logits_error,
)

pytestmark = pytest.mark.timeout(300)
RECIPES = LLAMA_RECIPES  # llama, llama3 (rope scaling), mistral (sliding window), qwen2 (bias, tied)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory, "llama", RECIPES)


@pytest.mark.parametrize("family", RECIPES)
def test_greedy_tokens_equal_transformers(checkpoint: Checkpoints, family: str) -> None:
    assert_greedy_matches(*checkpoint(family))


@pytest.mark.parametrize("family", RECIPES)
def test_prompt_logits_within_1e_4(checkpoint: Checkpoints, family: str) -> None:
    # 40 tokens: 5 scattered blocks, and past Mistral's 24-token window
    assert prompt_logits_error(*checkpoint(family)) < 1e-4


@pytest.mark.parametrize("family", RECIPES)
def test_two_stage_split_covers_the_checkpoint(checkpoint: Checkpoints, family: str) -> None:
    assert_two_stages_split_checkpoint(checkpoint(family)[0])
