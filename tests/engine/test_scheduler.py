"""Scheduler on CPU with fake model results (no torch): admission by policy, token budget,
chunked prefill, priority, preemption, aborts in every state, stop conditions, plan diffs.

`Driver` plays the leader loop: `schedule()` → fake ranks → `update()`. The fake ranks
rebuild every request from the plans' diffs alone and keep a fake KV cache (slot → the
context whose key/value it holds), so each step also checks that the plans are enough for a
rank to follow and that no request ever reads a KV slot it did not (or a sharer did not)
write. test_kv_cache.py reuses the driver for prefix-cache checks.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from shardserve.config import SchedulerConfig, SchedulerPolicy
from shardserve.engine.kv_cache import KVCacheManager
from shardserve.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from shardserve.engine.scheduler import Scheduler
from shardserve.engine.step import CachedRequestData, NewRequestData, StepPlan, StepResult

GC = SchedulerPolicy.GUARANTEED_COMPLETION
MU = SchedulerPolicy.MAX_UTILIZATION
BLOCK_SIZE = 4
EOS = 2
RequestData = NewRequestData | CachedRequestData


# -- helpers -------------------------------------------------------------------------------
def make_request(
    request_id: str,
    prompt: Sequence[int],
    *,
    max_tokens: int = 4,
    min_tokens: int = 0,
    eos: Sequence[int] = (EOS,),
    stop_token_ids: Sequence[int] = (),
    max_total_tokens: int = 4096,
    priority: int = 0,
    arrival: int = 0,
    sampling: dict[str, Any] | None = None,
) -> Request:
    chosen = dict(max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=tuple(stop_token_ids))
    params = SamplingParams(**chosen | (sampling or {}))
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        params=params,
        eos_token_ids=frozenset(eos),
        max_total_tokens=max_total_tokens,
        priority=priority,
        arrival=arrival,
    )


def default_token(output_index: int) -> int:
    """The fake model's token when a test scripts none (never EOS)."""
    return 1000 + output_index


@dataclass(slots=True)
class _RankView:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    num_prompt_tokens: int


class FakeRanks:
    """What a rank knows, rebuilt from plans only, plus a KV cache of slot -> context written there.
    A request scheduled one token past what the plans told (run ahead) takes the token this rank
    sampled for it in the previous plan, as a GPU rank takes it from its device."""

    def __init__(self, block_size: int, token_for: Callable[[str, int], int]) -> None:
        self.block_size = block_size
        self.token_for = token_for  # (request, output index) -> the fake model's token
        self.views: dict[str, _RankView] = {}
        self.kv: dict[int, tuple[int, ...]] = {}
        self.sampled: dict[str, int] = {}  # the previous plan's tokens

    def run(self, plan: StepPlan) -> list[str]:
        """Apply the plan, write the scheduled tokens' KV; returns the ids whose chunk reached the end."""
        self._apply(plan)
        sampled: dict[str, int] = {}
        for request_id, n in plan.num_scheduled_tokens.items():
            view = self.views[request_id]
            start = view.num_computed_tokens
            tokens = view.token_ids
            if start + n == len(tokens) + 1 and request_id in self.sampled:  # run ahead
                tokens = tokens + [self.sampled[request_id]]
            assert start + n <= len(tokens), f"{request_id}: scheduled past its tokens"
            assert len(view.block_ids) * self.block_size >= start + n, f"{request_id}: no slot for its tokens"
            for pos in range(start, start + n):  # attention writes every new slot before any read
                self.kv[self._slot(view, pos)] = tuple(tokens[: pos + 1])
            if start + n == len(tokens):
                sampled[request_id] = self.token_for(request_id, len(tokens) - view.num_prompt_tokens)
        for request_id, n in plan.num_scheduled_tokens.items():
            self.views[request_id].num_computed_tokens += n
        self._check_kv()
        self.sampled = sampled
        return list(sampled)

    def _apply(self, plan: StepPlan) -> None:
        for request_id in plan.finished_request_ids:
            assert request_id in self.views, f"finished id {request_id} was never sent"
            del self.views[request_id]
        for new in plan.new_requests:
            assert new.request_id not in self.views, f"{new.request_id} sent as new twice"
            assert len(new.token_ids) >= new.num_prompt_tokens
            self.views[new.request_id] = _RankView(
                list(new.token_ids), list(new.block_ids), new.num_computed_tokens, new.num_prompt_tokens
            )
        for cached in plan.cached_requests:
            view = self.views[cached.request_id]
            assert view.num_computed_tokens == cached.num_computed_tokens, f"{cached.request_id}: progress diverged"
            view.token_ids += cached.new_token_ids
            view.block_ids += cached.new_block_ids

    def _check_kv(self) -> None:
        for request_id, view in self.views.items():
            for pos in range(min(view.num_computed_tokens, len(view.token_ids))):  # a token run ahead: next plan
                assert self.kv.get(self._slot(view, pos)) == tuple(view.token_ids[: pos + 1]), (
                    f"{request_id}: KV at position {pos} holds other tokens than its context"
                )

    def _slot(self, view: _RankView, pos: int) -> int:
        return view.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size


