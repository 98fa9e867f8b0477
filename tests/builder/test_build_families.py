"""Every model family through `shardserve build`, on the tiny checkpoints of its family tests
(tests/models/test_<family>.py `RECIPES`, shared with those tests for the session):

- tp=1: every variant's engine directory gives the greedy tokens of its reference (transformers;
  for ChatGLM / Baichuan the transformers model the checkpoint was converted from, and for
  Baichuan's ALiBi variant the test-local dense reference);
- tp=2 × pp=2 and tp=4 × pp=1, one variant per family (4 attention heads): the rank files join
  back to every canonical source tensor exactly and each maps onto exactly its rank model's
  parameters (`assert_rank_files_split_checkpoint`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardserve.builder.build import BuildOptions, build_engine
from tests.checkpoints import Checkpoints, assert_greedy_matches, assert_rank_files_split_checkpoint
from tests.models.families import FAMILIES, VARIANTS, ids

pytestmark = pytest.mark.timeout(300)

# The variant split tp × pp: 4 heads, and where the family has one, a tied head (its source goes to
# the first and the last stage) or fewer kv heads than tp (replicated on several ranks).
SPLIT = {
    "llama": "qwen2",  # tied, q/k/v biases, 2 kv heads
    "gpt2": "tied",
    "gpt_bigcode": "multi_query",  # 1 kv head
    "falcon": "grouped",  # tied, 2 kv heads
    "mpt": "untied",  # the 4-head variant
    "glm": "glm",
    "chatglm": "multi_query",  # 2 kv groups
    "baichuan": "rope",  # the 4-head variant (ALiBi has 6)
}
OPTS = dict(progress=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoints]:
    return {family: Checkpoints(tmp_path_factory, family, recipes) for family, recipes in FAMILIES.items()}


@pytest.mark.parametrize(("family", "variant"), VARIANTS, ids=ids(VARIANTS))
def test_tp1_engine_dir_matches_reference(checkpoints, tmp_path: Path, family: str, variant: str) -> None:
    source, reference = checkpoints[family](variant)
    build_engine(source, tmp_path / "engine", BuildOptions(**OPTS))
    assert_greedy_matches(tmp_path / "engine", reference)


@pytest.mark.parametrize(("tp", "pp"), [(2, 2), (4, 1)], ids=["tp2-pp2", "tp4-pp1"])
@pytest.mark.parametrize("family", SPLIT)
def test_rank_files_join_to_the_source(checkpoints, tmp_path: Path, family: str, tp: int, pp: int) -> None:
    source, _ = checkpoints[family](SPLIT[family])
    info = build_engine(source, tmp_path / "engine", BuildOptions(tp=tp, pp=pp, **OPTS))
    assert (info.tp, info.pp, len(info.ranks)) == (tp, pp, tp * pp)
    assert_rank_files_split_checkpoint(source, tmp_path / "engine")
