"""Executes one `StepPlan` on this rank: keeps per-request state, builds the flat batch,
runs the model over the paged KV cache and samples the requests whose chunk ends the prompt.

With pipeline parallelism a rank runs only its stage: it receives the residual stream
[tokens, hidden] from the previous stage and sends its own to the next (`StageLinks`); the
last stage's tp rank 0 samples. Every rank applies every plan (positions, block tables).

A single rank keeps the last step's sampled tokens on the device: a request the scheduler runs
ahead (scheduled again while its token was in flight) has one token more to compute than the plans
told this rank, and that token's id is copied from there on the device, never through the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from shardserve.comm.base import DEFAULT, Communicator, PendingSend
from shardserve.engine.request import SamplingParams
from shardserve.engine.sampler import Sampler, SamplingRow
from shardserve.engine.step import CachedRequestData, NewRequestData, StepPlan, StepResult
from shardserve.workers.attention import AttentionBackend, AttentionMetadata, ForwardContext, SeqSpan, to_device

if TYPE_CHECKING:
    from shardserve.workers.cuda_graphs import DecodeGraphs


@dataclass(slots=True)
class _RequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    bad_words_ids: tuple[tuple[int, ...], ...]
    block_ids: list[int]
    num_computed_tokens: int
    # its sampling rows with 0 and 1 outputs pending, made once: they read `token_ids`, which only grows in place
    rows: tuple[SamplingRow, SamplingRow] = field(init=False)

    def __post_init__(self) -> None:
        row = SamplingRow(self.params, self.token_ids, self.num_prompt_tokens, self.eos_token_ids, self.bad_words_ids)
        self.rows = (row, replace(row, num_pending=1))


@dataclass(frozen=True, slots=True)
class _Batch:
    ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    meta: AttentionMetadata
    sample_ids: list[str]  # requests sampled this step
    ahead_ids: frozenset[str]  # ... of which these run ahead (one output still on the device)
    sample_index: torch.Tensor  # [sampled] flat index of each one's last token
    decode_only: bool  # every sequence has one token this step


@dataclass(slots=True)
class Launched:
    """A step started by `ModelRunner.launch`: its result, or its tokens still on their way."""

    result: StepResult | None
    step_id: int = 0
    sample_ids: list[str] | None = None
    tokens: torch.Tensor | None = None  # pinned host memory, filled once `ready` has passed
    ready: torch.cuda.Event | None = None


@dataclass(frozen=True, slots=True)
class StageLinks:
    """Where this rank's stage sits in the pipeline (global ranks over `comm`)."""

    comm: Communicator
    prev: int | None  # the rank that sends this one its input hidden states (None: first stage)
    next: int | None  # the rank this one sends its output to (None: last stage)
    samples: bool  # this rank samples (last stage, tp rank 0)
    hidden_size: int
    dtype: torch.dtype


