"""The Triton paged-attention kernels against the torch reference backend, on random inputs.

On a GPU the kernels run compiled; on a CPU they run in Triton's interpreter (slow, so the
shapes are small). Several block sizes, GQA ratios, head sizes, lengths that are not multiples
of the block, decode + prefill chunks + prefix hits in one step, sliding windows and ALiBi.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from shardserve.workers import triton_attention as ta  # noqa: E402
from shardserve.workers.attention import (  # noqa: E402
    AttentionMetadata,
    SeqSpan,
    TorchAttentionBackend,
    kv_cache_shape,
    whole_prompt_runs,
)
from shardserve.workers.triton_attention import TritonAttentionBackend  # noqa: E402
from tests.triton_cpu import DEVICE  # noqa: E402


def make_step(kinds: list[tuple[int, int]], block_size: int, num_blocks: int, rng: random.Random) -> list[SeqSpan]:
    """kinds: (computed before, new tokens) per sequence → spans with random distinct blocks."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs, start = [], 0
    for before, new in kinds:
        context = before + new
        table = [free.pop() for _ in range(-(-context // block_size))]
        seqs.append(SeqSpan(start, new, context, table))
        start += new
    return seqs


def run_both(
    kinds: list[tuple[int, int]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    window: int | None = None,
    alibi: bool = False,
    seed: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(b + n) // block_size) for b, n in kinds) + 3
    seqs = make_step(kinds, block_size, num_blocks, rng)
    tokens = sum(n for _, n in kinds)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    # q, k, v as views of one fused projection (the models' layout)
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    cache = rand(*kv_cache_shape(num_blocks, block_size, kv_heads, head_dim))  # earlier tokens' keys and values
    slopes = torch.linspace(0.5, 0.01, heads) if alibi else None
    scale = head_dim**-0.5

    ref_cache = cache.clone()
    ref_meta = AttentionMetadata.build(seqs, block_size, DEVICE)
    if kv_dtype is not None:  # the reference sees what an fp8 cache holds: keys and values rounded to it
        cache = cache.to(kv_dtype)
        ref_cache = cache.to(dtype)
        k_ref, v_ref = k.to(kv_dtype).to(dtype), v.to(kv_dtype).to(dtype)
    else:
        k_ref, v_ref = k, v
    ref = TorchAttentionBackend().forward(q, k_ref, v_ref, ref_cache, ref_meta, scale, window, slopes)

    backend = TritonAttentionBackend(heads, kv_heads)
    meta = backend.build_metadata(seqs, block_size, DEVICE)
    out = backend.forward(q, k, v, cache, meta, scale, window, slopes)
    if kv_dtype is not None:
        cache = cache.to(dtype)
    return out, ref, cache, ref_cache


def check(out: torch.Tensor, ref: torch.Tensor, cache: torch.Tensor, ref_cache: torch.Tensor) -> None:
    tol = 1e-4 if out.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert torch.equal(cache, ref_cache)  # the step's keys and values went to the same slots


MIXED = [(0, 1), (37, 1), (5, 1), (0, 19), (64, 7), (33, 40), (0, 3)]  # decode, fresh, chunk, prefix hit


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(4, 4, 16, 16), (8, 2, 32, 8), (6, 1, 16, 32), (12, 4, 24, 16), (4, 4, 64, 5)],
    ids=["mha", "gqa4", "mqa6", "gqa3-d24", "d64-bs5"],
)
def test_mixed_steps_match_reference(heads: int, kv_heads: int, head_dim: int, block_size: int) -> None:
    check(*run_both(MIXED, heads, kv_heads, head_dim, block_size, torch.float32))


def spy_launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """(DECODE, TMA) of every launch of the attention kernel from now on."""
    launched: list[tuple[bool, bool]] = []
    kernel = ta._paged_attention_kernel

    class Spy:
        def __getitem__(self, grid: tuple[int, ...]):  # noqa: ANN204
            def launch(*args, **kwargs):  # noqa: ANN202
                launched.append((kwargs["DECODE"], kwargs["TMA"]))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(ta, "_paged_attention_kernel", Spy())
    return launched


DECODES = [(n, 1) for n in (0, 1, 15, 16, 17, 31, 32, 33, 50, 99, 130)]


@pytest.mark.parametrize(("window", "alibi"), [(None, False), (1, False), (13, False), (16, False), (40, True)])
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (6, 1)])
def test_pure_decode_step_matches_reference(
    monkeypatch: pytest.MonkeyPatch, window: int | None, alibi: bool, heads: int, kv_heads: int
) -> None:
    """A decode-only step takes the kernel's decode path (tile i is sequence i, one loop of blocks
    masked for the one query position), here over tiles of 16 keys in cache blocks of 8."""
    monkeypatch.setattr(ta, "DECODE_LAUNCH", (16 * 32, 4, 2))  # 16 keys a tile at head_dim 32
    launched = spy_launches(monkeypatch)
    check(*run_both(DECODES, heads, kv_heads, 32, 8, torch.float32, window=window, alibi=alibi, seed=1))
    assert launched and all(decode and not tma for decode, tma in launched)  # a tile spans two blocks
    run_both(MIXED, heads, kv_heads, 32, 8, torch.float32, window=window, alibi=alibi, seed=1)
    assert not launched[-1][0]  # a step with prefill chunks takes the other path


@pytest.mark.parametrize(("window", "alibi", "block_size"), [(None, False, 16), (13, False, 32), (40, True, 16)])
def test_decode_tiles_within_a_cache_block_read_it_by_tma(
    monkeypatch: pytest.MonkeyPatch, window: int | None, alibi: bool, block_size: int
) -> None:
    """Tiles of 16 keys inside cache blocks of 16 or 32: each tile's keys and values are one bulk
    copy through a tensor descriptor (TMA on a GPU; Triton's interpreter on a CPU)."""
    monkeypatch.setattr(ta, "DECODE_LAUNCH", (16 * 32, 4, 2))
    launched = spy_launches(monkeypatch)
    check(*run_both(DECODES, 8, 2, 32, block_size, torch.float32, window=window, alibi=alibi, seed=8))
    assert launched and all(decode and tma for decode, tma in launched)


def test_a_decode_step_with_fresh_runs_takes_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """One-token whole prompts as fresh runs (their tiles go last): not the decode path's tile i = sequence i."""
    monkeypatch.setattr(ta, "FRESH_MIN_LEN", 1)
    kinds = [(0, 1), (0, 1), (5, 1), (0, 1), (9, 1)]
    meta = TritonAttentionBackend(4, 2).build_metadata(make_step(kinds, 8, 20, random.Random(2)), 8, DEVICE)
    assert meta.prompt_tiles is not None and not meta.decode_only
    check(*run_both(kinds, 4, 2, 16, 8, torch.float32, seed=2))


@pytest.mark.parametrize(("window", "alibi"), [(None, False), (13, False), (40, True)])
def test_decodes_of_a_step_with_prefill_launched_apart(
    monkeypatch: pytest.MonkeyPatch, window: int | None, alibi: bool
) -> None:
    """Decodes launched apart (as over an fp8 cache, here forced on an fp32 one): their tiles come
    first and take the decode path, tile i reading sequence tile_seqs[i]; the rest the general one."""
    monkeypatch.setattr(ta, "_decodes_apart", lambda cache, decodes: decodes >= 2)
    monkeypatch.setattr(ta, "DECODE_LAUNCH", (16 * 32, 4, 2))
    kinds = [(0, 19), (37, 1), (64, 7), (5, 1), (130, 1), (33, 40), (16, 1)]  # decodes between the chunks
    seqs = make_step(kinds, 16, 40, random.Random(4))
    meta = TritonAttentionBackend(8, 2).build_metadata(seqs, 16, DEVICE)
    assert meta.decode_tiles == 4 and meta.tile_seqs is not None
    assert meta.tile_seqs[:4].tolist() == [1, 3, 4, 6]
    launched = spy_launches(monkeypatch)
    check(*run_both(kinds, 8, 2, 32, 16, torch.float32, window=window, alibi=alibi, seed=4))
    assert [decode for decode, _ in launched] == [True, False]


@pytest.mark.parametrize("window", [1, 4, 13])
def test_sliding_window_matches_reference(window: int) -> None:
    check(*run_both(MIXED, 4, 2, 16, 8, torch.float32, window=window, seed=2))


def test_alibi_matches_reference() -> None:
    check(*run_both(MIXED, 4, 4, 16, 8, torch.float32, alibi=True, seed=3))


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [32, 64])  # decode tiles of 64 keys: two blocks, or one by TMA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_long_contexts(dtype: torch.dtype, block_size: int) -> None:
    kinds = [(1000, 1), (2047, 1), (0, 700), (300, 129), (4000, 1)]
    check(*run_both(kinds, 32, 8, 128, block_size, dtype, seed=4))
    check(*run_both([(n, 1) for n in (0, 63, 64, 65, 1000, 4000)], 32, 8, 128, block_size, dtype, seed=4))


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [32, 64])
@pytest.mark.parametrize(
    "kinds",
    [
        [(500, 1), (0, 300), (120, 77), (33, 1)],
        [(n, 1) for n in (0, 5, 200, 255, 256, 1500)],
        [(0, 300)] + [(n, 1) for n in range(100, 3100, 20)] + [(120, 77)],  # 150 decodes: launched apart
    ],
    ids=["mixed", "decode", "mixed-decodes-apart"],
)
def test_fp8_kv_cache_matches_reference_on_rounded_values(kinds: list[tuple[int, int]], block_size: int) -> None:
    check(*run_both(kinds, 32, 8, 128, block_size, torch.bfloat16, seed=5, kv_dtype=torch.float8_e4m3fn))


