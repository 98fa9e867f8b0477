"""Executes one `StepPlan` on this rank: keeps per-request state, builds the flat batch,
runs the model over the paged KV cache and samples the requests whose chunk ends the prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shardserve.engine.request import SamplingParams
from shardserve.engine.sampler import Sampler, SamplingRow
from shardserve.engine.step import CachedRequestData, NewRequestData, StepPlan, StepResult
from shardserve.workers.attention import AttentionBackend, AttentionMetadata, ForwardContext, SeqSpan


@dataclass(slots=True)
class _RequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    bad_words_ids: tuple[tuple[int, ...], ...]
    block_ids: list[int]
    num_computed_tokens: int

    def row(self) -> SamplingRow:
        return SamplingRow(self.params, self.token_ids, self.num_prompt_tokens, self.eos_token_ids, self.bad_words_ids)


@dataclass(frozen=True, slots=True)
class _Batch:
    ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    meta: AttentionMetadata
    sample_ids: list[str]  # requests sampled this step
    sample_index: torch.Tensor  # [sampled] flat index of each one's last token


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        backend: AttentionBackend,
        sampler: Sampler,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.requests: dict[str, _RequestState] = {}

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        self._apply(plan)
        if plan.is_empty:
            return StepResult(plan.step_id)
        batch = self._prepare(plan)
        hidden = self.model(batch.ids, batch.positions, ForwardContext(batch.meta, self.kv_caches, self.backend))
        for request_id, n in plan.num_scheduled_tokens.items():
            self.requests[request_id].num_computed_tokens += n
        if not batch.sample_ids:
            return StepResult(plan.step_id)
        logits = self.model.compute_logits(hidden[batch.sample_index])  # [sampled, vocab]
        out = self.sampler(logits, [self.requests[r].row() for r in batch.sample_ids])
        logprobs = {r: lp for r, lp in zip(batch.sample_ids, out.logprobs, strict=True) if lp is not None}
        return StepResult(plan.step_id, dict(zip(batch.sample_ids, out.token_ids, strict=True)), logprobs)

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
        for request_id, n in plan.num_scheduled_tokens.items():
            state = self.requests[request_id]
            start = state.num_computed_tokens
            seqs.append(SeqSpan(len(ids), n, start + n, state.block_ids))
            ids.extend(state.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            if start + n == len(state.token_ids):
                sample_ids.append(request_id)
                sample_index.append(len(ids) - 1)
        dev = self.device
        return _Batch(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            AttentionMetadata.build(seqs, self.block_size, dev),
            sample_ids,
            torch.tensor(sample_index, dtype=torch.long, device=dev),
        )


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