class Driver:
    """The leader loop with a fake model: each request's i-th output is its script[i], else `default_token(i)`."""

    def __init__(
        self,
        *,
        num_blocks: int = 64,
        block_size: int = BLOCK_SIZE,
        max_num_tokens: int = 64,
        max_num_sequences: int = 16,
        policy: SchedulerPolicy = MU,
        prefix_caching: bool = True,
        micro_batches: int = 1,
        run_ahead: bool = False,
    ) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, prefix_caching)
        config = SchedulerConfig(policy=policy, max_num_tokens=max_num_tokens, max_num_sequences=max_num_sequences)
        self.scheduler = Scheduler(config, self.kv, micro_batches, run_ahead)
        self.ranks = FakeRanks(block_size, lambda r, i: self.expected_outputs(r, i + 1)[-1])
        self.requests: dict[str, Request] = {}  # every request ever added
        self.scripts: dict[str, list[int]] = {}
        self.plans: list[StepPlan] = []
        self._arrival = 0
        self._step_id = 0

    def add(
        self, request_id: str, prompt: int | Sequence[int] = 8, *, outputs: Sequence[int] = (), **kwargs: Any
    ) -> Request:
        """Add a request; an int prompt is a length, filled with tokens no other request shares."""
        self._arrival += 1
        if isinstance(prompt, int):
            prompt = [10_000 * self._arrival + i for i in range(prompt)]
        req = make_request(request_id, prompt, arrival=self._arrival, **kwargs)
        self.requests[request_id] = req
        self.scripts[request_id] = list(outputs)
        self.scheduler.add(req)
        return req

    def schedule(self) -> StepPlan:
        plan = self.scheduler.schedule()
        self._check_plan(plan)
        return plan

    def complete(self, plan: StepPlan) -> list[Request]:
        """Run `plan` on the fake ranks and hand the result to the scheduler."""
        reached = self.ranks.run(plan)
        for request_id, n in plan.num_scheduled_tokens.items():
            req = self.requests[request_id]
            if not req.is_finished:  # the driver rule agrees with what the ranks saw
                assert (req.num_computed_tokens + n == req.num_tokens) == (request_id in reached)
        sampled = {r: self._next_token(self.requests[r]) for r in reached}
        touched = self.scheduler.update(plan, StepResult(plan.step_id, sampled))
        self._check_pool()
        self.plans.append(plan)
        return touched

    def step(self) -> StepPlan:
        plan = self.schedule()
        self.complete(plan)
        return plan

    def run(self, max_steps: int = 1000) -> list[StepPlan]:
        """Step until every request finished; returns the plans of these steps."""
        start = len(self.plans)
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return self.plans[start:]
            self.step()
        raise AssertionError(f"still unfinished after {max_steps} steps: {sorted(self.scheduler.requests)}")

    def run_pipelined(self, depth: int, max_steps: int = 1000) -> int:
        """Step as a pipeline of `depth` stages does: a plan's result comes back only once `depth`
        plans are in flight (or nothing new was scheduled). The fake ranks take plans in order.
        Returns the most plans that were in flight at once."""
        queue: deque[tuple[StepPlan, list[str]]] = deque()
        most = 0
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished() and not queue:
                return most
            plan = self.schedule()
            flying = {r for p, _ in queue for r in p.num_scheduled_tokens}
            if not self.scheduler.run_ahead:
                assert not flying & set(plan.num_scheduled_tokens), "a request scheduled while in flight"
            dropped = flying & set(plan.finished_request_ids)  # finished (run ahead of its stop), never preempted
            assert all(self.requests[r].is_finished for r in dropped), "a request preempted while in flight"
            if plan.num_scheduled_tokens or plan.finished_request_ids:
                queue.append((plan, self.ranks.run(plan)))
            most = max(most, len(queue))
            if queue and (len(queue) >= depth or not plan.num_scheduled_tokens):
                done, reached = queue.popleft()
                sampled = {r: self._next_token(self.requests[r]) for r in reached}
                self.scheduler.update(done, StepResult(done.step_id, sampled))
                self._check_pool()
                self.plans.append(done)
        raise AssertionError(f"still unfinished after {max_steps} steps: {sorted(self.scheduler.requests)}")

    def abort(self, request_id: str) -> Request | None:
        req = self.scheduler.abort(request_id)
        self._check_pool()
        return req

    def appearances(self, request_id: str) -> list[RequestData]:
        """The request's entries in the plans so far, in order."""
        found: list[RequestData] = []
        for plan in self.plans:
            found += [d for d in [*plan.new_requests, *plan.cached_requests] if d.request_id == request_id]
        return found

    def finished_in(self, request_id: str) -> list[int]:
        """Step ids of the plans that name `request_id` as finished."""
        return [p.step_id for p in self.plans if request_id in p.finished_request_ids]

    def expected_outputs(self, request_id: str, n: int) -> list[int]:
        script = self.scripts[request_id]
        return [script[i] if i < len(script) else default_token(i) for i in range(n)]

    def assert_pool_full(self) -> None:
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert all(block.ref_cnt == 0 for block in self.kv.pool.blocks)

    def _next_token(self, req: Request) -> int:
        return self.expected_outputs(req.request_id, req.num_output_tokens + 1)[-1]

    def _check_plan(self, plan: StepPlan) -> None:
        config = self.scheduler.config
        assert plan.step_id == self._step_id + 1
        self._step_id = plan.step_id
        assert plan.total_num_scheduled_tokens <= config.max_num_tokens
        assert len(plan.num_scheduled_tokens) <= config.max_num_sequences
        assert all(n >= 1 for n in plan.num_scheduled_tokens.values())
        sent = [d.request_id for d in [*plan.new_requests, *plan.cached_requests]]
        assert sorted(sent) == sorted(plan.num_scheduled_tokens), "every scheduled request is sent exactly once"
        assert len(self.scheduler.running) <= config.max_num_sequences

    def _check_pool(self) -> None:
        refs = Counter(b for r in self.scheduler.running for b in r.block_ids)
        pool = self.kv.pool
        assert [b.ref_cnt for b in pool.blocks] == [refs[b.block_id] for b in pool.blocks]
        assert pool.num_free == sum(1 for b in pool.blocks if b.ref_cnt == 0)
        assert all(not r.block_ids for r in self.scheduler.waiting), "waiting requests hold no blocks"


