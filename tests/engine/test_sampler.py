"""Sampler: greedy/temperature/top-k/top-p/min-p, seeded reproducibility, penalties, bans, logprobs.

Statistical tests draw many samples in one batched call (every row gets its own noise) from
fixed seeds, so they are deterministic; the tolerances are those of a 99.95% chi-square test.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import torch

from shardserve.engine.request import SamplingParams
from shardserve.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingRow,
    apply_penalties_and_bans,
    banned_token_ids,
    min_p_filter,
    top_k_top_p,
)

N_DRAWS = 4000
# Known probabilities, deliberately not in rank order, so masks must be scattered back.
PROBS = torch.tensor([0.30, 0.05, 0.50, 0.15])  # ranks: 2 > 0 > 3 > 1
RANKED = [2, 0, 3, 1]


# ---------------------------------------------------------------------------- helpers


def make_row(
    token_ids: Sequence[int] = (0,),
    num_prompt_tokens: int | None = None,
    eos_token_ids: Iterable[int] = (),
    bad_words_ids: Sequence[Sequence[int]] = (),
    **params: Any,
) -> SamplingRow:
    """A row whose history is `token_ids`, the first `num_prompt_tokens` (default: all) the prompt."""
    return SamplingRow(
        params=SamplingParams(**params),
        token_ids=list(token_ids),
        num_prompt_tokens=len(token_ids) if num_prompt_tokens is None else num_prompt_tokens,
        eos_token_ids=frozenset(eos_token_ids),
        bad_words_ids=tuple(tuple(w) for w in bad_words_ids),
    )


def logits_of(probs: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is `probs` (a 1-D tensor)."""
    return torch.as_tensor(probs, dtype=torch.float32).log()


def sample_many(
    logits: torch.Tensor, n: int = N_DRAWS, seeded: bool = False, sampler_seed: int = 0, **params: Any
) -> list[int]:
    """`n` independent draws from one logits row: either n rows of one batch sharing the
    sampler's generator, or (seeded) n rows with request seeds 0..n-1."""
    if seeded:
        rows = [make_row(seed=s, **params) for s in range(n)]
    else:
        rows = [make_row(**params)] * n
    return Sampler(seed=sampler_seed)(logits.expand(n, -1), rows).token_ids