@dataclass(slots=True)
class RunnerTimes:
    busy_s: float = 0.0  # running the model and sampling
    recv_wait_s: float = 0.0  # waiting for the previous stage's hidden states
    steps: int = 0
    first_start: float = 0.0  # perf_counter at the first step's start
    last_end: float = 0.0  # ... and at the latest step's end

    @property
    def wall_s(self) -> float:
        return self.last_end - self.first_start

    @property
    def bubble(self) -> float:
        """Share of this rank's wall time (first step to last) it was not computing."""
        return 1.0 - self.busy_s / self.wall_s if self.wall_s > 0 else 0.0


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        backend: AttentionBackend,
        sampler: Sampler,
        device: torch.device,
        links: StageLinks | None = None,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.links = links
        self.graphs = graphs  # captured decode steps (a CUDA rank of a world of one or of tp ranks alone)
        self.requests: dict[str, _RequestState] = {}
        self.times = RunnerTimes()
        self._sent: PendingSend | None = None  # the last hidden states posted to the next stage
        # the last step's sampled requests and their tokens (on the device, or a host list)
        self._sampled: tuple[list[str], torch.Tensor | list[int]] | None = None

    def execute(self, plan: StepPlan) -> StepResult:
        return self.finish(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> Launched:
        """Start a step; on CUDA a batch without log-probabilities returns before its tokens reach
        the host, so the leader can prepare the next step while the GPU works (`finish` waits)."""
        self._apply(plan)
        if plan.is_empty:
            return Launched(StepResult(plan.step_id))
        batch = self._prepare(plan)
        self._sampled = None
        if not self.times.steps:
            self.times.first_start = time.perf_counter()
        hidden_in = self._receive(len(batch.ids))
        start = time.perf_counter()
        if self.graphs is not None and batch.decode_only and self.graphs.fits(len(batch.ids)):
            logits = self.graphs.run(batch.ids, batch.positions, batch.meta)  # type: ignore[arg-type]
            if self.links is None or self.links.samples:  # of tp ranks, rank 0 samples
                launched = self._sample(plan, batch, logits[batch.sample_index])
            else:
                launched = Launched(StepResult(plan.step_id))
        else:
            ctx = ForwardContext(batch.meta, self.kv_caches, self.backend)
            hidden = self.model(batch.ids, batch.positions, ctx, hidden=hidden_in)
            launched = self._finish(plan, batch, hidden)
        for request_id, n in plan.num_scheduled_tokens.items():
            self.requests[request_id].num_computed_tokens += n
        self.times.last_end = time.perf_counter()
        self.times.busy_s += self.times.last_end - start
        self.times.steps += 1
        return launched

    def finish(self, launched: Launched) -> StepResult:
        """The step's result, once its sampled tokens are on the host."""
        if launched.result is not None:
            return launched.result
        assert launched.tokens is not None and launched.ready is not None
        self._wait(launched.ready)
        return StepResult(launched.step_id, dict(zip(launched.sample_ids, launched.tokens.tolist(), strict=True)))

    def _receive(self, num_tokens: int) -> torch.Tensor | None:
        links = self.links
        if links is None or links.prev is None:
            return None
        start = time.perf_counter()
        hidden = torch.empty(num_tokens, links.hidden_size, dtype=links.dtype, device=self.device)
        links.comm.recv(hidden, src=links.prev)  # the previous stage's residual stream [tokens, hidden]
        self.times.recv_wait_s += time.perf_counter() - start
        return hidden

    def _finish(self, plan: StepPlan, batch: _Batch, hidden: torch.Tensor) -> Launched:
        links = self.links
        if links is not None and links.next is not None:
            self.flush()  # at most one send in flight: the next stage takes them in order
            self._sent = links.comm.isend(hidden.contiguous(), dst=links.next)
            return Launched(StepResult(plan.step_id))
        if not batch.sample_ids:
            return Launched(StepResult(plan.step_id))
        logits = self.model.compute_logits(hidden[batch.sample_index])  # [sampled, vocab]
        if links is not None and not links.samples:
            return Launched(StepResult(plan.step_id))
        return self._sample(plan, batch, logits)

    def _sample(self, plan: StepPlan, batch: _Batch, logits: torch.Tensor) -> Launched:
        if not batch.sample_ids:
            return Launched(StepResult(plan.step_id))
        rows = [self.requests[r].rows[int(r in batch.ahead_ids)] for r in batch.sample_ids]
        tokens = self.sampler.device_tokens(logits, rows) if self.device.type == "cuda" else None
        if tokens is not None:  # copy to pinned host memory behind the step's kernels; `finish` waits
            self._sampled = (batch.sample_ids, tokens)
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return Launched(None, plan.step_id, batch.sample_ids, host, ready)
        if self.device.type == "cuda":  # the host sampler reads the logits: wait for them under the deadline
            self.synchronize()
        out = self.sampler(logits, rows)
        self._sampled = (batch.sample_ids, out.token_ids)
        logprobs = {r: lp for r, lp in zip(batch.sample_ids, out.logprobs, strict=True) if lp is not None}
        return Launched(StepResult(plan.step_id, dict(zip(batch.sample_ids, out.token_ids, strict=True)), logprobs))

    def _wait(self, event: torch.cuda.Event) -> None:
        """Until the GPU reaches `event`; on NCCL ranks under the rank board's deadline, so a dead
        or stopped peer inside this step's collectives is named instead of hanging the host."""
        wait_event = getattr(self.links.comm, "wait_event", None) if self.links is not None else None
        if wait_event is None:
            event.synchronize()
        else:
            wait_event(event, DEFAULT, "this step's GPU work")

    def synchronize(self) -> None:
        """Wait until the GPU ran everything queued (a tp peer that died is named, not waited on)."""
        event = torch.cuda.Event()
        event.record()
        self._wait(event)

    def flush(self) -> None:
        """Wait until the next stage has taken the last hidden states sent to it."""
        if self._sent is not None:
            self._sent.wait()
            self._sent = None

    def _apply(self, plan: StepPlan) -> None:
        for request_id in plan.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in plan.new_requests:
            self.requests[new.request_id] = _state(new)
        for diff in plan.cached_requests:
            self._apply_diff(diff)

    def _apply_diff(self, diff: CachedRequestData) -> None:
        state = self.requests.get(diff.request_id)
        if state is None:
            raise RuntimeError(f"step names request {diff.request_id!r} that this rank never received")
        state.token_ids.extend(diff.new_token_ids)
        state.block_ids.extend(diff.new_block_ids)
        state.num_computed_tokens = diff.num_computed_tokens

    def _prepare(self, plan: StepPlan) -> _Batch:
        ids: list[int] = []
        positions: list[int] = []
        seqs: list[SeqSpan] = []
        sample_ids: list[str] = []
        sample_index: list[int] = []
        ahead: list[tuple[int, str]] = []  # (flat index, request) of tokens still on the device
        for request_id, n in plan.num_scheduled_tokens.items():
            state = self.requests[request_id]
            start = state.num_computed_tokens
            seqs.append(SeqSpan(len(ids), n, start + n, state.block_ids))
            known = state.token_ids[start : start + n]
            ids.extend(known)
            if len(known) < n:  # run ahead: its last token is the one it sampled last step
                if len(known) != n - 1:
                    raise RuntimeError(f"step asks {n} tokens of {request_id!r}; this rank knows {len(known)}")
                ahead.append((len(ids), request_id))
                ids.append(0)
            positions.extend(range(start, start + n))
            if start + n >= len(state.token_ids):
                sample_ids.append(request_id)
                sample_index.append(len(ids) - 1)
        dev = self.device
        return _Batch(
            self._fill_ahead(to_device(ids, torch.long, dev), ahead),
            to_device(positions, torch.long, dev),
            self.backend.build_metadata(seqs, self.block_size, dev),
            sample_ids,
            frozenset(r for _, r in ahead),
            to_device(sample_index, torch.long, dev),
            len(ids) == len(seqs),
        )

    def _fill_ahead(self, ids: torch.Tensor, ahead: list[tuple[int, str]]) -> torch.Tensor:
        """ids [tokens] with each run-ahead token copied from the last step's sampled tokens."""
        if not ahead:
            return ids
        sample_ids, tokens = self._sampled or ([], [])
        rows = {r: i for i, r in enumerate(sample_ids)}
        missing = [r for _, r in ahead if r not in rows]
        if missing:
            raise RuntimeError(f"requests {missing[:5]} run ahead of a token the last step did not sample")
        if isinstance(tokens, list):  # sampled on the host
            tokens = to_device(tokens, torch.long, self.device)
        where = to_device([i for i, _ in ahead] + [rows[r] for _, r in ahead], torch.long, self.device)
        ids[where[: len(ahead)]] = tokens[where[len(ahead) :]]
        return ids


def _state(new: NewRequestData) -> _RequestState:
    return _RequestState(
        token_ids=list(new.token_ids),
        num_prompt_tokens=new.num_prompt_tokens,
        params=new.params,
        eos_token_ids=new.eos_token_ids,
        bad_words_ids=new.bad_words_ids,
        block_ids=list(new.block_ids),
        num_computed_tokens=new.num_computed_tokens,
    )
