"""In-flight batching scheduler. Plain Python: no torch.

Each step mixes the next token of every running request with (chunked) prefill of
waiting ones, within `max_num_tokens` tokens and `max_num_sequences` requests. There is
one code path for prefill and decode: a request needs `num_tokens - num_computed_tokens`
more tokens computed, and gets as many as the budget allows.

Policies (Triton TensorRT-LLM backend names):
- guaranteed_completion: a request is admitted only when blocks for prompt + max_tokens
  can be reserved beside the reservations of the running ones; nothing is ever preempted.
- max_utilization: admit while blocks for the scheduled chunk are free; when a running
  request cannot grow, preempt the newest (lowest priority first) and recompute it later.
Waiting requests are admitted by priority (higher first), then by arrival.

Pipeline parallelism keeps several plans in flight: a request stays "in flight" from the
plan that schedules it until `update` gets that plan's result, and is neither scheduled
nor preempted meanwhile, so the next micro-batch is made of the other requests. With
`micro_batches` = n, a plan takes at most 1/n of the running requests, so n plans fill the pipeline.

One rank with two plans in flight (async scheduling on a GPU) does not split the batch: a decode
step reads every weight whatever its batch, so two half plans cost more than one. With `run_ahead`
every plan takes every running request, those in flight too: a decoding request is scheduled one
token ahead of what the host knows, its input id being the token the plan in flight samples for it,
which the rank keeps on the device (vLLM's async scheduling). Only requests whose sampling reads
no earlier token run ahead (no repetition penalty, bad words or log-probabilities), and only with
room for two more tokens; the others wait for their token.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from shardserve.config import SchedulerConfig, SchedulerPolicy
from shardserve.engine.kv_cache import CachedPrefix, KVCacheManager
from shardserve.engine.request import FinishReason, Request, RequestStatus
from shardserve.engine.step import CachedRequestData, NewRequestData, StepPlan, StepResult


@dataclass(slots=True)
class _Sent:
    """What the ranks already know of a request."""

    num_tokens: int
    num_blocks: int


@dataclass(slots=True)
class SchedulerStats:
    num_steps: int = 0
    num_computed_tokens: int = 0  # tokens run through the model (prefix hits excluded)
    num_preemptions: int = 0
    num_run_ahead: int = 0  # tokens scheduled while the plan that samples their id was in flight
    finished: dict[str, int] = field(default_factory=dict)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        micro_batches: int = 1,
        run_ahead: bool = False,
    ) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.micro_batches = micro_batches  # plans in flight at once: each takes ~1/n of the running requests
        self.run_ahead = run_ahead  # one plan takes every request, those in flight one token ahead
        self.waiting: list[Request] = []  # sorted by (-priority, arrival)
        self.running: list[Request] = []  # admission order
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._sent: dict[str, _Sent] = {}
        self._finished_ids: list[str] = []  # to tell the ranks on the next step
        self._in_flight: dict[int, list[Request]] = {}  # step id -> requests of a plan still in flight
        self._step_id = 0

    # -- requests in and out -------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self._enqueue(req)

    def abort(self, request_id: str) -> Request | None:
        """Stop a request in any state; returns it, or None if it is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        self.finish(req, FinishReason.ABORT)
        return req

    def finish(self, req: Request, reason: FinishReason) -> None:
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        elif req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.kv_cache.free(req)
        self._forget_sent(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]
        self.stats.finished[reason.value] = self.stats.finished.get(reason.value, 0) + 1

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.config.max_num_tokens
        scheduled: dict[str, int] = {}
        ahead: set[str] = set()  # scheduled one token past what the host knows
        budget, short = self._schedule_running(budget, scheduled, ahead)
        if not short:
            self._schedule_waiting(budget, scheduled)
        self._step_id += 1
        if scheduled:
            self._in_flight[self._step_id] = [self.requests[r] for r in scheduled]
            for req in self._in_flight[self._step_id]:
                req.in_flight += 1
        plan = self._make_plan(scheduled, ahead)
        self.stats.num_run_ahead += len(ahead)
        self.stats.num_steps += 1
        self.stats.num_computed_tokens += plan.total_num_scheduled_tokens
        return plan

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply a step's result; returns the requests that got a token (some now finished)."""
        owners = self._in_flight.pop(plan.step_id, None)  # the plan's requests, in its batch order
        if owners is None:
            return []  # an empty plan
        touched: list[Request] = []
        sampled, logprobs = result.sampled_token_ids, result.logprobs
        for req, (request_id, n) in zip(owners, plan.num_scheduled_tokens.items(), strict=True):
            req.in_flight -= 1
            if self.requests.get(request_id) is not req:
                continue  # aborted while the step ran (its id may already name a new request)
            req.num_computed_tokens += n
            token = sampled.get(request_id)
            if token is None:
                continue
            req.output_token_ids.append(token)
            if request_id in logprobs:
                req.output_logprobs.append(logprobs[request_id])
            touched.append(req)
            reason = self._stop_reason(req, token)
            if reason is not None:
                self.finish(req, reason)
        return touched

    # -- internals -------------------------------------------------------------------------
    def _schedule_running(self, budget: int, scheduled: dict[str, int], ahead: set[str]) -> tuple[int, bool]:
        """Schedule running requests (oldest first); returns the budget left and whether blocks ran short
        (a request was preempted or a victim held back: then no prompt is admitted in this plan)."""
        short = False
        share = len(self.running) if self.run_ahead else -(-len(self.running) // self.micro_batches)
        held: set[str] = set()  # victims still in flight, kept out of this plan to be preempted in the next
        for req in list(self.running):
            if budget <= 0 or len(scheduled) >= share:
                break
            if req.status is not RequestStatus.RUNNING or req.request_id in held:
                continue  # preempted or held back earlier in this loop
            pending = 0  # tokens in flight this plan computes: the one the plan in flight samples
            if req.in_flight:
                if not (self.run_ahead and _can_run_ahead(req)):
                    continue  # still in the pipeline
                pending = 1
            n = 1 if pending else min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv_cache.can_allocate(req, pending + n):  # (a decode mostly has room in its last block)
                fits, given_back, preempting = self._make_room(req, pending + n, scheduled, ahead, held)
                budget += given_back
                short |= preempting
                if not fits:
                    continue
            self.kv_cache.allocate(req, pending + n)
            scheduled[req.request_id] = n
            budget -= n
            if pending:
                ahead.add(req.request_id)
        return budget, short

    def _make_room(
        self, req: Request, tokens: int, scheduled: dict[str, int], ahead: set[str], held: set[str]
    ) -> tuple[bool, int, bool]:
        """Preempt victims until `req` has blocks for `tokens` more tokens. Returns (it fits, plan tokens
        given back by victims scheduled earlier in this plan, whether any victim was taken or held)."""
        given_back, taken = 0, False
        while not self.kv_cache.can_allocate(req, tokens):
            if self.config.policy is SchedulerPolicy.GUARANTEED_COMPLETION:
                raise RuntimeError(f"request {req.request_id} outgrew its reserved blocks")
            victim = self._victim()
            if victim is None:
                return False, given_back, taken  # the only candidates are in flight: wait for them
            taken = True
            if victim.in_flight:  # run ahead: its result is still to come
                held.add(victim.request_id)
                return False, given_back + self._unschedule(victim, scheduled, ahead), taken
            given_back += scheduled.pop(victim.request_id, 0)
            self._preempt(victim)
            if victim is req:
                return False, given_back, taken
        return True, given_back, taken

    def _schedule_waiting(self, budget: int, scheduled: dict[str, int]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_sequences:
            req = self.waiting[0]
            prefix = self.kv_cache.find_cached_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens - prefix.num_tokens, budget)
            if not self._can_admit(req, n, prefix):
                break
            self.waiting.pop(0)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = prefix.num_tokens
            self.kv_cache.allocate(req, n, prefix)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled[req.request_id] = n
            budget -= n

    def _can_admit(self, req: Request, n: int, prefix: CachedPrefix) -> bool:
        if self.config.policy is SchedulerPolicy.MAX_UTILIZATION:
            return self.kv_cache.can_allocate(req, n, prefix)
        kv = self.kv_cache
        outstanding = sum(max(0, kv.blocks_needed(r.max_final_tokens) - len(r.block_ids)) for r in self.running)
        mine = kv.blocks_needed(req.max_final_tokens) - len(prefix.block_ids)
        return kv.num_free_blocks - kv.pool.num_free_among(prefix.block_ids) - outstanding >= mine

    def _victim(self) -> Request | None:
        """The preemption victim: lowest priority, newest. In a pipeline never one still in flight (the
        next micro-batch is made of the others). Running ahead, every request is in flight in most
        plans: the victim is chosen among all, and one in flight is held out of the plan being made,
        so that the next plan can preempt it (the request that needs its blocks waits meanwhile)."""
        candidates = self.running if self.run_ahead else [r for r in self.running if not r.in_flight]
        return min(candidates, key=lambda r: (r.priority, -r.arrival)) if candidates else None

    def _unschedule(self, req: Request, scheduled: dict[str, int], ahead: set[str]) -> int:
        """Take `req` out of the plan being made (the blocks it got stay its own); returns its tokens."""
        ahead.discard(req.request_id)
        return scheduled.pop(req.request_id, 0)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv_cache.free(req)
        self._forget_sent(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.stats.num_preemptions += 1
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        bisect.insort(self.waiting, req, key=_queue_order)

    def _forget_sent(self, req: Request) -> None:
        if self._sent.pop(req.request_id, None) is not None:
            self._finished_ids.append(req.request_id)

    def _make_plan(self, scheduled: dict[str, int], ahead: set[str]) -> StepPlan:
        new: list[NewRequestData] = []
        cached: list[CachedRequestData] = []
        for request_id in scheduled:
            req = self.requests[request_id]
            num_tokens, num_blocks = req.num_tokens, len(req.block_ids)
            sent = self._sent.get(request_id)
            if sent is None:
                new.append(_new_request_data(req))
                self._sent[request_id] = _Sent(num_tokens, num_blocks)
                continue
            cached.append(
                CachedRequestData(
                    request_id,
                    req.tokens_from(sent.num_tokens),
                    req.block_ids[sent.num_blocks :],
                    req.num_computed_tokens + (request_id in ahead),  # + the token its plan in flight computes
                )
            )
            sent.num_tokens, sent.num_blocks = num_tokens, num_blocks
        finished, self._finished_ids = self._finished_ids, []
        return StepPlan(self._step_id, new, cached, scheduled, finished)

    @staticmethod
    def _stop_reason(req: Request, token: int) -> FinishReason | None:
        if req.num_output_tokens >= req.params.min_tokens:
            if token in req.eos_token_ids or token in req.params.stop_token_ids:
                return FinishReason.STOP
        if req.max_tokens_left == 0:
            return FinishReason.LENGTH
        return None


def _queue_order(req: Request) -> tuple[int, int]:
    """Waiting requests' order: higher priority first, then earlier arrival."""
    return -req.priority, req.arrival


def _can_run_ahead(req: Request) -> bool:
    """Its plan in flight computes its last known token (so samples the next one), and the plan after
    may use that token without the host seeing it: sampling that reads no earlier token (a seed and
    min_tokens need only the count, which the rank keeps), room for two more tokens."""
    p = req.params
    return (
        req.in_flight == 1
        and req.num_computed_tokens == req.num_tokens - 1
        and req.max_tokens_left >= 2
        and p.repetition_penalty == 1.0
        and p.logprobs is None
        and not req.bad_words_ids
    )


def _new_request_data(req: Request) -> NewRequestData:
    return NewRequestData(
        request_id=req.request_id,
        token_ids=list(req.token_ids),
        num_prompt_tokens=len(req.prompt_token_ids),
        params=req.params,
        eos_token_ids=req.eos_token_ids,
        bad_words_ids=req.bad_words_ids,
        block_ids=list(req.block_ids),
        num_computed_tokens=req.num_computed_tokens,
    )