FRESH = [(0, 9), (0, 9), (37, 1), (0, 9), (0, 12), (0, 12), (33, 40), (0, 3), (64, 7)]  # runs of whole prompts


def test_whole_prompts_get_prompt_tiles_latest_positions_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ta, "FRESH_MIN_LEN", 4)
    monkeypatch.setattr(ta, "PROMPT_LAUNCH", (4, 16, 4, 2))  # tiles of 4 query tokens
    seqs = make_step(FRESH, 8, 100, random.Random(0))
    assert whole_prompt_runs(seqs, 4) == [(0, 2, 9), (3, 1, 9), (4, 2, 12)]  # (the reference backend's runs)
    meta = TritonAttentionBackend(4, 2).build_metadata(seqs, 8, DEVICE)
    assert meta.prompt_tiles is not None  # sequences 0, 1, 3, 4, 5: (0, 3) is too short, the rest not whole
    firsts, lens, starts = meta.prompt_tiles.tolist()
    assert starts == [8] * 5 + [4] * 5 + [0] * 5  # the tiles with the most keys first
    assert firsts == [0, 9, 19, 28, 40] * 3 and lens == [9, 9, 9, 12, 12] * 3
    assert meta.tile_seqs is not None
    assert set(meta.tile_seqs[: meta.kernel_tiles].tolist()) == {2, 6, 7, 8}  # the paged kernel's share first
    assert set(meta.tile_seqs[meta.kernel_tiles :].tolist()) == {0, 1, 3, 4, 5}