def assert_completed(driver: Driver, request_id: str, num_outputs: int, reason: FinishReason) -> None:
    req = driver.requests[request_id]
    assert req.status is RequestStatus.FINISHED
    assert req.finish_reason is reason
    assert req.output_token_ids == driver.expected_outputs(request_id, num_outputs)


# -- plain Python ---------------------------------------------------------------------------
def test_scheduler_and_kv_cache_import_no_torch() -> None:
    code = "import shardserve.engine.scheduler, shardserve.engine.kv_cache, sys; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- one request ----------------------------------------------------------------------------
def test_single_request_prefills_then_decodes_one_token_per_step() -> None:
    d = Driver()
    d.add("a", 6, max_tokens=3)
    plans = d.run()
    assert [p.num_scheduled_tokens for p in plans] == [{"a": 6}, {"a": 1}, {"a": 1}]
    assert_completed(d, "a", 3, FinishReason.LENGTH)
    assert d.scheduler.stats.num_steps == 3
    assert d.scheduler.stats.num_computed_tokens == 8  # the last sampled token is never computed
    assert d.scheduler.stats.finished == {"length": 1}
    d.assert_pool_full()


def test_update_returns_requests_that_got_a_token() -> None:
    d = Driver(max_num_tokens=8)
    d.add("long", 12)
    d.add("short", 3)
    plan = d.schedule()
    assert plan.num_scheduled_tokens == {"long": 8}
    assert d.complete(plan) == []
    touched = d.complete(d.schedule())
    assert [r.request_id for r in touched] == ["long", "short"]


def test_duplicate_request_id_is_rejected() -> None:
    d = Driver()
    d.add("a")
    with pytest.raises(ValueError, match="already in use"):
        d.add("a")


def test_has_unfinished_and_empty_plan() -> None:
    d = Driver()
    assert not d.scheduler.has_unfinished()
    assert d.schedule().is_empty
    d.add("a", max_tokens=1)
    assert d.scheduler.has_unfinished()
    d.run()
    assert not d.scheduler.has_unfinished()
    assert d.step().finished_request_ids == ["a"]


# -- stop conditions ------------------------------------------------------------------------
def test_eos_stops_and_is_kept_in_the_output() -> None:
    d = Driver()
    d.add("a", outputs=[5, 6, EOS, 7], max_tokens=10)
    d.run()
    assert_completed(d, "a", 3, FinishReason.STOP)
    assert d.requests["a"].output_token_ids[-1] == EOS


def test_stop_token_ids_stop_like_eos() -> None:
    d = Driver()
    d.add("a", outputs=[5, 77, 6], max_tokens=10, eos=(), stop_token_ids=(77,))
    d.run()
    assert_completed(d, "a", 2, FinishReason.STOP)


@pytest.mark.parametrize(
    ("min_tokens", "eos_at", "num_outputs", "reason"),
    [
        (0, 0, 1, FinishReason.STOP),
        (1, 0, 1, FinishReason.STOP),  # the first token already counts toward min_tokens
        (2, 0, 6, FinishReason.LENGTH),  # EOS before min_tokens is just a token
        (2, 1, 2, FinishReason.STOP),
        (3, 1, 6, FinishReason.LENGTH),
        (6, 5, 6, FinishReason.STOP),
    ],
)
def test_eos_before_min_tokens_does_not_stop(
    min_tokens: int, eos_at: int, num_outputs: int, reason: FinishReason
) -> None:
    d = Driver()
    outputs = [default_token(i) for i in range(6)]
    outputs[eos_at] = EOS
    d.add("a", outputs=outputs, max_tokens=6, min_tokens=min_tokens)
    d.run()
    assert_completed(d, "a", num_outputs, reason)


def test_eos_ignored_when_the_request_has_no_eos_ids() -> None:
    d = Driver()
    d.add("a", outputs=[EOS, EOS], max_tokens=3, eos=())
    d.run()
    assert_completed(d, "a", 3, FinishReason.LENGTH)


def test_eos_on_the_last_allowed_token_is_a_stop() -> None:
    d = Driver()
    d.add("a", outputs=[5, EOS], max_tokens=2)
    d.run()
    assert_completed(d, "a", 2, FinishReason.STOP)


@pytest.mark.parametrize(("max_tokens", "max_total_tokens", "num_outputs"), [(10, 9, 3), (3, 100, 3), (4, 7, 1)])
def test_length_by_max_tokens_or_max_total_tokens(max_tokens: int, max_total_tokens: int, num_outputs: int) -> None:
    d = Driver()
    d.add("a", 6, max_tokens=max_tokens, max_total_tokens=max_total_tokens)
    d.run()
    assert_completed(d, "a", num_outputs, FinishReason.LENGTH)
    assert d.requests["a"].num_tokens == min(6 + max_tokens, max_total_tokens)