def counts_of(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double()


def support_of(tokens: list[int]) -> set[int]:
    return set(tokens)


def chi_square_bound(df: int, z: float = 3.29) -> float:
    """Upper ~99.95% quantile of chi-square(df) (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def assert_follows(tokens: list[int], probs: torch.Tensor) -> None:
    """The draws hit exactly the support of `probs`, with frequencies close to `probs`."""
    probs = probs.double() / probs.sum()
    counts = counts_of(tokens, probs.numel())
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the support: {counts.tolist()}"
    assert bool((counts[support] > 0).all()), f"some token of the support never drawn: {counts.tolist()}"
    expected = probs[support] * len(tokens)
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    if df > 0:
        assert stat < chi_square_bound(df), f"chi2={stat:.1f} (df={df}): {counts.tolist()} vs {expected.tolist()}"


def renormalized(probs: torch.Tensor, keep: Iterable[int]) -> torch.Tensor:
    out = torch.zeros_like(probs)
    idx = list(keep)
    out[idx] = probs[idx]
    return out / out.sum()


def fake_model_logits(token_ids: Sequence[int], vocab: int = 64) -> torch.Tensor:
    """Deterministic pseudo-model: logits depend only on the history."""
    gen = torch.Generator().manual_seed(len(token_ids) * 1_000_003 + 7 * token_ids[-1] + 1)
    return torch.randn(vocab, generator=gen) * 1.5


@pytest.fixture
def sampler() -> Sampler:
    return Sampler(seed=0)


# ---------------------------------------------------------------------------- greedy, temperature


def test_greedy_is_argmax_and_ignores_filters(sampler: Sampler) -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    rows = [make_row(temperature=0.0, top_k=5, top_p=0.3, min_p=0.5) for _ in range(8)]
    out = sampler(logits, rows)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert all(type(t) is int for t in out.token_ids)
    assert out.logprobs == [None] * 8


def test_greedy_rows_mixed_with_random_rows(sampler: Sampler) -> None:
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(2))
    rows = [make_row(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    out = sampler(logits, rows)
    assert out.token_ids[0::2] == logits[0::2].argmax(dim=-1).tolist()


def test_greedy_accepts_half_precision_logits(sampler: Sampler) -> None:
    logits = torch.tensor([[0.5, 3.0, -1.0]], dtype=torch.float16)
    assert sampler(logits, [make_row(temperature=0.0)]).token_ids == [1]


@pytest.mark.parametrize("seeded", [False, True], ids=["shared-generator", "per-request-seeds"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_match_softmax_of_scaled_logits(seeded: bool, temperature: float) -> None:
    logits = torch.tensor([1.0, 0.0, 2.0, -0.5, 0.5, 1.5])
    tokens = sample_many(logits, seeded=seeded, temperature=temperature)
    assert_follows(tokens, torch.softmax(logits / temperature, dim=-1))


def test_tiny_temperature_is_practically_greedy() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 1.0])  # gap of 1 / 0.01 = 100 nats
    assert support_of(sample_many(logits, temperature=0.01)) == {2}


def test_unseeded_rows_in_one_batch_draw_independently() -> None:
    tokens = sample_many(torch.zeros(16), n=64)
    assert len(support_of(tokens)) > 8


def test_sampler_seed_makes_unseeded_draws_reproducible() -> None:
    logits = torch.zeros(32)
    assert sample_many(logits, n=50, sampler_seed=5) == sample_many(logits, n=50, sampler_seed=5)
    assert sample_many(logits, n=50, sampler_seed=5) != sample_many(logits, n=50, sampler_seed=6)


# ---------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_top_k_support_is_exactly_the_k_best(k: int) -> None:
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.0, 1.8, -0.5, 0.9])
    best = logits.topk(k).indices.tolist()
    tokens = sample_many(logits, top_k=k)
    assert support_of(tokens) == set(best)
    assert_follows(tokens, renormalized(torch.softmax(logits, -1), best))


@pytest.mark.parametrize("k", [0, 4, 100])
def test_top_k_zero_or_at_least_vocab_keeps_everything(k: int) -> None:
    logits = logits_of(PROBS)
    assert_follows(sample_many(logits, top_k=k), PROBS)


# ---------------------------------------------------------------------------- top-p


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.4, 1), (0.7, 2), (0.9, 3), (0.99, 4), (1.0, 4)],
)
def test_top_p_support_is_the_nucleus(top_p: float, kept: int) -> None:
    nucleus = RANKED[:kept]
    tokens = sample_many(logits_of(PROBS), top_p=top_p)
    assert support_of(tokens) == set(nucleus)
    assert_follows(tokens, renormalized(PROBS, nucleus))


@pytest.mark.parametrize(
    ("top_p", "kept"),
    # a token is kept iff the mass ranked above it is < top_p: masses above are 0, .5, .8, .95
    [(0.5 - 1e-4, 1), (0.5 + 1e-4, 2), (0.8 - 1e-4, 2), (0.8 + 1e-4, 3), (0.95 - 1e-4, 3), (0.95 + 1e-4, 4)],
)
def test_top_p_boundary_semantics(top_p: float, kept: int) -> None:
    out = top_k_top_p(logits_of(PROBS)[None, :].clone(), [make_row(top_p=top_p)])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == sorted(RANKED[:kept])


def test_top_p_always_keeps_the_best_token() -> None:
    out = top_k_top_p(logits_of(PROBS)[None, :].clone(), [make_row(top_p=1e-6)])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [RANKED[0]]


def test_top_p_applies_to_the_top_k_renormalized_distribution() -> None:
    # top-3 renormalized: .5/.95, .3/.95, .15/.95 -> masses above: 0, .526, .842
    assert support_of(sample_many(logits_of(PROBS), top_k=3, top_p=0.85)) == set(RANKED[:3])
    assert support_of(sample_many(logits_of(PROBS), top_k=3, top_p=0.8)) == set(RANKED[:2])


def test_top_k_top_p_masks_are_per_row() -> None:
    logits = logits_of(PROBS).expand(3, -1).clone()
    rows = [make_row(top_k=1), make_row(top_p=0.7), make_row()]
    out = top_k_top_p(logits, rows)
    kept = [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in out]
    assert kept == [{RANKED[0]}, set(RANKED[:2]), set(range(4))]
    assert torch.equal(out[2], logits[2])


def test_top_p_one_row_is_unfiltered_whatever_its_batch_mates() -> None:
    logits = torch.tensor([0.0, 0.0, -20.0])  # p(2) ~ 1e-9: mass above it is 1.0 in float32
    alone = top_k_top_p(logits[None, :].clone(), [make_row()])
    batched = top_k_top_p(logits.expand(2, -1).clone(), [make_row(), make_row(top_p=0.5)])
    assert torch.equal(alone[0], logits)
    assert torch.equal(batched[0], alone[0])


# ---------------------------------------------------------------------------- min-p


@pytest.mark.parametrize(("min_p", "kept"), [(0.0, 4), (0.05, 4), (0.2, 3), (0.5, 2), (0.7, 1), (1.0, 1)])
def test_min_p_support(min_p: float, kept: int) -> None:
    # threshold = min_p * p_max = min_p * 0.5; probabilities 0.5, 0.3, 0.15, 0.05
    nucleus = RANKED[:kept]
    tokens = sample_many(logits_of(PROBS), min_p=min_p)
    assert support_of(tokens) == set(nucleus)
    assert_follows(tokens, renormalized(PROBS, nucleus))


def test_min_p_filter_masks_below_threshold_per_row() -> None:
    logits = logits_of(PROBS).expand(2, -1).clone()
    out = min_p_filter(logits, [make_row(min_p=0.5), make_row(min_p=0.0)])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == sorted(RANKED[:2])
    assert torch.equal(out[1], logits[1])


def test_min_p_applies_after_temperature() -> None:
    # at T=2 probabilities go as sqrt(p): sqrt(.15/.5) = .55 >= .5 keeps the third token
    assert support_of(sample_many(logits_of(PROBS), min_p=0.5, temperature=1.0)) == set(RANKED[:2])
    assert support_of(sample_many(logits_of(PROBS), min_p=0.5, temperature=2.0)) == set(RANKED[:3])


def test_min_p_applies_after_top_p() -> None:
    # top-p first: masses above are 0, .5, .8 < .83 -> 3 kept; min-p (threshold .1) keeps them.
    # (min-p first would renormalize to .526, .316, .158 and top-p would then cut the third.)
    assert support_of(sample_many(logits_of(PROBS), top_p=0.83, min_p=0.2)) == set(RANKED[:3])


# ---------------------------------------------------------------------------- seeded reproducibility

TARGET_SEED = 123
STEPS = 12


def batch_mates(step: int) -> list[SamplingRow]:
    """Rows of every kind, with histories unrelated to the target's."""
    kinds: list[dict[str, Any]] = [
        {},
        {"temperature": 0.0},
        {"top_k": 3},
        {"top_p": 0.5},
        {"min_p": 0.2, "temperature": 0.7},
        {"seed": 7, "repetition_penalty": 1.3},
    ]
    return [make_row(token_ids=[step, i + 1], **kw) for i, kw in enumerate(kinds)]


def generate(
    seed: int,
    params: dict[str, Any],
    mates: int = 0,
    sampler_seed: int = 0,
    prompt: Sequence[int] = (3, 1, 4),
    steps: int = STEPS,
) -> list[int]:
    """Generate with one seeded row; at step s, `mates` other rows share the batch and the
    target sits at position s % (mates + 1). A fresh sampler each step (as after preemption)."""
    history = list(prompt)
    for step in range(steps):
        target = make_row(token_ids=history, num_prompt_tokens=len(prompt), seed=seed, **params)
        others = batch_mates(step)[:mates]
        pos = step % (len(others) + 1)
        rows = others[:pos] + [target] + others[pos:]
        logits = torch.stack([fake_model_logits(r.token_ids) for r in rows])
        out = Sampler(seed=sampler_seed + step)(logits, rows)
        history.append(out.token_ids[pos])
    return history[len(prompt) :]


TARGET_PARAMS = [
    {},
    {"temperature": 0.8},
    {"top_k": 10, "top_p": 0.9},
    {"min_p": 0.05, "repetition_penalty": 1.2},
]


@pytest.mark.parametrize("params", TARGET_PARAMS, ids=lambda p: ",".join(p) or "plain")
def test_seeded_row_reproducible_across_batch_compositions(params: dict[str, Any]) -> None:
    alone = generate(TARGET_SEED, params)
    assert len(set(alone)) > 3, "degenerate test: the sequence should vary"
    for mates in (1, 3, 6):
        assert generate(TARGET_SEED, params, mates=mates, sampler_seed=1000 * mates) == alone


def test_seeded_row_same_token_at_every_batch_position() -> None:
    history = [5, 9, 2, 6]
    target = make_row(token_ids=history, num_prompt_tokens=2, seed=TARGET_SEED)
    mates = batch_mates(0)
    expected = Sampler(seed=0)(fake_model_logits(history)[None, :], [target]).token_ids[0]
    for pos in range(len(mates) + 1):
        rows = mates[:pos] + [target] + mates[pos:]
        logits = torch.stack([fake_model_logits(r.token_ids) for r in rows])
        assert Sampler(seed=pos + 1)(logits, rows).token_ids[pos] == expected


def test_two_identical_seeded_rows_in_one_batch_agree() -> None:
    rows = [make_row(token_ids=[1, 2], seed=TARGET_SEED)] * 5
    assert len(support_of(Sampler()(torch.zeros(5, 1000), rows).token_ids)) == 1


def test_different_seeds_give_different_sequences() -> None:
    sequences = {tuple(generate(seed, {})) for seed in (TARGET_SEED, TARGET_SEED + 1, 0, 2**40)}
    assert len(sequences) == 4


def test_seeded_noise_depends_on_output_position_not_prompt_split() -> None:
    # same history and same number of output tokens -> same draw; another output index -> new noise
    logits = torch.zeros(1, 1000)

    def draw(n_prompt: int) -> int:
        return Sampler()(logits, [make_row(token_ids=[1, 2, 3, 4], num_prompt_tokens=n_prompt, seed=9)]).token_ids[0]

    assert draw(2) == draw(2)
    assert len({draw(n) for n in range(5)}) > 1


# ---------------------------------------------------------------------------- repetition penalty


@pytest.mark.parametrize(
    ("penalty", "expected"),
    [
        (2.0, [1.0, -4.0, 1.0, -1.0, 0.25, 3.0]),
        (0.5, [4.0, -1.0, 1.0, -1.0, 1.0, 3.0]),
        (1.0, [2.0, -2.0, 1.0, -1.0, 0.5, 3.0]),
    ],
)
def test_repetition_penalty_hf_semantics(penalty: float, expected: list[float]) -> None:
    # seen: 0 and 1 (prompt, 0 twice), 4 (output); positive logits divided, negative multiplied, once
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    row = make_row(token_ids=[0, 1, 0, 4], num_prompt_tokens=3, repetition_penalty=penalty)
    out = apply_penalties_and_bans(logits.clone(), [row])
    torch.testing.assert_close(out[0], torch.tensor(expected))


def test_repetition_penalty_changes_greedy_choice(sampler: Sampler) -> None:
    logits = torch.tensor([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0]])
    rows = [make_row(token_ids=[0], temperature=0.0, repetition_penalty=2.0), make_row(token_ids=[0], temperature=0.0)]
    assert sampler(logits, rows).token_ids == [1, 0]


