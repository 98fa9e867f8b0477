"""tp=2, pp=2 (and tp=2 × pp=2 on 4 GPUs) engines over NCCL, one GPU per rank: greedy tokens of
staggered requests with preemption equal the tp=1 engine's (itself checked against transformers)."""

from __future__ import annotations

from typing import Any

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


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_nccl_ranks_size_their_cache_after_profiling_a_step_together(engines: Engines, layout: str) -> None:
    """Without a fixed block count every rank runs the largest step before sizing its cache (its
    tp all-reduces and pipeline sends with the others), and the ranks still give the tp=1 tokens."""
    from shardserve.engine.engine import LLMEngine

    tp, pp = LAYOUTS[layout]
    if torch.cuda.device_count() < tp * pp:
        pytest.skip(f"needs {tp * pp} GPUs, {torch.cuda.device_count()} visible")
    reference = reference_tokens(engines, "llama")
    sections = {
        "cache": {"block_size": 8, "kv_cache_free_gpu_mem_fraction": 0.05},
        "scheduler": {**SECTIONS["scheduler"], "max_num_sequences": 8},  # the profiled step holds a 41-token prompt
    }
    engine = LLMEngine.from_model(
        engines("llama", layout), **sections, model={"device": "cuda"}, parallel={"comm": "nccl"}
    )
    try:
        got = run_staggered(engine, staggered_prompts(engine.arch.vocab_size), params())
        step_bytes = engine.executor.worker.step_bytes  # type: ignore[attr-defined]
    finally:
        engine.shutdown()
    assert got == reference
    assert step_bytes > 0 and engine.kv_cache.num_blocks > SECTIONS["cache"]["num_blocks"]


TIMEOUTS = {"timeout_s": 15.0, "heartbeat_timeout_s": 2.0}


def test_nccl_rank_stopped_mid_run_is_named_within_the_deadline(engines: Engines) -> None:
    """tp=2 over NCCL with CUDA graphs: rank 0 waits for its sampled tokens behind an all-reduce
    that a stopped peer never joins; the wait ends with an error naming that rank, not a hang.
    Rank 0 runs in a spawned process: its GPU stream keeps the stuck all-reduce afterwards."""
    import multiprocessing

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=stop_rank_1_mid_run, args=(str(engines("llama", "tp2")), results))
    proc.start()
    try:
        outcome, message, seconds, survivors = results.get(timeout=180)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert outcome == "CommError" and "rank 1" in message, message
    assert seconds < TIMEOUTS["timeout_s"] + 10.0
    assert not survivors


def stop_rank_1_mid_run(model_dir: str, results: Any) -> None:
    """(In a spawned process.) Stop rank 1 after 3 steps; report how the next steps ended."""
    import os
    import signal
    import time

    from shardserve.comm.base import CommError
    from shardserve.engine.engine import LLMEngine
    from tests.workers.ranks import alive, kill_all

    engine = LLMEngine.from_model(
        model_dir, **SECTIONS, model={"device": "cuda"}, parallel={"comm": "nccl", **TIMEOUTS}
    )
    pids = engine.executor.launcher.pids  # type: ignore[attr-defined]
    outcome, message, start = "no error", "", time.monotonic()
    try:
        for i, prompt in enumerate(staggered_prompts(engine.arch.vocab_size)):
            engine.add_request(prompt, params(), request_id=str(i))
        for _ in range(3):
            engine.step()
        os.kill(pids[1], signal.SIGSTOP)
        start = time.monotonic()
        while engine.has_unfinished_requests():
            engine.step()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        outcome, message = "CommError" if isinstance(exc, CommError) else type(exc).__name__, str(exc)
    seconds = time.monotonic() - start
    kill_all(list(pids.values()))
    results.put((outcome, message, seconds, [p for p in pids.values() if alive(p)]))
