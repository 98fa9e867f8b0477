"""Paged attention on CUDA in Triton: one kernel for prefill chunks, prefix hits and decode.

The flat batch of a step is cut into query tiles: `BLOCK_Q` consecutive query tokens of one
sequence. A program takes one tile and one KV head; its rows are the tile's tokens × the query
heads that share the KV head (GQA packing), so a decode token with 4 query heads per KV head
fills 4 rows. Keys and values are read in place through the block table (no gather copy),
`BLOCK_N` positions at a time, with an online softmax in float32. A query at absolute position
p sees keys 0..p (and p − window < key when windowed; ALiBi adds slope · (key − p)).

A decode-only step (one query token per sequence, `TritonMetadata.decode_only`) takes a lighter
path: tile i is sequence i (no lookups before its context length), and one loop of blocks masked
for the one query position (tiles of 64 keys; over an fp8 cache at most 128 registers a thread).
Where a tile's keys lie in one cache block (block_size a multiple of 64, the default 64) on a
Hopper GPU, each tile's keys and values of its head are one bulk TMA copy each through a tensor
descriptor over the head-major cache (`attention.kv_cache_shape`), 5 stages deep over an fp8
cache; otherwise they are loaded through pointers, the block-table entries read a block ahead so
that no dependent load stands before a block's keys and values. On an H100 over an fp8 cache
(benchmarks/README.md, session 10): 512 decodes of 1,560 keys 0.586 ms against 0.611 ms through
pointers with blocks of 32, 2048 decodes of 192 keys 0.308 against 0.361 ms. Over an fp8 cache a
step with prefill chunks and at least `FP8_SPLIT_MIN_DECODES` decodes launches the decodes apart on
the same path (their tiles come first; tile i is sequence `tile_seqs[i]`), and the rest after.

`write_kv` stores the step's keys and values at their cache slots; slot −1 is skipped (padded
rows of a captured CUDA graph). An fp8 (e4m3) cache (`cache.kv_cache_dtype: fp8`) stores them
saturated to ±448 without a scale; the attention kernel reads them back as float16 (one conversion
instruction where bfloat16 takes three: 4 × 2048 prefill 0.527 against 0.705 ms, 512 decodes of
1,500 keys 0.642 against 1.091 ms on an H100) and multiplies in float16 against the query rounded to it.
Whole prompts of at least `FRESH_MIN_LEN` tokens (no cached prefix, no window or ALiBi, a cache
in the query's dtype, rows that `prompt_kernel_fits`) skip the paged kernel: their keys and
values are this step's own k, v (views of the fused projection), which `_prompt_attention_kernel`
reads without a block table. A program takes `BLOCK_M` query tokens of one prompt and one query head
(the metadata's `prompt_tiles`, the most keys first so that short tiles fill the tail), the keys
before its first position unmasked and the diagonal masked; on a Hopper GPU each `BLOCK_N` rows
of keys and of values are one TMA copy through a tensor descriptor over k, v as rows of
kv_heads × head_dim. H100, Llama-8B heads, bf16 (benchmarks/README.md, session 11): 4 prompts of
2,048 tokens 0.322-0.335 ms (411-427 TFLOP/s) against 0.671 ms for FlashAttention through SDPA on
the same views, which whole prompts took before, and 0.27-0.34 ms for cuDNN's (which builds a
graph for every new shape, 37-58 ms each). The metadata lists the other sequences' paged tiles
first, so the paged kernel's grid covers them alone, or every tile when the layer needs the paged
kernel's masks.

`TritonAttentionBackend` is checked against the torch reference backend
(tests/workers/test_triton_attention.py); on a CPU the same kernels run in Triton's interpreter
(TRITON_INTERPRET=1), which the tests use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from itertools import accumulate

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from shardserve.workers.attention import (
    AttentionMetadata,
    SeqSpan,
    padded_tables,
    slot_mapping,
    to_device,
)

ROWS_PREFILL = 64  # rows (tokens × grouped heads) of a tile when the step has prefill chunks
ROWS_DECODE = 16  # ... when every sequence has one query token (tl.dot needs 16 rows)
# (key elements a tile reads at once: BLOCK_N = that / head_dim, num_warps, num_stages), the fastest
# of benchmarks/attention.py --sweep on an H200 (Llama-8B heads: prefill 4×2048, decode 256×256, 64×2048)
PREFILL_LAUNCH = (8192, 4, 2)
# both caches: 64 keys a block, 3 stages (H100, benchmarks/README.md sessions 8 and 9)
DECODE_LAUNCH = (8192, 4, 3)
# an fp8 cache's decode tiles at most this many registers a thread (148 uncapped: 3 programs an SM
# instead of 4; H100: 1024 decodes of 129-256 keys 0.204 against 0.230 ms, 512 of 1000-2000 keys
# 0.646 against 0.708 ms; a bf16 cache loses ~1 % with the cap)
FP8_DECODE_MAX_REGISTERS = 128
# an fp8 cache's decode tiles read through TMA pipeline this many blocks (H100, 512 decodes of 1,560
# keys: 0.573 ms at 5 stages, 0.610 at 3; a bf16 cache, twice the bytes a block: 3 stages as before)
FP8_TMA_DECODE_STAGES = 5
# over an fp8 cache, a step with prefill launches its decodes apart (the decode path) from this many on:
# the general path's 64-row tiles convert 4 times the keys a decode needs (H100, ms: 192 decodes of
# ~2,100 keys + a 1,856-token chunk 0.631 together, 0.303 + 0.175 apart; 300 + 1,500: 0.884 against
# 0.461 + 0.169; 64 + 4,000: 0.171 against 0.122 + 0.070; a bf16 cache gains nothing: 0.634 / 0.730)
FP8_SPLIT_MIN_DECODES = 128
# whole prompts at least this long take the prompt kernel; shorter ones the paged kernel, whose tiles
# share each key between a KV head's query heads (H100, ms: 1 × 2048 0.121 against 0.136 paged,
# 8 × 512 0.106 against 0.098, 16 × 256 0.100 against 0.084; benchmarks/README.md, session 11)
FRESH_MIN_LEN = 1024
# whole prompts: (BLOCK_M query tokens, BLOCK_N keys a step, num_warps, num_stages), the fastest of a
# sweep on an H100 (4 × 2048, 3 × 2048 + 1856, 1 × 2048, 500 + 700 + 1200 tokens; session 11)
PROMPT_LAUNCH = (64, 64, 4, 3)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slots_ptr,
    stride_kt, stride_vt, stride_cache_kv,
    HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, PAGE: tl.constexpr, CLAMP: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:
        cols = tl.arange(0, WIDTH_PAD)  # the token's kv_heads × head_dim values
        ok = cols < WIDTH
        k = tl.load(k_ptr + t * stride_kt + cols, mask=ok)
        v = tl.load(v_ptr + t * stride_vt + cols, mask=ok)
        if CLAMP > 0:  # an fp8 cache: saturate instead of overflowing
            k = tl.minimum(tl.maximum(k.to(tl.float32), -CLAMP), CLAMP)
            v = tl.minimum(tl.maximum(v.to(tl.float32), -CLAMP), CLAMP)
        # [blocks, kv_heads, PAGE, HEAD_DIM]: the slot's row of head h is (block · kv_heads + h) · PAGE + offset
        block, offset = slot // PAGE, slot % PAGE
        rows = (block * (WIDTH // HEAD_DIM) + cols // HEAD_DIM) * PAGE + offset
        dst = cache_ptr + rows * HEAD_DIM + cols % HEAD_DIM
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + stride_cache_kv, v.to(cache_ptr.dtype.element_ty), mask=ok)


LOG2E = tl.constexpr(1.4426950408889634)
NO_MASK, PER_ROW, ONE_POSITION = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # `_attend_block`'s MASK


@triton.jit
def _table_entries(table, start, hi, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    """The cache block of each key in [start, start + BLOCK_N) (0 past hi)."""
    keys = start + tl.arange(0, BLOCK_N)
    return tl.load(table + keys // PAGE, mask=keys < hi, other=0)


@triton.jit
def _attend_block(
    q, acc, m_i, l_i, start, blocks, hi, q_pos, window, slope, k_base, v_base, dims, dim_ok,
    stride_cache_block, stride_cache_slot, qk_scale,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, MASK: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_ALIBI: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """`_softmax_step` over keys [start, start + BLOCK_N), which lie in the cache `blocks`
    (`_table_entries`), loaded through pointers."""
    keys = start + tl.arange(0, BLOCK_N)
    offsets = blocks.to(tl.int64) * stride_cache_block + (keys % PAGE) * stride_cache_slot
    kv_mask = (keys < hi)[:, None] & dim_ok[None, :]
    k = tl.load(k_base + offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [N, D]
    v = tl.load(v_base + offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # both in flight
    return _softmax_step(q, k, v, acc, m_i, l_i, start, hi, q_pos, window, slope, qk_scale,
                         BLOCK_N, MASK, USE_WINDOW, USE_ALIBI, PRECISION)  # fmt: skip


@triton.jit
def _softmax_step(
    q, k, v, acc, m_i, l_i, start, hi, q_pos, window, slope, qk_scale,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One step of the online softmax over keys [start, start + BLOCK_N) with their k, v [N, D] (any
    values past hi: masked). `MASK`: NO_MASK; PER_ROW: the causal limit, the end of the context
    (and the window) per row; ONE_POSITION: every row's query is at hi − 1 (a decode tile), so the
    mask is one row's."""
    keys = start + tl.arange(0, BLOCK_N)
    key_ok = keys < hi
    k, v = k.to(q.dtype), v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [rows, N], log2 units
    if USE_ALIBI:
        s += slope[:, None] * (keys[None, :] - q_pos[:, None]).to(tl.float32)
    if MASK == PER_ROW:
        allowed = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (keys[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
    elif MASK == ONE_POSITION:
        if USE_WINDOW:
            key_ok = key_ok & (keys > hi - 1 - window)
        s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, m_new, l_i


# The step's metadata (int32 tables, read a scalar at a time) varies in offset and width from step
# to step: specialising on them would compile a new variant mid-serving (about a second each).
@triton.jit(
    do_not_specialize=["window", "stride_table"],
    do_not_specialize_on_alignment=[
        "tables_ptr",
        "context_lens_ptr",
        "query_starts_ptr",
        "tile_seqs_ptr",
        "tile_starts_ptr",
    ],
)
def _paged_attention_kernel(
    q_ptr, out_ptr, cache_ptr, kv_desc, alibi_ptr,
    tables_ptr, context_lens_ptr, query_starts_ptr, tile_seqs_ptr, tile_starts_ptr,
    scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_kv, stride_cache_block, stride_cache_slot, stride_cache_head, stride_table,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAGE: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr, PRECISION: tl.constexpr, FP16_DOTS: tl.constexpr,
    DECODE: tl.constexpr, SEQ_MAP: tl.constexpr, TMA: tl.constexpr, KV_HEADS: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    if DECODE:  # one query token a sequence: tile i is sequence i and token i, no lookups before the context
        seq = tile
        q_first = tile
        if SEQ_MAP:  # ... unless the decodes are a mixed step's share: tile i is sequence tile_seqs[i]
            seq = tl.load(tile_seqs_ptr + tile)
            q_first = tl.load(query_starts_ptr + seq)
        tile_start = 0
        q_len = 1
    else:
        seq = tl.load(tile_seqs_ptr + tile)
        tile_start = tl.load(tile_starts_ptr + tile)
        q_first = tl.load(query_starts_ptr + seq)
        q_len = tl.load(query_starts_ptr + seq + 1) - q_first
    context = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    token = tile_start + rows // GROUP_PAD  # index among the sequence's query tokens
    group = rows % GROUP_PAD
    head = kv_head * GROUP + group
    row_ok = (token < q_len) & (group < GROUP)
    q_pos = context - q_len + token  # absolute position of each row's token
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM

    q_rows = (q_first + token).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if FP16_DOTS:  # an fp8 cache converts to float16 in one instruction (to bfloat16 in three)
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    slope = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    if USE_ALIBI:  # in log2 units, like the scores
        slope = tl.load(alibi_ptr + head, mask=group < GROUP, other=0.0) * LOG2E
    qk_scale = scale * LOG2E  # scores in log2 units: exp2 instead of exp

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD], tl.float32)

    first_pos = context - q_len + tile_start  # the tile's first query position
    hi = tl.minimum(context, first_pos + BLOCK_Q)  # keys past the tile's last query are never seen
    lo = 0
    mid = lo + ((first_pos + 1 - lo) // BLOCK_N) * BLOCK_N  # [lo, mid): every row sees every key
    if USE_WINDOW:
        lo = tl.maximum(0, first_pos - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
        mid = lo  # the window masks at both ends: every block is checked
    k_base = cache_ptr + kv_head * stride_cache_head
    v_base = k_base + stride_cache_kv
    table = tables_ptr + seq * stride_table
    if DECODE and TMA:  # each BLOCK_N keys lie in one cache block: one bulk copy each of keys and values
        v_rows = (stride_cache_kv // HEAD_DIM).to(tl.int32)  # kv_desc: the cache as rows of HEAD_DIM
        for start in range(lo, hi, BLOCK_N):
            row = (tl.load(table + start // PAGE) * KV_HEADS + kv_head) * PAGE + start % PAGE
            k = kv_desc.load([row, 0])
            v = kv_desc.load([row + v_rows, 0])
            acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, start, hi, q_pos, window, slope, qk_scale,
                                          BLOCK_N, ONE_POSITION, USE_WINDOW, USE_ALIBI, PRECISION)  # fmt: skip
    elif DECODE:  # one loop, every block masked (cheap for one position): its loads pipeline as one
        ahead = _table_entries(table, lo, hi, BLOCK_N, PAGE)
        for start in range(lo, hi, BLOCK_N):  # the table is read a block ahead: no lookup before the loads
            blocks = ahead
            ahead = _table_entries(table, start + BLOCK_N, hi, BLOCK_N, PAGE)
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start, blocks, hi, q_pos, window, slope, k_base, v_base,
                                          dims, dim_ok, stride_cache_block, stride_cache_slot, qk_scale, BLOCK_N, PAGE,
                                          ONE_POSITION, USE_WINDOW, USE_ALIBI, PRECISION)  # fmt: skip
    else:
        for start in range(lo, mid, BLOCK_N):  # below the diagonal: no mask to build
            blocks = _table_entries(table, start, hi, BLOCK_N, PAGE)
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start, blocks, hi, q_pos, window, slope, k_base, v_base,
                                          dims, dim_ok, stride_cache_block, stride_cache_slot, qk_scale, BLOCK_N, PAGE,
                                          NO_MASK, False, USE_ALIBI, PRECISION)  # fmt: skip
        for start in range(mid, hi, BLOCK_N):  # the diagonal (and a window's edges)
            blocks = _table_entries(table, start, hi, BLOCK_N, PAGE)
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start, blocks, hi, q_pos, window, slope, k_base, v_base,
                                          dims, dim_ok, stride_cache_block, stride_cache_slot, qk_scale, BLOCK_N, PAGE,
                                          PER_ROW, USE_WINDOW, USE_ALIBI, PRECISION)  # fmt: skip
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


@triton.jit
def _prompt_keys(
    k_desc, v_desc, k_base, v_base, first, start, hi, kv_head, stride_kt, stride_vt,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """A whole prompt's keys and values at positions [start, start + BLOCK_N) (rows first + those
    of k, v): a TMA box of whole rows, or pointers that read rows at or past hi as zeros."""
    if TMA:
        k = k_desc.load([first + start, kv_head * HEAD_DIM])
        v = v_desc.load([first + start, kv_head * HEAD_DIM])
    else:
        keys = start + tl.arange(0, BLOCK_N)
        rows = (first + keys).to(tl.int64)[:, None]
        k = tl.load(k_base + rows * stride_kt, mask=(keys < hi)[:, None], other=0.0)
        v = tl.load(v_base + rows * stride_vt, mask=(keys < hi)[:, None], other=0.0)
    return k, v


@triton.jit(do_not_specialize_on_alignment=["tile_firsts_ptr", "tile_lens_ptr", "tile_starts_ptr"])
def _prompt_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, k_desc, v_desc, tile_firsts_ptr, tile_lens_ptr, tile_starts_ptr, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Causal attention of BLOCK_M query tokens of one whole prompt (one query head) over the
    prompt's own keys and values, rows [first, first + length) of k and v."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    first = tl.load(tile_firsts_ptr + tile)  # the prompt's first token in the step
    length = tl.load(tile_lens_ptr + tile)
    tile_start = tl.load(tile_starts_ptr + tile)  # the tile's first position in the prompt
    q_pos = tile_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = q_pos < length
    q_rows = (first + q_pos).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
    qk_scale = scale * LOG2E
    unused = tl.zeros([BLOCK_M], tl.float32)  # (`_softmax_step`'s ALiBi slopes)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = tl.minimum(length, tile_start + BLOCK_M)
    k_base = k_ptr + kv_head * stride_kh + dims[None, :]
    v_base = v_ptr + kv_head * stride_vh + dims[None, :]
    for start in range(0, tile_start, BLOCK_N):  # keys before the tile's first position: no mask
        k, v = _prompt_keys(k_desc, v_desc, k_base, v_base, first, start, hi, kv_head, stride_kt, stride_vt,
                            BLOCK_N, HEAD_DIM, TMA)  # fmt: skip
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, start, hi, q_pos, 0, unused, qk_scale,
                                      BLOCK_N, NO_MASK, False, False, PRECISION)  # fmt: skip
    whole = tile_start + (hi - tile_start) // BLOCK_N * BLOCK_N  # the diagonal's blocks of keys all below hi
    for start in range(tile_start, whole, BLOCK_N):  # the diagonal
        k, v = _prompt_keys(k_desc, v_desc, k_base, v_base, first, start, hi, kv_head, stride_kt, stride_vt,
                            BLOCK_N, HEAD_DIM, TMA)  # fmt: skip
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, start, hi, q_pos, 0, unused, qk_scale,
                                      BLOCK_N, PER_ROW, False, False, PRECISION)  # fmt: skip
    if whole < hi:  # the prompt's last keys: by pointers, whose masked rows read as zeros (a TMA box would
        # read the next request's rows, and its inf or NaN values would reach this one through 0 · v)
        k, v = _prompt_keys(k_desc, v_desc, k_base, v_base, first, whole, hi, kv_head, stride_kt, stride_vt,
                            BLOCK_N, HEAD_DIM, False)  # fmt: skip
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, whole, hi, q_pos, 0, unused, qk_scale,
                                      BLOCK_N, PER_ROW, False, False, PRECISION)  # fmt: skip
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


@dataclass(slots=True)
class TritonMetadata(AttentionMetadata):
    """The reference metadata plus the kernel's tensors (int32, on the device)."""

    block_tables: torch.Tensor | None = None  # [seqs, max_blocks]
    context_lens: torch.Tensor | None = None  # [seqs]
    query_starts: torch.Tensor | None = None  # [seqs + 1]
    tile_seqs: torch.Tensor | None = None  # [tiles] the sequence of each query tile
    tile_starts: torch.Tensor | None = None  # [tiles] its first query token, within the sequence
    block_q: int = 1  # query tokens per tile
    kernel_tiles: int = -1  # the tiles of sequences that are not whole prompts (they come first); −1: all
    decode_tiles: int = 0  # of those, the decodes' (one a decode, first of all) in a step with prefill
    # [3, prompt tiles]: first token of the prompt in the step, its length, the tile's first position
    # (tiles of PROMPT_LAUNCH's BLOCK_M tokens, the latest positions first); None: no whole prompts
    prompt_tiles: torch.Tensor | None = None
    decode_only: bool = False  # one query token per sequence: tile i is sequence i, its token i


def tile_rows(group: int, decode_only: bool) -> tuple[int, int]:
    """(BLOCK_Q, GROUP_PAD): query tokens per tile and padded query heads per KV head."""
    group_pad = triton.next_power_of_2(group)
    rows = ROWS_DECODE if decode_only else ROWS_PREFILL
    return max(1, rows // group_pad), group_pad


class TritonAttentionBackend:
    """Paged attention on CUDA through the kernels above (same contract as the torch backend)."""

    def __init__(self, num_heads: int, num_kv_heads: int) -> None:
        self.group = max(1, num_heads // num_kv_heads)

    def build_metadata(self, seqs: list[SeqSpan], block_size: int, device: torch.device) -> TritonMetadata:
        decode_only = all(s.query_len == 1 for s in seqs)
        block_q, _ = tile_rows(self.group, decode_only)
        width = max(-(-s.context_len // block_size) for s in seqs)
        fresh = [i for i, s in enumerate(seqs) if s.query_len == s.context_len >= FRESH_MIN_LEN]
        starts = list(accumulate((s.query_len for s in seqs), initial=0))
        lens = [s.context_len for s in seqs]
        if decode_only and not fresh:  # tile i is sequence i (a host loop less in the commonest step)
            tile_seqs, tile_starts = list(range(len(seqs))), [0] * len(seqs)
            kernel_tiles, decode_tiles = len(seqs), 0
        else:
            whole = set(fresh)
            tiles = [(i, 0) for i, s in enumerate(seqs) if s.query_len == 1 and i not in whole]
            decode_tiles = len(tiles)
            tiles += [(i, t) for i, s in enumerate(seqs) if s.query_len > 1 and i not in whole
                      for t in range(0, s.query_len, block_q)]  # fmt: skip
            kernel_tiles = len(tiles)
            tiles += [(i, t) for i in fresh for t in range(0, seqs[i].query_len, block_q)]
            tile_seqs, tile_starts = [t[0] for t in tiles], [t[1] for t in tiles]
        prompts = prompt_tiles([seqs[i] for i in fresh], PROMPT_LAUNCH[0])
        dev = to_device(starts + lens + tile_seqs + tile_starts + prompts, torch.int32, device)
        n, t = len(seqs), len(tile_seqs)
        end = 2 * n + 1 + 2 * t
        return TritonMetadata(
            slot_mapping=to_device(slot_mapping(seqs, block_size), torch.int64, device),
            seqs=seqs,
            block_size=block_size,
            block_tables=to_device(padded_tables(seqs, width), torch.int32, device).view(len(seqs), width),
            query_starts=dev[: n + 1],
            context_lens=dev[n + 1 : 2 * n + 1],
            tile_seqs=dev[2 * n + 1 : 2 * n + 1 + t],
            tile_starts=dev[2 * n + 1 + t : end],
            block_q=block_q,
            kernel_tiles=kernel_tiles,
            decode_tiles=decode_tiles,
            prompt_tiles=dev[end:].view(3, -1) if fresh else None,
            decode_only=decode_only and not fresh,  # (whole prompts' paged tiles would come last)
        )

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
        assert isinstance(meta, TritonMetadata), "build the step's metadata with this backend"
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = q.new_empty(q.shape)
        # masks only the paged kernel has, an fp8 cache (whose rounded keys the whole prompt must see
        # too), or rows the prompt kernel does not take: every tile through the paged kernel
        plain = sliding_window is None and alibi_slopes is None and kv_cache.dtype == q.dtype
        if meta.prompt_tiles is None or not plain or not prompt_kernel_fits(q):
            paged_attention(q, out, kv_cache, meta, scale, self.group, sliding_window, alibi_slopes)
            return out
        if meta.kernel_tiles:
            paged_attention(q, out, kv_cache, meta, scale, self.group, tiles=meta.kernel_tiles)
        prompt_attention(q, k, v, out, meta.prompt_tiles, scale, self.group)
        return out


def prompt_kernel_fits(q: torch.Tensor) -> bool:
    """Whether the prompt kernel takes these queries: a power-of-two head_dim of 16 or more, rows of
    at most 256 bytes (bf16 up to 128; its 3 stages of 64 keys and values then fit in shared memory)."""
    head_dim = q.shape[-1]
    return head_dim >= 16 and not head_dim & (head_dim - 1) and head_dim * q.element_size() <= 256


def prompt_tiles(prompts: list[SeqSpan], block_m: int) -> list[int]:
    """The rows of `TritonMetadata.prompt_tiles`, flat: first tokens, lengths, first positions of
    the tiles of `block_m` tokens of whole prompts, the latest positions (the most keys) first."""
    tiles = sorted(((s.query_start, s.query_len, t) for s in prompts for t in range(0, s.query_len, block_m)),
                   key=lambda tile: -tile[2])  # fmt: skip
    return [tile[i] for i in range(3) for tile in tiles]


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """kv_cache [2, blocks, kv_heads, block_size, d]; k, v [tokens, kv_heads, d]; slot −1: skip."""
    assert kv_cache.is_contiguous()
    k, v = _rows(k), _rows(v)
    _, _, kv_heads, page, head_dim = kv_cache.shape
    _write_kv_kernel[(k.shape[0],)](
        k, v, kv_cache, slots, k.stride(0), v.stride(0), kv_cache.stride(0),
        HEAD_DIM=head_dim, WIDTH=kv_heads * head_dim, WIDTH_PAD=triton.next_power_of_2(kv_heads * head_dim), PAGE=page,
        CLAMP=448.0 if kv_cache.dtype == torch.float8_e4m3fn else 0.0,
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor,
    out: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: TritonMetadata,
    scale: float,
    group: int,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    tiles: int = -1,
) -> None:
    """out [tokens, heads, d] = attention of q [tokens, heads, d] over the paged cache, for the
    first `tiles` query tiles of `meta` (−1: all). Over an fp8 cache a step with prefill launches
    its decodes apart, on the decode path, once they are `FP8_SPLIT_MIN_DECODES` or more."""
    assert meta.tile_seqs is not None
    tiles = meta.tile_seqs.shape[0] if tiles < 0 else tiles
    fits = tile_rows(group, True)[0] * triton.next_power_of_2(group) <= ROWS_DECODE  # (a decode tile's rows)
    launch = partial(_launch, q, out, kv_cache, meta, scale, group, sliding_window, alibi_slopes)
    if meta.decode_only and fits:
        launch(0, tiles, decode=True)
        return
    split = meta.decode_tiles if fits and _decodes_apart(kv_cache, meta.decode_tiles) else 0
    if split:
        launch(0, split, decode=True)
    if tiles > split:
        launch(split, tiles, decode=False)


def _decodes_apart(kv_cache: torch.Tensor, decodes: int) -> bool:
    """Whether a step with prefill launches its `decodes` apart, on the decode path."""
    return kv_cache.dtype == torch.float8_e4m3fn and decodes >= FP8_SPLIT_MIN_DECODES


def _launch(
    q: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor, meta: TritonMetadata, scale: float, group: int,
    sliding_window: int | None, alibi_slopes: torch.Tensor | None, first: int, end: int, decode: bool,
) -> None:  # fmt: skip
    """The paged kernel over tiles [first, end) of `meta`, on its decode path or its general one."""
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and kv_cache.is_contiguous()
    assert meta.tile_seqs is not None and meta.tile_starts is not None and meta.block_tables is not None
    _, _, kv_heads, page, head_dim = kv_cache.shape
    group_pad = triton.next_power_of_2(group)
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    elements, warps, stages = DECODE_LAUNCH if decode else PREFILL_LAUNCH
    block_n = max(16, min(128, elements // max(head_dim, 16)))
    tma = decode and _tma_fits(kv_cache, block_n)
    if tma and fp8:
        stages = FP8_TMA_DECODE_STAGES
    # the cache as rows of head_dim (keys, then values), read block_n rows at a time
    kv_desc = _descriptor(kv_cache.view(-1, head_dim), [block_n, head_dim]) if tma else kv_cache
    alibi = alibi_slopes.to(device=q.device, dtype=torch.float32) if alibi_slopes is not None else q
    _paged_attention_kernel[(end - first, kv_heads)](
        q, out, kv_cache, kv_desc, alibi,
        meta.block_tables, meta.context_lens, meta.query_starts, meta.tile_seqs[first:], meta.tile_starts[first:],
        scale, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(3), kv_cache.stride(2), meta.block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=tile_rows(group, True)[0] if decode else meta.block_q,
        BLOCK_N=block_n, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)), PAGE=page,
        USE_WINDOW=sliding_window is not None, USE_ALIBI=alibi_slopes is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP16_DOTS=fp8 and q.dtype == torch.bfloat16,
        DECODE=decode, SEQ_MAP=decode and not meta.decode_only, TMA=tma, KV_HEADS=kv_heads,
        num_warps=warps, num_stages=stages,
        **({"maxnreg": FP8_DECODE_MAX_REGISTERS} if decode and fp8 else {}),  # an option of CUDA's backend only
    )  # fmt: skip


def prompt_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, tiles: torch.Tensor, scale: float, group: int
) -> None:
    """out [tokens, heads, d] at the rows of whole prompts = their causal attention over this step's
    own k, v [tokens, kv_heads, d], for the tiles of `tiles` (`TritonMetadata.prompt_tiles`)."""
    block_m, block_n, warps, stages = PROMPT_LAUNCH
    assert block_m % block_n == 0, "a tile's first position must start a block of keys (the unmasked loop ends there)"
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    k, v = _rows(k), _rows(v)
    head_dim = q.shape[-1]
    tma = _hopper_or_interpreter(q.device) and all(
        x.stride(0) * x.element_size() % 16 == 0 and x.data_ptr() % 16 == 0 for x in (k, v)
    )
    if tma:  # k, v as rows of kv_heads × head_dim, read block_n rows of one head at a time
        k_desc, v_desc = (_descriptor(x.flatten(1), [block_n, head_dim]) for x in (k, v))
    else:
        k_desc, v_desc = k, v
    _prompt_attention_kernel[(tiles.shape[1], q.shape[1])](
        q, k, v, out, k_desc, v_desc, tiles[0], tiles[1], tiles[2], scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", TMA=tma, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def _tma_fits(kv_cache: torch.Tensor, block_n: int) -> bool:
    """Whether decode tiles read the cache through a TMA descriptor: on a Hopper or later GPU (or
    Triton's interpreter), each tile's BLOCK_N keys within one cache block, rows of a power-of-two
    head_dim that span a multiple of 16 bytes (TMA's alignment)."""
    head_dim, row_bytes = kv_cache.shape[-1], kv_cache.shape[-1] * kv_cache.element_size()
    if kv_cache.shape[3] % block_n or head_dim & (head_dim - 1) or row_bytes % 16 or head_dim > 256:
        return False
    return _hopper_or_interpreter(kv_cache.device)


def _hopper_or_interpreter(device: torch.device) -> bool:
    """Whether kernels may read through TMA descriptors: a Hopper or later GPU, or Triton's interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return os.environ.get("TRITON_INTERPRET") == "1"


def _descriptor(rows: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A 2-D tensor (rows of contiguous elements) read `block` at a time."""
    return TensorDescriptor(rows, list(rows.shape), [rows.stride(0), 1], block)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, d] with each token's heads contiguous (a view of a fused projection is)."""
    if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]:
        return x
    return x.contiguous()
