"""LocalExecutor with two plans in flight (`scheduler.async_scheduling`, the default on a GPU;
forced here on the CPU): outputs equal transformers', with preemption and aborts mid-run."""

from __future__ import annotations

import torch

from shardserve.engine.engine import LLMEngine
from shardserve.engine.request import SamplingParams
from shardserve.workers.executor import LocalExecutor
from tests.checkpoints import hf_greedy

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def test_two_plans_in_flight_give_transformers_tokens(tiny_checkpoint) -> None:
    path, hf = tiny_checkpoint("llama")
    engine = LLMEngine.from_model(
        path, cache={"block_size": 4, "num_blocks": 14}, scheduler={"async_scheduling": True, "max_num_tokens": 16}
    )
    assert isinstance(engine.executor, LocalExecutor) and engine.executor.max_in_flight == 2
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 300, (7 + i,), generator=g).tolist() for i in range(6)]
    for i, p in enumerate(prompts):
        engine.add_request(p, GREEDY, request_id=str(i))
    engine.add_request(prompts[0], GREEDY, request_id="aborted")
    final, steps, overlapped = {}, 0, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        overlapped += len(engine.executor.in_flight) == 1
        if steps == 3:
            engine.abort("aborted")
        final |= {o.request_id: o for o in outs if o.finished}
    for i, p in enumerate(prompts):
        assert final[str(i)].token_ids == hf_greedy(hf, p, GREEDY.max_tokens)
    assert final["aborted"].token_ids == [] or len(final["aborted"].token_ids) < GREEDY.max_tokens
    assert engine.scheduler.stats.num_preemptions > 0
    assert overlapped > steps // 2  # a plan was in flight between most steps
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_id_reused_while_its_aborted_plan_is_in_flight(tiny_checkpoint) -> None:
    """A client cancels "x" and retries with the same id while the old plan is still running:
    the old plan's result must not land on the new request."""
    path, hf = tiny_checkpoint("llama")
    engine = LLMEngine.from_model(
        path, cache={"block_size": 4, "num_blocks": 64}, scheduler={"async_scheduling": True, "max_num_tokens": 64}
    )
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 8, 11))
    engine.add_request(a, GREEDY, request_id="x")
    engine.add_request(b, GREEDY, request_id="y")
    for _ in range(10):
        engine.step()
        if any("x" in plan.num_scheduled_tokens for plan, _ in engine.executor.in_flight):
            break
    else:
        raise AssertionError("x was never in flight")
    assert engine.abort("x")
    engine.add_request(c, GREEDY, request_id="x")
    final = {}
    while engine.has_unfinished_requests():
        final |= {o.request_id: o for o in engine.step() if o.finished and o.token_ids}
    assert final["x"].token_ids == hf_greedy(hf, c, GREEDY.max_tokens)
    assert final["y"].token_ids == hf_greedy(hf, b, GREEDY.max_tokens)


def test_run_ahead_gives_the_tokens_of_a_serial_engine(tiny_checkpoint) -> None:
    """Small batches on one rank with two plans in flight: decodes run one token ahead, their input
    id taken from the previous step's sampled tokens on the device. Greedy requests give transformers'
    tokens; a stop token, a repetition penalty, a seeded sampler and min_tokens give what a serial
    engine (no plans in flight) gives; and the cache ends empty."""
    path, hf = tiny_checkpoint("llama")
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 300, (6 + i,), generator=g).tolist() for i in range(6)]
    stop = hf_greedy(hf, prompts[2], 3)[2]
    params = [
        GREEDY,
        GREEDY,
        SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop,)),
        SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.0, min_tokens=4, ignore_eos=True),
    ]
    outputs = {}
    for overlap in (True, False):
        engine = LLMEngine.from_model(
            path, cache={"block_size": 4, "num_blocks": 64}, scheduler={"async_scheduling": overlap}
        )
        for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(prompt, sp, request_id=str(i))
        final = {}
        while engine.has_unfinished_requests():
            final |= {o.request_id: o for o in engine.step() if o.finished}
        outputs[overlap] = {r: o.token_ids for r, o in final.items()}
        if overlap:
            assert engine.scheduler.stats.num_run_ahead > 20
            assert final["2"].token_ids[-1] == stop and final["2"].finish_reason.value == "stop"
        assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
        engine.shutdown()
    assert outputs[True] == outputs[False]
    for i in (0, 1):
        assert outputs[True][str(i)] == hf_greedy(hf, prompts[i], GREEDY.max_tokens)
