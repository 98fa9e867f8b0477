"""Logits → next tokens, per request parameters, batched.

In: logits [rows, vocab] of the positions to sample and one `SamplingRow` a row.
Out: one token id a row (and top-n log-probabilities where asked).

Order: repetition penalty, bans (bad words; end ids before `min_tokens`), then greedy
rows take the argmax; the others go through temperature, top-k, top-p, min-p and are
drawn by the exponential race (argmax of p / E, E ~ Exp(1)). A request with a `seed`
draws its noise from a generator seeded by (seed, output index), so its tokens do not
depend on its batch mates nor on preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardserve.engine.request import SamplingParams, TokenLogprob
from shardserve.workers.attention import to_device


@dataclass(frozen=True, slots=True)
class SamplingRow:
    params: SamplingParams
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    eos_token_ids: frozenset[int]
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    num_pending: int = 0  # outputs sampled but not in `token_ids` yet (a request run ahead: the last one)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens + self.num_pending


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def device_tokens(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor | None:
        """The tokens [rows] on the logits' device, with no host sync (host lists reach the
        device through pinned memory), when no row asks for log-probabilities. Else None."""
        if any(r.params.logprobs is not None for r in rows):
            return None
        return self._tokens(logits, rows)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        # logits: [rows, vocab]
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
        token_list = self._tokens(logits, rows).tolist()
        return SamplerOutput(token_list, _logprobs(raw_logprobs, token_list, rows))

    def _tokens(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        if all(_plain_greedy(r) for r in rows):  # the common batch: one argmax
            return logits.argmax(dim=-1)
        logits = apply_penalties_and_bans(logits.to(torch.float32, copy=True), rows)  # ours to filter in place
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if len(greedy) == len(rows):
            return logits.argmax(dim=-1)
        random = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not greedy:
            return self._sample(logits, rows)
        tokens = logits.argmax(dim=-1)
        picked = to_device(random, torch.long, logits.device)
        tokens[picked] = self._sample(logits[picked], [rows[i] for i in random])
        return tokens

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        # logits: [n, vocab], a float copy of the caller's, changed in place: every [n, vocab]
        # temporary counts in the largest step's memory (workers/memory.py)
        temps = to_device([r.params.temperature for r in rows], logits.dtype, logits.device)
        logits = min_p_filter(top_k_top_p(logits.div_(temps[:, None]), rows), rows)
        probs = torch.softmax(logits, dim=-1)
        noise = self._exponential_noise(probs, rows)
        return probs.div_(noise.clamp_min_(1e-20)).argmax(dim=-1)

    def _exponential_noise(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device = probs.device
        noise = torch.empty_like(probs).exponential_(generator=self._generator(device))
        for i, row in enumerate(rows):
            if row.params.seed is not None:
                gen = torch.Generator(device=device)
                gen.manual_seed(_mix(row.params.seed, row.num_output_tokens))
                noise[i].exponential_(generator=gen)
        return noise

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen


def _plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not banned_token_ids(row)


def apply_penalties_and_bans(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition penalty (HF semantics, over prompt and output) and banned tokens, in place."""
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0 and row.token_ids:
            ids = to_device(sorted(set(row.token_ids)), torch.long, logits.device)
            seen = logits[i, ids]
            logits[i, ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        banned = banned_token_ids(row)
        if banned:
            logits[i].index_fill_(0, to_device(banned, torch.long, logits.device), float("-inf"))  # no host scalar copy
    return logits


def banned_token_ids(row: SamplingRow) -> list[int]:
    """Tokens this row may not produce next: bad-word completions, and end ids before min_tokens."""
    banned = []
    for seq in row.bad_words_ids:
        prefix = list(seq[:-1])
        if not prefix or row.token_ids[-len(prefix) :] == prefix:
            banned.append(seq[-1])
    if row.params.min_tokens and row.num_output_tokens < row.params.min_tokens:
        banned.extend(row.eos_token_ids)
        banned.extend(row.params.stop_token_ids)
    return banned


def top_k_top_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Mask (to -inf, in place) tokens outside each row's top-k and top-p nucleus."""
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    if not any(top_k) and all(p >= 1.0 for p in top_p):
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)
    if any(top_k):
        k = to_device([kk if 0 < kk < vocab else vocab for kk in top_k], torch.long, logits.device)
        keep &= torch.arange(vocab, device=logits.device)[None, :] < k[:, None]
    if any(p < 1.0 for p in top_p):
        probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1).sub_(probs)  # mass of the tokens ranked above each one
        del probs
        p = to_device(top_p, logits.dtype, logits.device)[:, None]
        keep &= (before < p) | (p >= 1.0)  # top_p = 1 is off, whatever the float32 cumsum says
        del before
    del sorted_logits
    keep[:, 0] = True
    mask = torch.empty_like(keep).scatter_(-1, order, keep)
    return logits.masked_fill_(~mask, float("-inf"))


def min_p_filter(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Mask (to -inf, in place) tokens below each row's min_p × its most likely token's probability."""
    min_p = [r.params.min_p for r in rows]
    if not any(min_p):
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = to_device(min_p, logits.dtype, logits.device)[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill_(probs < threshold, float("-inf"))


def _logprobs(raw: torch.Tensor | None, tokens: list[int], rows: list[SamplingRow]) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = [None] * len(rows)
    if raw is None:
        return out
    for i, row in enumerate(rows):
        n = row.params.logprobs
        if n is None:
            continue
        values, ids = raw[i].topk(n) if n else (raw[i][:0], raw[i][:0].long())
        top = dict(zip(ids.tolist(), values.tolist(), strict=True))
        out[i] = TokenLogprob(tokens[i], float(raw[i, tokens[i]]), top)
    return out


def _mix(seed: int, index: int) -> int:
    """A 63-bit generator seed from a request seed and an output position (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF
