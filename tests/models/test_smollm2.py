"""The bundled demo model: SmolLM2-135M-Instruct from its Q4_1 GGUF, against transformers loading
the same GGUF (`from_pretrained(dir, gguf_file=...)`): identical greedy tokens."""

from __future__ import annotations

import pytest
import torch

from shardserve.engine.engine import LLM
from shardserve.engine.request import SamplingParams

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def demo_path():
    from shardserve.builder.errors import CheckpointError
    from shardserve.demo import default_model_path

    try:
        return default_model_path()
    except CheckpointError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ours(demo_path) -> LLM:
    return LLM(demo_path, cache={"block_size": 16})


def test_greedy_equals_transformers_on_the_gguf(demo_path, ours: LLM) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(demo_path.parent), gguf_file=demo_path.name, dtype=torch.float32)
    tok = ours.engine.tokenizer
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = ours.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ref = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                do_sample=False, pad_token_id=tok.pad_token_id,
            )[0, ids.shape[1]:].tolist()
        assert out.token_ids == ref, prompt
    assert outs[0].text.startswith(" Paris")


def test_chat_answer(ours: LLM) -> None:
    from shardserve.cli import apply_chat_template

    prompt = apply_chat_template(ours.engine.tokenizer, "What is the capital of France?")
    out = ours.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0))[0]
    assert "Paris" in out.text and out.finish_reason.value == "stop"
