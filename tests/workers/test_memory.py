"""The largest step a worker sets memory aside for: its plan runs through a real runner over a
one-block cache and samples every request; on CUDA its peak grows with the step."""

from __future__ import annotations

import pytest
import torch

from shardserve.engine.engine import LLM
from shardserve.engine.sampler import Sampler
from shardserve.workers.attention import TorchAttentionBackend
from shardserve.workers.memory import profile_plan, step_peak_bytes
from shardserve.workers.model_runner import ModelRunner


@pytest.mark.parametrize(
    ("max_tokens", "max_seqs", "max_len", "lengths"),
    [
        (100, 8, 40, [40, 40, 15, 1, 1, 1, 1, 1]),  # prompts capped at max_len, a token for every request
        (10, 256, 4096, [1] * 10),  # fewer tokens than requests: one token each
        (4096, 1, 8192, [4096]),
        (100, 2, 30, [30, 30]),  # the model's length bounds the step
    ],
)
def test_the_profile_plan_is_the_largest_step(max_tokens: int, max_seqs: int, max_len: int, lengths: list[int]) -> None:
    plan = profile_plan(max_tokens, max_seqs, max_len, block_size=16)
    assert [len(r.token_ids) for r in plan.new_requests] == lengths
    assert list(plan.num_scheduled_tokens.values()) == lengths
    for r in plan.new_requests:
        assert r.num_prompt_tokens == len(r.token_ids) and r.num_computed_tokens == 0
        assert r.block_ids == [0] * -(-len(r.token_ids) // 16)


def test_the_profile_plan_runs_over_a_one_block_cache(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    worker = LLM(path, cache={"num_blocks": 16, "block_size": 8}).engine.executor.worker
    model, block_size = worker.runner.model, worker.runner.block_size
    caches = [c[:, :1].clone() for c in worker.runner.kv_caches]
    runner = ModelRunner(model, caches, block_size, TorchAttentionBackend(), Sampler(), torch.device("cpu"))
    plan = profile_plan(max_tokens=80, max_seqs=6, max_len=32, block_size=block_size)
    result = runner.execute(plan)
    assert sorted(result.sampled_token_ids) == sorted(r.request_id for r in plan.new_requests)


@pytest.mark.cuda
def test_a_larger_step_sets_more_memory_aside(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    llm = LLM(path, device="cuda", dtype="bfloat16", scheduler={"max_num_tokens": 4096, "max_num_sequences": 64})
    worker = llm.engine.executor.worker
    assert worker.step_bytes > 0
    runner = worker.runner
    probe = ModelRunner(runner.model, [c[:, :1].clone() for c in runner.kv_caches], runner.block_size,
                        runner.backend, Sampler(), runner.device)  # fmt: skip
    max_len = llm.engine.max_model_len  # the rotary table's length
    small = step_peak_bytes(probe, profile_plan(256, 8, max_len, runner.block_size))
    large = step_peak_bytes(probe, profile_plan(8192, 256, max_len, runner.block_size))
    assert 0 < small < large
    out = llm.generate([[5, 6, 7, 8]])
    assert out[0].token_ids