def spy_prompt_launches(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """TMA of every launch of the whole-prompt kernel from now on."""
    launched: list[bool] = []
    kernel = ta._prompt_attention_kernel

    class Spy:
        def __getitem__(self, grid: tuple[int, ...]):  # noqa: ANN204
            def launch(*args, **kwargs):  # noqa: ANN202
                launched.append(kwargs["TMA"])
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(ta, "_prompt_attention_kernel", Spy())
    return launched


LONG = [(0, 40), (3, 1), (0, 37), (20, 9), (0, 16), (0, 5)]  # whole prompts of several tiles of 16


@pytest.mark.parametrize(
    ("kinds", "window", "tma"),
    [(FRESH, None, True), ([(0, 9), (0, 9), (0, 5)], None, True), (LONG, None, True), (LONG, None, False),
     (FRESH, 4, True)],
    ids=["mixed", "fresh-only", "long-tma", "long-pointers", "windowed-on-the-paged-kernel"],
)  # fmt: skip
def test_whole_prompts_match_reference(
    monkeypatch: pytest.MonkeyPatch, kinds: list[tuple[int, int]], window: int | None, tma: bool
) -> None:
    """Whole prompts through the prompt kernel (tiles of 16 queries and 16 keys: the long prompts'
    later tiles see earlier keys unmasked), by TMA or by pointers; a windowed layer takes the paged one."""
    monkeypatch.setattr(ta, "FRESH_MIN_LEN", 4)
    monkeypatch.setattr(ta, "PROMPT_LAUNCH", (16, 16, 4, 2))
    if not tma:
        monkeypatch.setattr(ta, "_hopper_or_interpreter", lambda device: False)
    launched = spy_prompt_launches(monkeypatch)
    check(*run_both(kinds, 8, 2, 16, 8, torch.float32, window=window, seed=6))
    assert launched == ([] if window else [tma])


@pytest.mark.parametrize("tma", [True, False])
def test_a_prompt_never_reads_the_next_requests_values(monkeypatch: pytest.MonkeyPatch, tma: bool) -> None:
    """The last tile of a prompt reads past its end (TMA takes whole blocks of rows): an inf in the
    next request's values must not turn this prompt's rows into NaN through 0 · inf."""
    monkeypatch.setattr(ta, "FRESH_MIN_LEN", 4)
    monkeypatch.setattr(ta, "PROMPT_LAUNCH", (16, 16, 4, 2))
    if not tma:
        monkeypatch.setattr(ta, "_hopper_or_interpreter", lambda device: False)
    heads, kv_heads, d = 4, 2, 16
    seqs = make_step([(0, 70), (5, 1), (0, 9)], 8, 20, random.Random(5))
    qkv = torch.randn(80, (heads + 2 * kv_heads) * d, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    q, k, v = (x.unflatten(1, (-1, d)) for x in qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1))
    v[70] = float("inf")  # the decode's token, right after the 70-token prompt
    backend = TritonAttentionBackend(heads, kv_heads)
    cache = torch.zeros(kv_cache_shape(20, 8, kv_heads, d), device=DEVICE)
    out = backend.forward(q, k, v, cache, backend.build_metadata(seqs, 8, DEVICE), d**-0.5)
    prompt = slice(0, 70)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x[prompt].transpose(0, 1) for x in (q, k, v)), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(out[prompt], ref, rtol=1e-4, atol=1e-4)