# ---------------------------------------------------------------------------- bad words


@pytest.mark.parametrize(
    ("history", "bad_words", "expected"),
    [
        ([1, 2], [[3]], [3]),
        ([1, 2], [[2, 3]], [3]),  # prefix just produced
        ([2, 1], [[2, 3]], []),  # prefix not at the end
        ([2], [[1, 2, 3]], []),  # history shorter than the prefix
        ([1, 2], [[1, 2, 3]], [3]),
        ([0, 2], [[1, 2, 3]], []),
        ([5, 1], [[1, 4], [5, 1, 6], [7]], [4, 6, 7]),
    ],
)
def test_banned_token_ids_for_bad_words(history: list[int], bad_words: list[list[int]], expected: list[int]) -> None:
    row = make_row(token_ids=history, num_prompt_tokens=1, bad_words_ids=bad_words)
    assert sorted(banned_token_ids(row)) == expected


def test_single_token_bad_word_never_sampled(sampler: Sampler) -> None:
    logits = torch.tensor([0.0, 3.0, 0.0, 0.5])  # token 1 would be drawn ~85% of the time
    greedy = make_row(bad_words_ids=[[1]], temperature=0.0)
    assert sampler(logits[None, :], [greedy]).token_ids == [3]
    tokens = sample_many(logits, bad_words_ids=[[1]])
    assert_follows(tokens, renormalized(torch.softmax(logits, -1), [0, 2, 3]))


