"""Tiny random Hugging Face checkpoints (fixed seeds, float32) with a small trained tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 320
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "How do I count to nine in French? un deux trois quatre cinq six sept huit neuf",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "hello world, hello shardserve: paged attention and in-flight batching",
]

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3": (
        "llama",
        {
            "num_key_value_heads": 1,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    "mistral": ("mistral", {"sliding_window": 24}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
}


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        str(path)
    )


def make_checkpoint(path: Path, family: str, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
    """Save a tiny random Llama-family model (and tokenizer) under `path`; returns (path, HF model)."""
    model_type, extra = FAMILIES[family]
    return make_model_checkpoint(path, model_type, seed, **{**BASE, **extra, **overrides})


def make_model_checkpoint(path: Path, model_type: str, seed: int = 0, **config_kwargs: Any) -> tuple[Path, Any]:
    """Save a tiny random transformers `model_type` model with `config_kwargs` and the test tokenizer
    (vocab_size must be >= VOCAB); returns (path, HF model in eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random weights large enough that logits are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.eval()
    model.save_pretrained(str(path))
    make_tokenizer(path)
    return path, model


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt alone (never stops early)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def staggered_prompts(vocab: int, lengths: tuple[int, ...] = (3, 17, 5, 40, 9, 26, 1, 12, 33)) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, min(vocab, VOCAB), (n,), generator=g).tolist() for n in lengths]


def run_staggered(engine: Any, prompt_list: list[list[int]], params: Any) -> dict[str, list[int]]:
    """Three requests at the start, then one more at every step; returns output tokens per request id."""
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


def assert_greedy_matches(path: Path, hf: Any, max_tokens: int = 12, **engine_sections: Any) -> None:
    """Greedy tokens of staggered requests through LLMEngine equal transformers on each prompt alone."""
    from shardserve.engine.engine import LLMEngine
    from shardserve.engine.request import SamplingParams

    sections = {"cache": {"block_size": 8}, "scheduler": {"max_num_tokens": 48}, **engine_sections}
    engine = LLMEngine.from_model(path, **sections)
    prompt_list = staggered_prompts(engine.arch.vocab_size)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    got = run_staggered(engine, prompt_list, params)
    for i, prompt in enumerate(prompt_list):
        assert got[str(i)] == hf_greedy(hf, prompt, max_tokens), f"prompt {i} (len {len(prompt)})"
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def prompt_logits_error(path: Path, hf: Any, prompt_len: int = 40) -> float:
    """Max |ours − transformers| / max |transformers| over every position of one prompt,
    with the prompt's KV in scattered cache blocks."""
    from shardserve.engine.engine import LLMEngine
    from shardserve.workers.attention import AttentionMetadata, ForwardContext, SeqSpan

    engine = LLMEngine.from_model(path, cache={"block_size": 8, "num_blocks": 16})
    runner = engine.executor.worker.runner
    prompt = staggered_prompts(engine.arch.vocab_size, (prompt_len,))[0]
    table = [15, 3, 9, 0, 7, 12, 1, 5][: -(-prompt_len // 8)]
    meta = AttentionMetadata.build([SeqSpan(0, prompt_len, prompt_len, table)], 8, torch.device("cpu"))
    ctx = ForwardContext(meta, runner.kv_caches, runner.backend)
    with torch.inference_mode():
        ours = runner.model.compute_logits(runner.model(torch.tensor(prompt), torch.arange(prompt_len), ctx))
        ref = hf(torch.tensor([prompt])).logits[0]
    return float((ours - ref).abs().max() / ref.abs().max())