def test_prompt_kernel_takes_power_of_two_rows_of_at_most_256_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    def fits(head_dim: int, dtype: torch.dtype) -> bool:
        return ta.prompt_kernel_fits(torch.empty(1, 1, head_dim, dtype=dtype))

    assert fits(16, torch.float32) and fits(64, torch.float32) and fits(128, torch.bfloat16)
    assert not fits(24, torch.float32) and not fits(8, torch.bfloat16)
    assert not fits(128, torch.float32) and not fits(256, torch.bfloat16)
    # a head_dim it does not take: whole prompts through the paged kernel, same results
    monkeypatch.setattr(ta, "FRESH_MIN_LEN", 4)
    launched = spy_prompt_launches(monkeypatch)
    check(*run_both(FRESH, 12, 4, 24, 8, torch.float32, seed=9))
    assert launched == []


@pytest.mark.cuda
def test_fresh_runs_in_half_precision() -> None:
    kinds = [(0, 300), (0, 300), (900, 1), (0, 512), (100, 300), (0, 256), (0, 2048)]
    check(*run_both(kinds, 32, 8, 128, 32, torch.bfloat16, seed=7))


@pytest.mark.cuda
def test_step_compositions_reuse_the_compiled_kernels() -> None:
    """Steps of other sizes, widths and mixes compile nothing new (a compile stalls serving ~1 s)."""
    steps = [[(5, 1)], [(5, 1)] * 3, [(40, 1), (0, 9)], [(0, 17)] * 5, [(100, 3), (7, 1)] * 7, [(1, 1)] * 33]
    steps += [[(0, 1100)], [(3, 1), (0, 1030), (0, 1500)], [(0, 2000), (9, 1)]]  # whole prompts
    device = torch.cuda.current_device()
    paged = ta._paged_attention_kernel.device_caches[device][0]
    prompts = ta._prompt_attention_kernel.device_caches[device][0]
    before = len(paged), len(prompts)
    for i, kinds in enumerate(steps):
        check(*run_both(kinds, 12, 6, 64, 16, torch.bfloat16, seed=i))  # a head shape no other test uses
    assert len(paged) - before[0] <= 2  # one decode tile, one prefill tile
    assert len(prompts) - before[1] <= 1


def test_skipped_slots_leave_the_cache_alone() -> None:
    from shardserve.workers.triton_attention import write_kv

    cache = torch.zeros(kv_cache_shape(3, 4, 2, 8), device=DEVICE)  # 3 blocks of 4 slots, 2 heads
    k = torch.ones(3, 2, 8, device=DEVICE)
    write_kv(cache, k, 2 * k, torch.tensor([5, -1, 0], device=DEVICE))
    flat = cache.transpose(2, 3).reshape(2, 12, 2, 8)  # [2, slots, heads, d]
    assert flat[0, 5].eq(1).all() and flat[1, 5].eq(2).all() and flat[0, 0].eq(1).all()
    assert flat[:, [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]].eq(0).all()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_engine_on_triton_kernels_equals_transformers(tiny_checkpoint, family: str) -> None:
    """The whole engine with `model.attention: triton` (compiled on a GPU, interpreted on a CPU):
    staggered prompts, chunked prefill, a small cache with preemption, prefix hits."""
    from shardserve.engine.engine import LLM
    from shardserve.engine.request import SamplingParams
    from tests.checkpoints import hf_greedy, staggered_prompts

    path, hf = tiny_checkpoint(family)
    llm = LLM(
        path,
        device=DEVICE.type,
        dtype="float32",
        attention="triton",
        cache={"block_size": 8, "num_blocks": 24},
        scheduler={"max_num_tokens": 48},
    )
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = staggered_prompts(hf.config.vocab_size)
    prompts += [prompts[0] + prompts[1][:5]]  # a prefix hit on prompts[0]'s full blocks
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, params.max_tokens)
