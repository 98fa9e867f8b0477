"""The Llama family (Llama, Llama-3 rope scaling, Mistral sliding window, Qwen2 qkv bias, tied
embeddings) against transformers on the same tiny checkpoints: greedy tokens identical with
requests arriving at different steps; logits within 1e-4 relative; a 2-stage pipeline split holds
every checkpoint tensor exactly once."""

from __future__ import annotations

import pytest

from tests.checkpoints import (
    LLAMA_RECIPES,
)

pytestmark = pytest.mark.timeout(300)
RECIPES = LLAMA_RECIPES  # llama, llama3 (rope scaling), mistral (sliding window), qwen2 (bias, tied)
