"""ModelRunner's per-request state on CPU: what a plan's diffs leave for sampling."""

from __future__ import annotations

import torch
from torch import nn

from shardserve.engine.request import SamplingParams
from shardserve.engine.sampler import Sampler, banned_token_ids
from shardserve.engine.step import CachedRequestData, NewRequestData, StepPlan
from shardserve.workers.attention import TorchAttentionBackend
from shardserve.workers.model_runner import ModelRunner

EOS = 2


def test_sampling_rows_follow_the_tokens_the_plans_append() -> None:
    """A request's rows are made once; they read its tokens as the plans append them, the row of
    a request run ahead counting one output more (still on the device)."""
    runner = ModelRunner(nn.Identity(), [], 4, TorchAttentionBackend(), Sampler(), torch.device("cpu"))
    params = SamplingParams(max_tokens=8, min_tokens=3)
    new = NewRequestData("a", [5, 6, 7], 3, params, frozenset({EOS}), (), [0], 0)
    runner._apply(StepPlan(1, new_requests=[new], num_scheduled_tokens={"a": 3}))
    row, ahead = runner.requests["a"].rows
    assert row.num_output_tokens == 0 and ahead.num_output_tokens == 1
    runner._apply(StepPlan(2, cached_requests=[CachedRequestData("a", [9], [], 3)], num_scheduled_tokens={"a": 1}))
    runner._apply(StepPlan(3, cached_requests=[CachedRequestData("a", [4], [], 5)], num_scheduled_tokens={"a": 1}))
    assert row.token_ids == [5, 6, 7, 9, 4] and row.num_output_tokens == 2 and ahead.num_output_tokens == 3
    assert banned_token_ids(row) == [EOS] and banned_token_ids(ahead) == []  # min_tokens counts the pending one
