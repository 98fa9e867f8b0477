"""The one message per step between the leader and the ranks, and what comes back.

A request is sent in full the first time it is scheduled (`NewRequestData`), and after
that only as ids and diffs (`CachedRequestData`): the tokens appended and the blocks added
since the last step. A request that finished, was aborted or preempted is named in
`finished_request_ids` so the ranks drop its state; a preempted one comes back later as new.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.engine.request import SamplingParams, TokenLogprob


@dataclass(frozen=True, slots=True)
class NewRequestData:
    request_id: str
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    bad_words_ids: tuple[tuple[int, ...], ...]
    block_ids: list[int]
    num_computed_tokens: int  # includes prefix-cache hits


@dataclass(slots=True)  # not frozen: one per running request per step, and a frozen __init__ costs ~3x as much
class CachedRequestData:
    request_id: str
    new_token_ids: list[int]  # tokens appended since this request was last sent
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass(frozen=True, slots=True)
class StepPlan:
    step_id: int
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # Batch order: request id -> tokens to compute this step.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass(frozen=True, slots=True)
class StepResult:
    step_id: int
    # Request id -> the token sampled this step (only requests whose chunk reached the end).
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
