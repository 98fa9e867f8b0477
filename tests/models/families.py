"""Every family's tiny-checkpoint recipes (from tests/models/test_<family>.py), in one table for the
tests that run all of them (test_families.py, tests/builder/test_build_families.py)."""

from __future__ import annotations

from tests.checkpoints import Recipe
from tests.models.test_baichuan import RECIPES as BAICHUAN
from tests.models.test_chatglm import RECIPES as CHATGLM
from tests.models.test_falcon import GREEDY as FALCON_GREEDY
from tests.models.test_falcon import RECIPES as FALCON
from tests.models.test_glm import RECIPES as GLM
from tests.models.test_gpt2 import RECIPES as GPT2
from tests.models.test_gpt_bigcode import RECIPES as GPT_BIGCODE
from tests.models.test_llama import RECIPES as LLAMA
from tests.models.test_mpt import GREEDY as MPT_GREEDY
from tests.models.test_mpt import RECIPES as MPT

FAMILIES: dict[str, dict[str, Recipe]] = {
    "llama": LLAMA,
    "gpt2": GPT2,
    "gpt_bigcode": GPT_BIGCODE,
    "falcon": FALCON,
    "mpt": MPT,
    "glm": GLM,
    "chatglm": CHATGLM,
    "baichuan": BAICHUAN,
}
VARIANTS = [(family, variant) for family, recipes in FAMILIES.items() for variant in recipes]
# Greedy runs against transformers' generate dominate the time: where a family has variants that
# only change weight layout, those are checked by logits alone.
GREEDY_ONLY = {"falcon": set(FALCON_GREEDY), "mpt": set(MPT_GREEDY), "chatglm": {"multi_query"}}
GREEDY_VARIANTS = [(f, v) for f, v in VARIANTS if f not in GREEDY_ONLY or v in GREEDY_ONLY[f]]


def ids(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{family}-{variant}" for family, variant in pairs]
