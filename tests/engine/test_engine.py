"""LLMEngine end to end on a tiny Llama: prefix cache, preemption, aborts, bad input, sampling
features that need the whole engine (stop words, bad words, seeds across batch mates)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
import torch

from shardserve.engine.async_engine import AsyncLLMEngine
from shardserve.engine.engine import LLM, LLMEngine
from shardserve.engine.request import FinishReason, InvalidRequestError, SamplingParams
from tests.checkpoints import hf_greedy

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def make_engine(path: Any, **cache: Any) -> LLMEngine:
    scheduler = cache.pop("scheduler", {})
    return LLMEngine.from_model(path, cache={"block_size": 4, **cache}, scheduler=scheduler)


def run(engine: LLMEngine) -> dict[str, Any]:
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def random_prompts(n: int, length: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (length + i,), generator=g).tolist() for i in range(n)]


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return tiny_checkpoint("llama")


def test_prefix_hits_same_output_fewer_computed_tokens(llama) -> None:
    path, _ = llama
    shared = random_prompts(1, 24)[0]
    prompts = [shared + [5, 6, 7], shared + [8, 9]]
    results = {}
    for caching in (True, False):
        engine = make_engine(path, enable_prefix_caching=caching)
        for i, p in enumerate(prompts):  # one after the other: the second can hit the first's blocks
            engine.add_request(p, GREEDY, request_id=str(i))
            results[(caching, i)] = run(engine)[str(i)]
        results[caching] = engine.scheduler.stats.num_computed_tokens
        assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    for i in range(2):
        assert results[(True, i)].token_ids == results[(False, i)].token_ids
    assert results[(True, 1)].num_cached_tokens == 24
    assert results[(False, 1)].num_cached_tokens == 0
    assert results[True] == results[False] - 24


@pytest.mark.parametrize("policy", ["max_utilization", "guaranteed_completion"])
def test_tiny_cache_gives_same_outputs_as_big_cache(llama, policy: str) -> None:
    path, hf = llama
    prompts = random_prompts(6, 9)
    big = make_engine(path, num_blocks=256)
    tiny = make_engine(path, num_blocks=12, scheduler={"policy": policy})  # 48 tokens for 6 × ~21
    for engine in (big, tiny):
        for i, p in enumerate(prompts):
            engine.add_request(p, GREEDY, request_id=str(i))
    want, got = run(big), run(tiny)
    for i, p in enumerate(prompts):
        assert got[str(i)].token_ids == want[str(i)].token_ids == hf_greedy(hf, p, GREEDY.max_tokens)
    preemptions = tiny.scheduler.stats.num_preemptions
    assert preemptions > 0 if policy == "max_utilization" else preemptions == 0
    assert tiny.kv_cache.num_free_blocks == tiny.kv_cache.num_blocks


def test_abort_in_every_state_frees_the_pool(llama) -> None:
    path, _ = llama
    engine = make_engine(path, num_blocks=64, scheduler={"max_num_tokens": 16, "max_num_sequences": 2})
    ids = [engine.add_request(p, GREEDY) for p in random_prompts(5, 20)]
    final = {}

    def steps(n: int) -> None:
        for _ in range(n):
            final.update({o.request_id: o for o in engine.step() if o.finished})

    steps(1)  # ids[0] mid-prefill (chunked), the rest waiting
    assert engine.abort(ids[0]) and engine.abort(ids[4])
    steps(6)  # ids[1], ids[2] decoding
    assert engine.abort(ids[1])
    assert not engine.abort("no-such-request")
    final.update(run(engine))
    assert final[ids[0]].finish_reason is FinishReason.ABORT
    assert final[ids[2]].finish_reason is FinishReason.LENGTH and len(final[ids[2]].token_ids) == 10
    assert not engine.abort(ids[2])  # finished already
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([7] * 300, GREEDY, "max length is 256"),
        ([], GREEDY, "prompt is empty"),
        ("", GREEDY, "prompt is empty"),
        ([5, 10_000], GREEDY, "out of the vocabulary"),
        ([5, 6], SamplingParams(max_tokens=10_000), "KV-cache blocks"),
    ],
)
def test_bad_requests_are_refused_and_others_unaffected(llama, prompt, params, message: str) -> None:
    path, hf = llama
    engine = make_engine(path, num_blocks=32)  # 128 tokens: less than the model's 256
    good = random_prompts(2, 6)
    engine.add_request(good[0], GREEDY, request_id="a")
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(prompt, params)
    engine.add_request(good[1], GREEDY, request_id="b")
    final = run(engine)
    assert set(final) == {"a", "b"}
    assert final["b"].token_ids == hf_greedy(hf, good[1], GREEDY.max_tokens)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_params(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("threshold", [12_345, None])
def test_engine_sets_its_process_gc_threshold(llama, threshold: int | None) -> None:
    """`scheduler.gc_gen0_threshold` is the process's generation-0 threshold once an engine
    started (None leaves it), and the engine still runs to the same tokens."""
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, *before[1:])
        engine = make_engine(llama[0], scheduler={"gc_gen0_threshold": threshold})
        assert gc.get_threshold() == ((threshold or 700), *before[1:])
        engine.add_request([5, 6, 7], GREEDY)
        assert len(run(engine)) == 1
    finally:
        gc.set_threshold(*before)


def test_model_length_caps_output(llama) -> None:
    path, _ = llama
    engine = LLMEngine.from_model(path, model={"max_model_len": 20}, cache={"block_size": 4})
    engine.add_request(list(range(3, 18)), SamplingParams(max_tokens=50, ignore_eos=True), request_id="x")
    out = run(engine)["x"]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 5


def test_seeded_sampling_independent_of_batch_mates(llama) -> None:
    path, _ = llama
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=7, temperature=0.8, ignore_eos=True)
    prompt = random_prompts(1, 8)[0]
    alone = LLM(path).generate(prompt, seeded)[0].token_ids
    mates = random_prompts(4, 5, seed=9)
    llm = LLM(path, cache={"block_size": 4})
    outs = llm.generate([mates[0], mates[1], prompt, mates[2]], [other, other, seeded, other])
    assert outs[2].token_ids == alone
    assert LLM(path).generate(prompt, SamplingParams(**{**_asdict(seeded), "seed": 99}))[0].token_ids != alone


def test_stop_words_cut_text_and_bad_words_never_appear(llama) -> None:
    path, _ = llama
    llm = LLM(path)
    base = llm.generate("the quick brown fox", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    assert len(base.text) > 6
    stop = base.text[3:6]  # a piece of the text, likely spanning tokens
    cut = llm.generate("the quick brown fox", SamplingParams(max_tokens=30, temperature=0.0, stop_words=[stop]))[0]
    assert cut.finish_reason is FinishReason.STOP and cut.stop_reason == stop
    assert cut.text == base.text[: base.text.find(stop)]
    sampled = SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True)
    free_run = llm.generate(["the quick brown fox"] * 4, sampled)
    words = [llm.engine.tokenizer.decode([t]).strip() for out in free_run for t in out.token_ids]
    banned = max((w for w in words if w.isalpha()), key=words.count)  # the most frequent word token
    params = SamplingParams(**{**_asdict(sampled), "bad_words": (banned,)})
    seqs = llm.engine._bad_words(params)
    assert any(_contains(out.token_ids, seq) for out in free_run for seq in seqs)  # the test can fail
    for out in llm.generate(["the quick brown fox"] * 4, params):
        assert not any(_contains(out.token_ids, seq) for seq in seqs)


def _contains(tokens: list[int], seq: tuple[int, ...]) -> bool:
    return any(tuple(tokens[i : i + len(seq)]) == seq for i in range(len(tokens)))


def test_logprobs_and_streaming_deltas(llama) -> None:
    path, _ = llama
    engine = make_engine(path)
    rid = engine.add_request("hello world", SamplingParams(max_tokens=8, temperature=0.0, logprobs=3))
    deltas, last = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.text_delta)
            last = out
    assert last is not None and last.request_id == rid and last.finished
    assert "".join(deltas) == last.text
    assert len(last.logprobs) == len(last.token_ids)
    for tok, lp in zip(last.token_ids, last.logprobs, strict=True):
        assert lp.token_id == tok and len(lp.top) == 3 and lp.logprob == max(lp.top.values())


def test_async_engine_streams_and_aborts(llama) -> None:
    path, hf = llama
    engine = AsyncLLMEngine(make_engine(path))
    prompt = random_prompts(1, 7)[0]

    async def main() -> tuple[list[int], int]:
        async def collect() -> list[int]:
            return [t async for out in engine.generate(prompt, GREEDY) for t in out.new_token_ids]

        async def abandon() -> int:
            n = 0
            async for _ in engine.generate(prompt, SamplingParams(max_tokens=200, ignore_eos=True)):
                n += 1
                if n == 3:
                    break  # closing the stream aborts the request
            return n

        tokens, n = await asyncio.gather(collect(), abandon())
        return tokens, n

    try:
        tokens, n = asyncio.run(main())
        assert tokens == hf_greedy(hf, prompt, GREEDY.max_tokens) and n == 3
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown()
    assert engine.engine.kv_cache.num_free_blocks == engine.engine.kv_cache.num_blocks


def _asdict(params: SamplingParams) -> dict[str, Any]:
    return {name: getattr(params, name) for name in params.__slots__}
