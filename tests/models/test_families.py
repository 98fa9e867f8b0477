"""Every family variant against its reference (transformers, or for ChatGLM / Baichuan the model the
checkpoint was converted from, or Baichuan-ALiBi's test-local dense reference): greedy tokens
identical with requests arriving at different steps; prompt logits within 1e-4 relative; a 2-stage
pipeline split holds every checkpoint tensor exactly once."""

from __future__ import annotations

import pytest

from tests.checkpoints import (
    Checkpoints,
    assert_greedy_matches,
    assert_two_stages_split_checkpoint,
    prompt_logits_error,
)
from tests.models.families import FAMILIES, GREEDY_VARIANTS, VARIANTS, ids

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoints]:
    return {family: Checkpoints(tmp_path_factory, family, recipes) for family, recipes in FAMILIES.items()}


@pytest.mark.parametrize(("family", "variant"), GREEDY_VARIANTS, ids=ids(GREEDY_VARIANTS))
def test_greedy_tokens_equal_reference(checkpoints: dict[str, Checkpoints], family: str, variant: str) -> None:
    assert_greedy_matches(*checkpoints[family](variant))


@pytest.mark.parametrize(("family", "variant"), VARIANTS, ids=ids(VARIANTS))
def test_prompt_logits_within_1e_4(checkpoints: dict[str, Checkpoints], family: str, variant: str) -> None:
    assert prompt_logits_error(*checkpoints[family](variant)) < 1e-4


@pytest.mark.parametrize(("family", "variant"), VARIANTS, ids=ids(VARIANTS))
def test_two_stage_split_covers_the_checkpoint(
    checkpoints: dict[str, Checkpoints], family: str, variant: str
) -> None:
    assert_two_stages_split_checkpoint(checkpoints[family](variant)[0])