def test_multi_token_bad_word_never_completed_in_generation(sampler: Sampler) -> None:
    # bad word [0, 1]; the model loves token 1. Token 1 is fine except right after 0.
    bad, n_rows, steps = (0, 1), 200, 30
    logits = torch.tensor([1.0, 2.0, 0.0]).expand(n_rows, -1)
    histories = [[2] for _ in range(n_rows)]
    for _ in range(steps):
        rows = [make_row(token_ids=h, num_prompt_tokens=1, bad_words_ids=[bad]) for h in histories]
        for h, t in zip(histories, sampler(logits, rows).token_ids, strict=True):
            h.append(t)
    pairs = {(h[i], h[i + 1]) for h in histories for i in range(len(h) - 1)}
    assert bad not in pairs
    assert {(0, 0), (0, 2), (1, 0), (1, 1), (2, 1)} <= pairs  # everything else does occur


# ---------------------------------------------------------------------------- min_tokens


EOS, STOP_TOKEN = 0, 1
END_LOVING_LOGITS = torch.tensor([5.0, 4.0, 0.0, -1.0])


def min_tokens_row(num_output: int, **params: Any) -> SamplingRow:
    prompt = [3, 3]
    return make_row(
        token_ids=prompt + [2] * num_output,
        num_prompt_tokens=len(prompt),
        eos_token_ids=[EOS],
        min_tokens=3,
        stop_token_ids=[STOP_TOKEN],
        **params,
    )


