"""Paged attention over block tables.

The KV cache of one layer is a tensor [2, num_blocks, kv_heads, block_size, head_dim]
(keys, values; `kv_cache_shape`): head-major, so one block's keys of one head are contiguous
(block_size × head_dim), which the CUDA decode kernel reads as one bulk (TMA) copy. A step is
a flat batch of tokens from several sequences; each sequence has `query_len` new tokens at
positions `context_len - query_len .. context_len - 1` and reads keys through its block table.
`AttentionBackend` is the seam for faster kernels.
"""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(slots=True)  # (not frozen: one a sequence a step, and a frozen __init__ costs 3 times as much)
class SeqSpan:
    query_start: int  # offset of this sequence's tokens in the flat batch
    query_len: int
    context_len: int  # tokens in the cache after this step (computed before + query_len)
    block_table: list[int]


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [tokens] long: cache slot (block * block_size + offset) of each token
    seqs: list[SeqSpan]
    block_size: int
    # Decode sequences (query_len == 1) are batched: their rows in `seqs`, padded tables and lengths.
    decode_rows: list[int] = field(default_factory=list)
    decode_tokens: torch.Tensor | None = None  # [decodes] long: flat token index of each
    decode_block_tables: torch.Tensor | None = None  # [decodes, max_blocks] long
    decode_context_lens: torch.Tensor | None = None  # [decodes] long
    # The decode step's additive masks, built by the first layer and shared by the rest (SDPA turns a
    # bool mask into this form on every call, which on a CPU costs as much as the attention itself).
    decode_masks: dict[tuple[object, ...], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, seqs: list[SeqSpan], block_size: int, device: torch.device) -> AttentionMetadata:
        meta = cls(torch.tensor(slot_mapping(seqs, block_size), dtype=torch.long, device=device), seqs, block_size)
        rows = [i for i, s in enumerate(seqs) if s.query_len == 1]
        if rows:
            width = max(-(-seqs[i].context_len // block_size) for i in rows)
            tables = padded_tables((seqs[i] for i in rows), width)
            meta.decode_rows = rows
            meta.decode_tokens = torch.tensor([seqs[i].query_start for i in rows], dtype=torch.long, device=device)
            meta.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=device).view(len(rows), width)
            meta.decode_context_lens = torch.tensor([seqs[i].context_len for i in rows], device=device)
        return meta


def slot_mapping(seqs: list[SeqSpan], block_size: int) -> list[int]:
    """The cache slot (block · block_size + offset) of every token of the step, in batch order."""
    slots: list[int] = []
    for s in seqs:
        table = s.block_table
        if s.query_len == 1:  # a decode (most of them): no generator
            p = s.context_len - 1
            slots.append(table[p // block_size] * block_size + p % block_size)
            continue
        slots.extend(
            table[p // block_size] * block_size + p % block_size
            for p in range(s.context_len - s.query_len, s.context_len)
        )
    return slots


def padded_tables(seqs: Iterable[SeqSpan], width: int) -> list[int]:
    """Each sequence's first `width` block ids, padded with block 0 (read only under a mask), as
    one flat list: the rows of a [seqs, width] table."""
    flat: list[int] = []
    pad = [0] * width
    for s in seqs:
        row = s.block_table[:width]
        flat += row
        flat += pad[len(row) :]
    return flat


class AttentionBackend(Protocol):
    def build_metadata(self, seqs: list[SeqSpan], block_size: int, device: torch.device) -> AttentionMetadata:
        """The step's metadata, once for all layers (device tensors the kernels read)."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] → [tokens, heads, head_dim].

        Writes k, v into `kv_cache` at `meta.slot_mapping` first. `alibi_slopes` [heads] adds
        slope · (key position − query position) to the scores."""
        ...


class TorchAttentionBackend:
    """Reference backend: SDPA over keys gathered from the block tables (CPU and CUDA)."""

    def build_metadata(self, seqs: list[SeqSpan], block_size: int, device: torch.device) -> AttentionMetadata:
        return AttentionMetadata.build(seqs, block_size, device)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        write_kv(kv_cache, k, v, meta.slot_mapping)
        bias = _Bias(sliding_window, alibi_slopes)
        if len(meta.decode_rows) == len(meta.seqs):  # a pure decode step: rows are in batch order
            return self._decode(q, kv_cache, meta, scale, bias)
        out = torch.empty_like(q)
        if meta.decode_rows:
            out[meta.decode_tokens] = self._decode(q[meta.decode_tokens], kv_cache, meta, scale, bias)
        runs = whole_prompt_runs(meta.seqs, 2) if bias.plain else []  # (one-token prompts are decodes)
        skip = set(meta.decode_rows) | {i for first, n, _ in runs for i in range(first, first + n)}
        for i, s in enumerate(meta.seqs):
            if i not in skip:
                sl = slice(s.query_start, s.query_start + s.query_len)
                out[sl] = self._prefill(q[sl], kv_cache, s, meta.block_size, scale, bias)
        for first, n, length in runs:
            attend_whole_prompts(q, k, v, out, meta.seqs[first].query_start, n, length, scale)
        return out

    @staticmethod
    def _decode(
        q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, bias: _Bias
    ) -> torch.Tensor:
        # q: [decodes, heads, head_dim]
        tables = meta.decode_block_tables
        assert tables is not None and meta.decode_context_lens is not None
        n, width = tables.shape
        keys = gather_blocks(kv_cache[0], tables.flatten()).unflatten(1, (n, -1)).transpose(0, 1)  # [n, kv_heads, L, d]
        values = gather_blocks(kv_cache[1], tables.flatten()).unflatten(1, (n, -1)).transpose(0, 1)
        key = (bias.window, None if bias.alibi_slopes is None else id(bias.alibi_slopes), q.dtype)
        mask = meta.decode_masks.get(key)
        if mask is None:
            kpos = torch.arange(width * meta.block_size, device=q.device)[None, None, :]  # [1, 1, L]
            qpos = meta.decode_context_lens[:, None, None] - 1  # [n, 1, 1]
            mask = meta.decode_masks[key] = bias.additive(bias.mask(qpos, kpos, q.dtype), q.dtype)  # [n, 1|heads, 1, L]
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],  # [n, heads, 1, d]
            keys,
            values,
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        return out[:, :, 0, :]

    @staticmethod
    def _prefill(
        q: torch.Tensor, kv_cache: torch.Tensor, s: SeqSpan, block_size: int, scale: float, bias: _Bias
    ) -> torch.Tensor:
        # q: [query_len, heads, head_dim]
        nblocks = -(-s.context_len // block_size)
        table = torch.tensor(s.block_table[:nblocks], dtype=torch.long, device=q.device)
        keys = gather_blocks(kv_cache[0], table)[:, : s.context_len]  # [kv_heads, context, d]
        values = gather_blocks(kv_cache[1], table)[:, : s.context_len]
        start = s.context_len - s.query_len
        mask = None
        causal = start == 0 and bias.plain
        if not causal:
            qpos = torch.arange(start, s.context_len, device=q.device)[None, :, None]  # [1, q, 1]
            kpos = torch.arange(s.context_len, device=q.device)[None, None, :]  # [1, 1, k]
            mask = bias.mask(qpos, kpos, q.dtype)[0][None]  # [1, 1 or heads, q, k]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, heads, q, d]
            keys[None],
            values[None],
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)


@dataclass(frozen=True, slots=True)
class _Bias:
    """Causal mask, optionally windowed, optionally with ALiBi, as an SDPA `attn_mask`."""

    window: int | None
    alibi_slopes: torch.Tensor | None

    @property
    def plain(self) -> bool:
        return self.window is None and self.alibi_slopes is None

    def mask(self, qpos: torch.Tensor, kpos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """qpos [n, q, 1], kpos [1, 1, k] → bool [n, 1, q, k] or float [n, heads, q, k]."""
        allowed = kpos <= qpos
        if self.window is not None:
            allowed = allowed & (kpos > qpos - self.window)
        if self.alibi_slopes is None:
            return allowed[:, None]
        rel = (kpos - qpos).to(torch.float32)[:, None]  # [n, 1, q, k]
        scores = self.alibi_slopes.to(qpos.device)[None, :, None, None] * rel
        return scores.masked_fill(~allowed[:, None], float("-inf")).to(dtype)

    @staticmethod
    def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A `mask` result as scores to add: 0 where allowed, −inf where not (floats pass through)."""
        if mask.dtype != torch.bool:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def whole_prompt_runs(seqs: list[SeqSpan], min_len: int) -> list[tuple[int, int, int]]:
    """(first sequence, count, length) of each run of consecutive whole prompts (no cached
    prefix) of one length, each at least `min_len` tokens: their k, v are all their context."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(seqs):
        if s.query_len != s.context_len or s.query_len < min_len:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][2] == s.query_len:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, s.query_len)
        else:
            runs.append((i, 1, s.query_len))
    return runs


def attend_whole_prompts(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, start: int, n: int, length: int, scale: float
) -> None:
    """Causal attention of `n` whole prompts of `length` tokens at rows [start, start + n·length)
    of the step: one batched SDPA over views of this step's own q, k, v (no gather)."""
    rows = slice(start, start + n * length)

    def batch(x: torch.Tensor) -> torch.Tensor:  # [n·len, heads, d] -> [n, heads, len, d], a view
        return x[rows].view(n, length, *x.shape[1:]).transpose(1, 2)

    with _prompt_backends(q):
        o = F.scaled_dot_product_attention(batch(q), batch(k), batch(v), is_causal=True, scale=scale, enable_gqa=True)
    batch(out).copy_(o)


# SDPA's kernels for whole prompts on CUDA, cuDNN's fused attention left out: it builds a graph for
# every new (prompts, length) shape (37-58 ms each on an H100, the first ~1 s), which a server with
# ever-changing prompt lengths would pay again and again (its kernel is faster once built).
PROMPT_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _prompt_backends(q: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    return sdpa_kernel(PROMPT_BACKENDS) if q.is_cuda and PROMPT_BACKENDS else contextlib.nullcontext()


_ARRAY_CODES = {torch.int32: "i", torch.int64: "q", torch.float32: "f"}


def to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor; to a GPU through pinned memory, without waiting for the
    kernels already queued (a pageable copy would wait for them)."""
    code = _ARRAY_CODES.get(dtype)
    if code is not None and values:  # through array: a third of torch.tensor(list)'s time
        host = torch.frombuffer(array(code, values), dtype=dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def kv_cache_shape(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """The shape of one layer's KV cache (the layout every backend reads and writes)."""
    return (2, num_blocks, kv_heads, block_size, head_dim)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache [blocks, kv_heads, block_size, d], ids [k] -> [kv_heads, k · block_size, d]: each
    head's keys (or values) of those blocks in order (whole-block row copies, then the heads first:
    index_select along dim 1 of the transposed cache copied all of it first)."""
    heads, block_size, d = cache.shape[1:]
    return torch.index_select(cache, 0, block_ids).transpose(0, 1).reshape(heads, -1, d)  # (rows, then heads first)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store this step's keys and values [tokens, kv_heads, d] at their cache slots."""
    block_size = kv_cache.shape[3]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[0, blocks, :, offsets] = k.to(kv_cache.dtype)
    kv_cache[1, blocks, :, offsets] = v.to(kv_cache.dtype)


@dataclass(slots=True)
class ForwardContext:
    """What a model forward needs besides tokens and positions: the step's attention view."""

    meta: AttentionMetadata
    kv_caches: list[torch.Tensor]  # one per layer of this rank
    backend: AttentionBackend