# -- step plans -----------------------------------------------------------------------------
def test_plan_sends_a_request_in_full_once_then_only_diffs() -> None:
    d = Driver()  # block size 4
    d.add("a", [1, 2, 3, 4, 5, 6], outputs=[7, 8, 9], max_tokens=4)
    first = d.step()
    new = first.new_requests[0]
    assert (new.request_id, new.token_ids, new.num_prompt_tokens) == ("a", [1, 2, 3, 4, 5, 6], 6)
    assert new.num_computed_tokens == 0
    assert new.params == d.requests["a"].params and new.eos_token_ids == frozenset({EOS})
    assert first.cached_requests == [] and len(new.block_ids) == 2
    d.step()  # computes position 6 (token 7): fits in block 1
    d.step()  # computes position 7 (token 8): fits in block 1
    d.step()  # computes position 8 (token 9): needs block 2
    cached = [p.cached_requests[0] for p in d.plans[1:]]
    assert all(p.new_requests == [] for p in d.plans[1:])
    assert [c.new_token_ids for c in cached] == [[7], [8], [9]]
    assert [c.num_computed_tokens for c in cached] == [6, 7, 8]
    assert [len(c.new_block_ids) for c in cached] == [0, 0, 1]
    assert cached[2].new_block_ids[0] not in new.block_ids


def test_finished_request_is_named_once_in_the_next_plan() -> None:
    d = Driver()
    d.add("a", max_tokens=1)
    d.add("b", max_tokens=3)
    d.run()
    assert d.finished_in("a") == [2]
    assert d.finished_in("b") == []  # finished in the last step: named by the next plan
    assert d.step().finished_request_ids == ["b"]
    assert d.step().finished_request_ids == []


# -- token budget and chunked prefill -------------------------------------------------------
def test_token_budget_is_respected_and_filled() -> None:
    d = Driver(max_num_tokens=16)
    for i in range(6):
        d.add(f"r{i}", 10 + i, max_tokens=5)
    plans = d.run()
    assert all(p.total_num_scheduled_tokens <= 16 for p in plans)
    assert plans[0].total_num_scheduled_tokens == 16  # more prompt tokens wait than the budget allows
    assert plans[0].num_scheduled_tokens == {"r0": 10, "r1": 6}
    for i in range(6):
        assert_completed(d, f"r{i}", 5, FinishReason.LENGTH)
    d.assert_pool_full()


def test_chunked_prefill_samples_only_on_the_final_chunk() -> None:
    d = Driver(max_num_tokens=16)
    d.add("a", 40, max_tokens=2)
    chunks = []
    for _ in range(3):
        plan = d.step()
        chunks.append(plan.num_scheduled_tokens["a"])
        if len(chunks) < 3:
            assert d.requests["a"].output_token_ids == []
    assert chunks == [16, 16, 8]
    assert d.requests["a"].output_token_ids == [default_token(0)]
    seen = d.appearances("a")
    assert isinstance(seen[0], NewRequestData) and seen[0].num_computed_tokens == 0
    assert [(s.new_token_ids, s.num_computed_tokens) for s in seen[1:]] == [([], 16), ([], 32)]
    d.run()
    assert_completed(d, "a", 2, FinishReason.LENGTH)


def test_decodes_come_before_prefill_chunks() -> None:
    d = Driver(max_num_tokens=8)
    d.add("a", 4, max_tokens=10)
    d.step()
    d.add("b", 30)
    plan = d.step()
    assert plan.num_scheduled_tokens == {"a": 1, "b": 7}
    assert list(plan.num_scheduled_tokens) == ["a", "b"]  # batch order: running first


# -- batch size and in-flight batching -------------------------------------------------------
def test_max_num_sequences_caps_the_running_batch() -> None:
    d = Driver(max_num_sequences=2)
    for i in range(5):
        d.add(f"r{i}", 4, max_tokens=3 + i)
    plans = d.run()
    assert all(len(p.num_scheduled_tokens) <= 2 for p in plans)
    assert list(plans[0].num_scheduled_tokens) == ["r0", "r1"]
    admitted_r2 = next(p.step_id for p in plans if "r2" in p.num_scheduled_tokens)
    assert admitted_r2 == 4  # r0 (3 tokens) finished in step 3
    for i in range(5):
        assert_completed(d, f"r{i}", 3 + i, FinishReason.LENGTH)


def test_request_added_mid_run_joins_the_running_batch() -> None:
    d = Driver()
    d.add("a", 5, max_tokens=8)
    d.step()
    d.step()
    d.add("b", 7, max_tokens=2)
    plan = d.step()
    assert plan.num_scheduled_tokens == {"a": 1, "b": 7}
    assert [c.request_id for c in plan.cached_requests] == ["a"]
    assert [n.request_id for n in plan.new_requests] == ["b"]
    assert d.requests["a"].num_output_tokens == 3 and d.requests["b"].num_output_tokens == 1
    d.run()
    assert_completed(d, "a", 8, FinishReason.LENGTH)
    assert_completed(d, "b", 2, FinishReason.LENGTH)


# -- priority --------------------------------------------------------------------------------
def test_higher_priority_is_admitted_first_ties_by_arrival() -> None:
    d = Driver(max_num_sequences=1)
    for request_id, priority in [("low", 0), ("high1", 5), ("mid", 1), ("high2", 5), ("low2", 0)]:
        d.add(request_id, max_tokens=1, priority=priority)
    plans = d.run()
    assert [list(p.num_scheduled_tokens) for p in plans] == [["high1"], ["high2"], ["mid"], ["low"], ["low2"]]


def test_waiting_queue_is_ordered_by_priority_then_arrival() -> None:
    rng = random.Random(0)
    scheduler = Scheduler(SchedulerConfig(), KVCacheManager(4, BLOCK_SIZE))
    reqs = [make_request(f"r{i}", [5], priority=rng.randrange(3), arrival=rng.randrange(40)) for i in range(200)]
    for req in reqs:
        scheduler.add(req)
    assert scheduler.waiting == sorted(reqs, key=lambda r: (-r.priority, r.arrival))  # ties: in the order added


def test_late_high_priority_request_overtakes_waiting_ones() -> None:
    d = Driver(max_num_sequences=1)
    d.add("first", max_tokens=2)
    d.add("second", max_tokens=1)
    d.step()
    d.add("urgent", max_tokens=1, priority=1)
    d.run()
    admitted = dict.fromkeys(r for p in d.plans for r in p.num_scheduled_tokens)
    assert list(admitted) == ["first", "urgent", "second"]


def test_priority_decides_admission_when_blocks_are_short() -> None:
    d = Driver(num_blocks=3, policy=GC)
    d.add("running", 4, max_tokens=5)  # 9 tokens: 3 blocks
    d.step()
    d.add("low", 4, max_tokens=4)
    d.add("high", 4, max_tokens=4, priority=1)
    plans = d.run()
    first = {r: next(p.step_id for p in plans if r in p.num_scheduled_tokens) for r in ("low", "high")}
    assert first["high"] < first["low"]


# -- guaranteed completion ------------------------------------------------------------------
def test_guaranteed_completion_reserves_prompt_plus_max_tokens() -> None:
    d = Driver(num_blocks=5, policy=GC)
    d.add("a", 4, max_tokens=8)  # 12 tokens: 3 blocks reserved, 1 used at first
    d.add("b", 4, max_tokens=4)  # 8 tokens: 2 blocks fit beside a's 3
    d.add("c", 4, max_tokens=1)  # 5 tokens: 2 blocks, do not fit
    plan = d.step()
    assert list(plan.num_scheduled_tokens) == ["a", "b"]
    assert d.kv.num_free_blocks == 3  # free now, but reserved for a and b
    while "b" in d.scheduler.requests:
        assert "c" not in d.step().num_scheduled_tokens
    assert list(d.step().num_scheduled_tokens) == ["a", "c"]  # b's blocks fit c beside a's reservation
    d.run()
    assert d.scheduler.stats.num_preemptions == 0
    d.assert_pool_full()


def test_guaranteed_completion_reservation_is_capped_by_max_total_tokens() -> None:
    d = Driver(num_blocks=4, policy=GC)
    d.add("a", 4, max_tokens=100, max_total_tokens=8)  # 2 blocks, not 26
    d.add("b", 4, max_tokens=4)
    assert list(d.step().num_scheduled_tokens) == ["a", "b"]


@pytest.mark.parametrize(("prefix_caching", "admitted"), [(True, ["a", "b"]), (False, ["a"])])
def test_guaranteed_completion_reserves_nothing_for_shared_prefix_blocks(
    prefix_caching: bool, admitted: list[str]
) -> None:
    d = Driver(num_blocks=5, policy=GC, prefix_caching=prefix_caching)
    shared = list(range(100, 108))
    d.add("a", [*shared, 1], max_tokens=3)  # 12 tokens: 3 blocks
    d.step()
    d.add("b", [*shared, 2], max_tokens=3)  # 3 blocks, 2 of them a's: 1 more fits beside a
    assert list(d.step().num_scheduled_tokens) == admitted
    d.run()
    assert d.scheduler.stats.num_preemptions == 0


def test_guaranteed_completion_never_preempts_under_a_tiny_cache() -> None:
    d = Driver(num_blocks=6, max_num_tokens=16, policy=GC)
    for i in range(8):
        d.add(f"r{i}", 5 + i % 3, max_tokens=6 + i % 4)
    plans = d.run()
    assert d.scheduler.stats.num_preemptions == 0
    assert max(len(p.num_scheduled_tokens) for p in plans) < 8  # the cache really was too small for all
    assert all(d.requests[r].is_finished for p in plans for r in p.finished_request_ids)
    for i in range(8):
        assert_completed(d, f"r{i}", 6 + i % 4, FinishReason.LENGTH)
        assert d.requests[f"r{i}"].num_preemptions == 0
    d.assert_pool_full()


# -- max utilization and preemption ---------------------------------------------------------
def _crowd(d: Driver, n: int = 4) -> None:
    for i in range(n):
        d.add(f"r{i}", 6, max_tokens=12)  # 18 tokens: 5 blocks each at the end


def test_max_utilization_admits_more_than_guaranteed_completion() -> None:
    firsts = {}
    for policy in (GC, MU):
        d = Driver(num_blocks=10, policy=policy)
        _crowd(d)
        firsts[policy] = len(d.step().num_scheduled_tokens)
    assert firsts == {GC: 2, MU: 4}