@pytest.mark.parametrize("num_output", [0, 1, 2])
def test_min_tokens_bans_end_ids_until_reached(num_output: int, sampler: Sampler) -> None:
    assert sorted(banned_token_ids(min_tokens_row(num_output))) == [EOS, STOP_TOKEN]
    greedy = min_tokens_row(num_output, temperature=0.0)
    assert sampler(END_LOVING_LOGITS[None, :], [greedy]).token_ids == [2]
    rows = [min_tokens_row(num_output)] * 1000
    assert support_of(sampler(END_LOVING_LOGITS.expand(1000, -1), rows).token_ids) == {2, 3}


def test_min_tokens_reached_allows_end_ids(sampler: Sampler) -> None:
    assert banned_token_ids(min_tokens_row(3)) == []
    assert sampler(END_LOVING_LOGITS[None, :], [min_tokens_row(3, temperature=0.0)]).token_ids == [EOS]


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_are_of_the_raw_logits(sampler: Sampler) -> None:
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(3)) * 2
    raw = torch.log_softmax(logits, dim=-1)
    top_raw = int(raw[0].argmax())
    rows = [
        # penalties and bans change the sampling, not the reported log-probabilities
        make_row(token_ids=[top_raw, 4], logprobs=5, repetition_penalty=1.5, bad_words_ids=[[top_raw]]),
        make_row(logprobs=None),
        make_row(logprobs=0, temperature=0.0),
        make_row(logprobs=20, top_k=2),
    ]
    out = sampler(logits, rows)
    assert out.token_ids[0] != top_raw
    assert out.logprobs[1] is None
    for i, n in [(0, 5), (2, 0), (3, 20)]:
        lp = out.logprobs[i]
        assert lp is not None
        token = out.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(raw[i, token]), abs=1e-5)
        assert len(lp.top) == n
        values, ids = raw[i].topk(n)
        assert list(lp.top) == ids.tolist()  # best first
        torch.testing.assert_close(torch.tensor(list(lp.top.values())), values)
    assert top_raw in out.logprobs[0].top


def test_no_logprobs_requested_gives_none(sampler: Sampler) -> None:
    out = sampler(torch.zeros(3, 5), [make_row()] * 3)
    assert out.logprobs == [None, None, None]


# ---------------------------------------------------------------------------- tokens left on the device


def mixed_rows() -> list[SamplingRow]:
    """Every kind of row in one batch: greedy, penalised, banned, filtered, seeded and not."""
    return [
        make_row(temperature=0.0),
        make_row(token_ids=[1, 2, 3], temperature=0.0, repetition_penalty=1.5),
        make_row(temperature=0.7, top_k=5, seed=11),
        make_row(token_ids=[4, 5], bad_words_ids=[[5, 6]], temperature=1.0, top_p=0.8, seed=12),
        make_row(temperature=1.3, min_p=0.05, seed=13),
        make_row(token_ids=[7], num_prompt_tokens=1, eos_token_ids=[2], temperature=1.0, min_tokens=3, seed=14),
    ]


def test_device_tokens_equal_the_host_path() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    rows = mixed_rows()
    on_device = Sampler(seed=3).device_tokens(logits, rows)
    assert on_device is not None
    assert on_device.tolist() == Sampler(seed=3)(logits, rows).token_ids


def test_device_tokens_leave_log_probabilities_to_the_host_path() -> None:
    rows = [make_row(temperature=0.0), make_row(temperature=0.0, logprobs=2)]
    assert Sampler().device_tokens(torch.randn(2, 10), rows) is None


@pytest.mark.cuda
def test_device_tokens_never_wait_for_the_gpu() -> None:
    """No host sync while sampling any kind of row: the leader prepares the next step meanwhile."""
    logits = torch.randn(6, 5000, device="cuda")
    rows = mixed_rows()
    expected = Sampler(seed=3)(logits, rows).token_ids
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = Sampler(seed=3).device_tokens(logits, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens is not None and tokens.is_cuda
    assert tokens.tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filters_work_in_place_on_the_samplers_own_copy(dtype: torch.dtype) -> None:
    """Temperature, top-k / top-p, min-p and the noise change a float copy in place (each [rows,
    vocab] temporary counts in a step's memory); the caller's logits stay as they were."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = logits.clone()
    params = {"temperature": 0.7, "top_k": 10, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.2, "logprobs": 2}
    rows = [make_row(token_ids=(1, 2, 3), **params) for _ in range(6)]
    out = Sampler(seed=5)(logits, rows)
    assert torch.equal(logits, before)
    assert out.token_ids == Sampler(seed=5)(logits, rows).token_ids
    penalized = apply_penalties_and_bans(logits.float().clone(), rows)
    for row, token in zip(penalized, out.token_ids, strict=True):
        assert token in row.topk(10).indices.tolist()
