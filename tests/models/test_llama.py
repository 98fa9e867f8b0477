"""The Llama family (Llama, Llama-3 rope scaling, Mistral sliding window, Qwen2 qkv bias, tied
embeddings) against transformers on the same tiny checkpoints: greedy tokens identical with
requests arriving at different steps; logits within 1e-4 relative."""

from __future__ import annotations

import pytest
import torch

from shardserve.engine.engine import LLMEngine
from shardserve.engine.request import SamplingParams
from shardserve.workers.attention import AttentionMetadata, ForwardContext, SeqSpan
from tests.checkpoints import hf_greedy

FAMILIES = ["llama", "llama3", "mistral", "qwen2"]
PROMPT_LENGTHS = [3, 17, 5, 40, 9, 26, 1, 12, 33]
MAX_TOKENS = 12


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def run_staggered(engine: LLMEngine, prompt_list: list[list[int]], params: SamplingParams) -> dict[str, list[int]]:
    """Three requests at the start, then one more at every step; returns tokens per request id."""
    pending = list(enumerate(prompt_list))
    for _ in range(3):
        i, p = pending.pop(0)
        engine.add_request(p, params, request_id=str(i))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests() or pending:
        if pending:
            i, p = pending.pop(0)
            engine.add_request(p, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
    return tokens


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers(tiny_checkpoint, family: str) -> None:
    path, hf = tiny_checkpoint(family)
    engine = LLMEngine.from_model(path, cache={"block_size": 8}, scheduler={"max_num_tokens": 48})
    prompt_list = prompts(hf.config.vocab_size)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    got = run_staggered(engine, prompt_list, params)
    for i, prompt in enumerate(prompt_list):
        assert got[str(i)] == hf_greedy(hf, prompt, MAX_TOKENS), f"{family}: prompt {i} (len {len(prompt)})"
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_logits_within_1e_4(tiny_checkpoint, family: str) -> None:
    path, hf = tiny_checkpoint(family)
    engine = LLMEngine.from_model(path, cache={"block_size": 8, "num_blocks": 16})
    runner = engine.executor.worker.runner
    prompt = prompts(hf.config.vocab_size)[3]  # 40 tokens: 5 blocks, crosses Mistral's window
    n = len(prompt)
    table = [15, 3, 9, 0, 7]  # scattered blocks: reads go through the block table
    meta = AttentionMetadata.build([SeqSpan(0, n, n, table)], 8, torch.device("cpu"))
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(prompt), torch.arange(n), ForwardContext(meta, runner.kv_caches, runner.backend))
        ours = runner.model.compute_logits(hidden)
        ref = hf(torch.tensor([prompt])).logits[0]
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"{family}: max relative logits error {rel:.2e}"