def test_max_utilization_preempts_newest_and_recomputes_it() -> None:
    d = Driver(num_blocks=10)
    _crowd(d)
    d.run()
    d.step()  # names the last finished requests
    assert d.scheduler.stats.num_preemptions > 0
    preempted = [r for r, req in d.requests.items() if req.num_preemptions > 0]
    assert "r3" in preempted and "r0" not in preempted  # the newest goes first, the oldest never
    for request_id in d.requests:
        assert_completed(d, request_id, 12, FinishReason.LENGTH)
    for request_id in preempted:
        seen = d.appearances(request_id)
        comebacks = [i for i, s in enumerate(seen) if isinstance(s, NewRequestData)][1:]
        assert len(comebacks) == d.requests[request_id].num_preemptions
        assert len(d.finished_in(request_id)) == len(comebacks) + 1  # each preemption, then the finish
        for i in comebacks:  # sent again in full: prompt and the output so far
            assert seen[i].token_ids[6:] == d.expected_outputs(request_id, len(seen[i].token_ids) - 6)
    d.assert_pool_full()


def test_preempted_request_is_named_finished_before_it_comes_back() -> None:
    d = Driver(num_blocks=10)
    _crowd(d)
    while d.scheduler.stats.num_preemptions == 0:
        plan = d.step()
    victim = plan.finished_request_ids[0]
    assert victim not in plan.num_scheduled_tokens
    assert d.requests[victim].status is RequestStatus.WAITING and d.requests[victim].block_ids == []
    d.run()
    comeback = next(p for p in d.plans if p.step_id > plan.step_id and victim in p.num_scheduled_tokens)
    assert victim in [n.request_id for n in comeback.new_requests]


def test_preemption_takes_lowest_priority_before_newest() -> None:
    d = Driver(num_blocks=10)
    d.add("old_low", 6, max_tokens=12, priority=0)
    for i in range(3):
        d.add(f"new_high{i}", 6, max_tokens=12, priority=1)
    d.step()  # all four admitted (old_low first, by priority it is last)
    while d.scheduler.stats.num_preemptions == 0:
        d.step()
    assert d.requests["old_low"].num_preemptions == 1
    assert all(d.requests[f"new_high{i}"].num_preemptions == 0 for i in range(3))


