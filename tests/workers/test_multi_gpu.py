"""tp=2, pp=2 (and tp=2 × pp=2 on 4 GPUs) engines over NCCL, one GPU per rank: greedy tokens of
staggered requests with preemption equal the tp=1 engine's (itself checked against transformers)."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import run_staggered, staggered_prompts
from tests.workers.ranks import LAYOUTS, SECTIONS, Engines, params, reference_tokens

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Engines:
    return Engines(tmp_path_factory)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nccl_ranks_give_the_tp1_tokens(engines: Engines, layout: str) -> None:
    from shardserve.engine.engine import LLMEngine

    tp, pp = LAYOUTS[layout]
    if torch.cuda.device_count() < tp * pp:
        pytest.skip(f"needs {tp * pp} GPUs, {torch.cuda.device_count()} visible")
    reference = reference_tokens(engines, "llama")
    engine = LLMEngine.from_model(
        engines("llama", layout), **SECTIONS, model={"device": "cuda"}, parallel={"comm": "nccl"}
    )
    try:
        got = run_staggered(engine, staggered_prompts(engine.arch.vocab_size), params())
        preemptions = engine.scheduler.stats.num_preemptions
    finally:
        engine.shutdown()
    assert got == reference
    assert preemptions >= 1
    print(layout, [(s.rank, s.steps, round(s.bubble, 3)) for s in engine.executor.rank_stats])  # type: ignore[attr-defined]