def test_preempted_outputs_match_an_unconstrained_run() -> None:
    tight, roomy = Driver(num_blocks=8, max_num_tokens=12), Driver(num_blocks=200, max_num_tokens=12)
    for d in (tight, roomy):
        for i in range(5):
            d.add(f"r{i}", 3 + 2 * i, max_tokens=9 - i, outputs=[50 + i, 60 + i, 70 + i])
        d.run()
    assert tight.scheduler.stats.num_preemptions > 0 and roomy.scheduler.stats.num_preemptions == 0
    assert {r: q.output_token_ids for r, q in tight.requests.items()} == {
        r: q.output_token_ids for r, q in roomy.requests.items()
    }
    tight.assert_pool_full()


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("num_blocks", [8, 200])
def test_pipelined_plans_hold_disjoint_requests_and_give_the_same_outputs(depth: int, num_blocks: int) -> None:
    piped = Driver(num_blocks=num_blocks, max_num_tokens=12, micro_batches=depth)
    serial = Driver(num_blocks=200, max_num_tokens=12)
    for d in (piped, serial):
        for i in range(6):
            d.add(f"r{i}", 3 + 2 * i, max_tokens=9 - i, outputs=[50 + i, 60 + i, 70 + i])
    most = piped.run_pipelined(depth)
    serial.run()
    assert most == depth  # the pipeline was full at some point
    decode_plans = [p for p in piped.plans if p.num_scheduled_tokens and not p.new_requests]
    assert all(len(p.num_scheduled_tokens) <= -(-6 // depth) for p in decode_plans)  # each a share of the batch
    assert {r: q.output_token_ids for r, q in piped.requests.items()} == {
        r: q.output_token_ids for r, q in serial.requests.items()
    }
    assert (piped.scheduler.stats.num_preemptions > 0) == (num_blocks == 8)
    piped.assert_pool_full()


def test_a_plan_in_flight_does_not_stop_waiting_prompts() -> None:
    """One rank, two plans in flight: a prompt in flight cannot run ahead (it has no token to
    sample yet for the next plan), so the next plan admits the waiting one instead."""
    d = Driver(num_blocks=200, max_num_tokens=8, micro_batches=2, run_ahead=True)
    d.add("a", 8, max_tokens=4)
    d.add("b", 8, max_tokens=4)
    first = d.schedule()
    assert list(first.num_scheduled_tokens) == ["a"]
    second = d.schedule()  # "a" is in flight and "b" waits: admitted now, not held back
    assert list(second.num_scheduled_tokens) == ["b"]
    d.complete(first)
    d.complete(second)
    d.run_pipelined(2)
    assert all(d.requests[r].num_output_tokens == 4 for r in "ab")


def ran_ahead(d: Driver, request_id: str) -> list[int]:
    """Outputs on the host each time the request was scheduled one token past them (run ahead)."""
    known, found = 0, []
    for plan in d.plans:
        for data in [*plan.new_requests, *plan.cached_requests]:
            if data.request_id != request_id:
                continue
            if isinstance(data, NewRequestData):
                known, prompt = len(data.token_ids), data.num_prompt_tokens
            else:
                known += len(data.new_token_ids)
            if data.num_computed_tokens + plan.num_scheduled_tokens[request_id] > known:
                found.append(known - prompt)
    return found


def test_run_ahead_schedules_every_decode_while_its_token_is_in_flight() -> None:
    """One rank, two plans in flight (run_ahead): each plan takes every decoding request, those in the
    plan in flight one token ahead, so the batch is never split and no plan is empty while they
    decode. A request that stops on the token in flight drops the step run ahead of it; outputs equal
    a serial run's, the fake ranks' KV check passes at every step, and every block comes back."""
    d = Driver(num_blocks=200, max_num_tokens=64, micro_batches=2, run_ahead=True)
    serial = Driver(num_blocks=200, max_num_tokens=64)
    for drv in (d, serial):
        drv.add("a", 5, max_tokens=7, outputs=[50, 51])
        drv.add("b", 9, max_tokens=5)
        drv.add("stops", 6, max_tokens=8, outputs=[60, 61, EOS])
        for i in range(5):
            drv.add(f"r{i}", 4, max_tokens=6)
    d.run_pipelined(2)
    serial.run()
    assert {r: q.output_token_ids for r, q in d.requests.items()} == {
        r: q.output_token_ids for r, q in serial.requests.items()
    }
    assert d.requests["stops"].finish_reason is FinishReason.STOP and d.requests["stops"].num_output_tokens == 3
    busy = [p.step_id for p in d.plans if p.num_scheduled_tokens]  # the plan after the prompts' is empty
    assert busy[1:] == list(range(busy[1], busy[-1] + 1)), "a plan was empty while requests decoded"
    # one token on the host, one in flight: ahead until the last one (a: outputs 1-5 of 7, b: 1-3 of 5)
    assert ran_ahead(d, "a") == [1, 2, 3, 4, 5] and ran_ahead(d, "b") == [1, 2, 3]
    assert max(len(p.num_scheduled_tokens) for p in d.plans) == 8  # the batch is never split
    d.assert_pool_full()


@pytest.mark.parametrize(("old_priority", "new_priority", "victim"), [(0, 0, "new"), (1, 0, "new"), (0, 1, "old")])
def test_run_ahead_preempts_the_newest_lowest_priority_though_it_is_in_flight(
    old_priority: int, new_priority: int, victim: str
) -> None:
    """Running ahead, every request is in flight when "old" needs a block: the victim is still the
    newest of the lowest priority, held out of one plan so that the next can preempt it (not the
    request that happened to need the block). Outputs equal a serial run's."""
    d = Driver(num_blocks=6, max_num_tokens=64, micro_batches=2, run_ahead=True)
    serial = Driver(num_blocks=6, max_num_tokens=64)
    for drv in (d, serial):
        drv.add("old", 6, max_tokens=10, priority=old_priority)  # 2 blocks, a 3rd at its 3rd output
        drv.add("new", 12, max_tokens=10, priority=new_priority)  # 3 blocks, the last free one at its 2nd
    d.run_pipelined(2)
    serial.run()
    assert {r: q.num_preemptions > 0 for r, q in d.requests.items()} == {"old": victim == "old", "new": victim == "new"}
    assert {r: q.output_token_ids for r, q in d.requests.items()} == {
        r: q.output_token_ids for r, q in serial.requests.items()
    }
    d.assert_pool_full()


@pytest.mark.parametrize(
    ("sampling", "runs_ahead"),
    [
        ({"repetition_penalty": 1.2}, False),  # the penalty reads every earlier token
        ({"logprobs": 2}, False),  # sampled on the host
        ({"seed": 7, "temperature": 0.8}, True),  # its noise needs the output index only, which the rank keeps
        ({"min_tokens": 4}, True),  # ... and so does the ban of end ids before min_tokens
    ],
)
def test_only_sampling_that_reads_earlier_tokens_waits_for_them(sampling: dict[str, Any], runs_ahead: bool) -> None:
    """A request whose next token depends on the tokens themselves on the host waits for its token:
    it is never in two plans in flight at once. Seeded sampling and min_tokens run ahead like greedy."""
    d = Driver(num_blocks=200, max_num_tokens=64, micro_batches=2, run_ahead=True)
    d.add("plain", 5, max_tokens=8)
    d.add("other", 5, max_tokens=8, sampling=sampling)
    d.run_pipelined(2)
    assert ran_ahead(d, "plain") == [1, 2, 3, 4, 5, 6]
    assert ran_ahead(d, "other") == (ran_ahead(d, "plain") if runs_ahead else [])
    assert d.requests["other"].num_output_tokens == 8
    d.assert_pool_full()


# -- abort in every state -------------------------------------------------------------------
def _abort_and_check(d: Driver, request_id: str, *, was_sent: bool) -> None:
    """Abort, then check: returned, finished as ABORT, blocks back, named in the next plan iff sent."""
    pool = d.kv.pool
    released = sum(1 for b in d.requests[request_id].block_ids if pool.blocks[b].ref_cnt == 1)
    free_before = d.kv.num_free_blocks
    req = d.abort(request_id)
    assert req is d.requests[request_id]
    assert req.status is RequestStatus.FINISHED and req.finish_reason is FinishReason.ABORT
    assert req.block_ids == [] and d.kv.num_free_blocks == free_before + released
    assert request_id not in d.scheduler.requests and req not in d.scheduler.waiting + d.scheduler.running
    assert d.abort(request_id) is None  # aborting again does nothing
    plan = d.step()
    assert request_id not in plan.num_scheduled_tokens
    assert (request_id in plan.finished_request_ids) == was_sent
    d.run()
    assert d.scheduler.stats.finished.get("abort") == 1
    d.assert_pool_full()


def test_abort_waiting_request() -> None:
    d = Driver(max_num_sequences=1)
    d.add("a", max_tokens=3)
    d.add("b", max_tokens=3)
    d.step()
    _abort_and_check(d, "b", was_sent=False)
    assert_completed(d, "a", 3, FinishReason.LENGTH)
    assert d.appearances("b") == []


def test_abort_running_mid_chunked_prefill() -> None:
    d = Driver(max_num_tokens=8)
    d.add("a", 20)
    d.step()
    assert 0 < d.requests["a"].num_computed_tokens < 20 and d.requests["a"].block_ids
    d.add("b", 4, max_tokens=2)
    _abort_and_check(d, "a", was_sent=True)
    assert d.requests["a"].output_token_ids == []
    assert_completed(d, "b", 2, FinishReason.LENGTH)


def test_abort_running_decoding_request() -> None:
    d = Driver()
    d.add("a", max_tokens=10)
    d.add("b", max_tokens=4)
    for _ in range(3):
        d.step()
    assert d.requests["a"].num_output_tokens == 3
    _abort_and_check(d, "a", was_sent=True)
    assert d.requests["a"].num_output_tokens == 3
    assert_completed(d, "b", 4, FinishReason.LENGTH)


def test_abort_preempted_waiting_request() -> None:
    d = Driver(num_blocks=10)
    _crowd(d)
    while d.scheduler.stats.num_preemptions == 0:
        d.step()
    victim = next(r for r in d.requests.values() if r.num_preemptions)
    assert victim.status is RequestStatus.WAITING
    named = d.finished_in(victim.request_id)
    assert len(named) == 1  # told to the ranks when preempted ...
    _abort_and_check(d, victim.request_id, was_sent=False)  # ... and not again on abort
    assert d.finished_in(victim.request_id) == named


def test_abort_while_its_step_runs() -> None:
    d = Driver()
    d.add("a", max_tokens=5)
    d.add("b", max_tokens=5)
    d.step()
    plan = d.schedule()
    d.abort("a")
    touched = d.complete(plan)  # the fake model still samples for "a"; the scheduler drops it
    assert [r.request_id for r in touched] == ["b"]
    assert d.requests["a"].num_output_tokens == 1
    assert d.step().finished_request_ids == ["a"]
    d.run()
    d.assert_pool_full()


def test_abort_finished_or_unknown_returns_none() -> None:
    d = Driver()
    d.add("a", max_tokens=1)
    d.run()
    assert d.abort("a") is None
    assert d.abort("nope") is None
    assert d.requests["a"].finish_reason is FinishReason.LENGTH
    assert d.scheduler.stats.finished == {"length": 1}


def test_abort_everything_in_mixed_states_frees_the_pool() -> None:
    d = Driver(num_blocks=12, max_num_tokens=10)
    for i in range(6):
        d.add(f"r{i}", 4 + 3 * i, max_tokens=20)
    for _ in range(6):
        d.step()
    states = {r.status for r in d.scheduler.requests.values()}
    assert states == {RequestStatus.WAITING, RequestStatus.RUNNING}
    for request_id in list(d.scheduler.requests):
        assert d.abort(request_id) is not None
    d.assert_pool_full()
    assert not d.scheduler.has_unfinished()
    known_to_ranks = set(d.ranks.views)
    assert known_to_ranks and set(d.step().finished_request_ids) == known_to_ranks


# -- randomized ------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [GC, MU])
@pytest.mark.parametrize("seed", range(4))
def test_random_workload_keeps_every_invariant(policy: SchedulerPolicy, seed: int) -> None:
    """Arrivals, shared prefixes, priorities, EOS, aborts and a tight cache; the driver checks each step."""
    rng = random.Random(seed)
    d = Driver(num_blocks=24, max_num_tokens=rng.choice([6, 16, 32]), max_num_sequences=4, policy=policy)
    shared = [rng.randrange(3, 500) for _ in range(12)]
    expected: dict[str, int] = {}
    for i in range(24):
        prompt = shared[: rng.randrange(0, 12)] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 10))]
        max_tokens = rng.randrange(1, 12)
        eos_at = rng.randrange(0, 16)
        outputs = [EOS if k == eos_at else 600 + k for k in range(max_tokens)]
        d.add(f"r{i}", prompt, outputs=outputs, max_tokens=max_tokens, priority=rng.randrange(3))
        expected[f"r{i}"] = min(max_tokens, eos_at + 1)
        for _ in range(rng.randrange(3)):
            d.step()
        if rng.random() < 0.15 and d.scheduler.requests:
            d.abort(rng.choice(sorted(d.scheduler.requests)))
    d.run()
    d.step()
    d.assert_pool_full()
    assert d.ranks.views == {}, "every request sent to the ranks was named finished"
    for request_id, req in d.requests.items():
        if req.finish_reason is not FinishReason.ABORT:
            assert req.output_token_ids == d.expected_outputs(request_id, expected[request_id])
    if policy is GC:
        assert d.scheduler.stats.num_preemptions == 0
