"""The engine on a CUDA GPU (skipped without one): greedy tokens equal transformers on the CPU,
and fp8 engines run through `torch._scaled_mm` (Hopper) close to the float engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardserve.builder.build import BuildOptions, build_engine
from shardserve.engine.engine import LLM
from shardserve.engine.request import SamplingParams
from shardserve.models.quantization import _has_fp8_mm
from tests.checkpoints import hf_greedy, staggered_prompts

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(600)]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_cuda_greedy_equals_cpu_transformers(tiny_checkpoint, family: str) -> None:
    path, hf = tiny_checkpoint(family)
    llm = LLM(path, device="cuda", dtype="float32", cache={"block_size": 8, "num_blocks": 64})
    assert llm.engine.executor.worker.device.type == "cuda"
    prompts = staggered_prompts(hf.config.vocab_size)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)


def test_fp8_engine_uses_scaled_mm_and_stays_close(tmp_path: Path) -> None:
    from tests.builder.test_build import CHAIN_PROMPTS, chain, train_cycle_model

    path = train_cycle_model(tmp_path / "m")
    build_engine(path, tmp_path / "bf16", BuildOptions(dtype="bfloat16", progress=False))
    build_engine(path, tmp_path / "fp8", BuildOptions(dtype="bfloat16", quantization="fp8", progress=False))
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    assert _has_fp8_mm(x, torch.empty(256, 128, device="cuda", dtype=torch.float8_e4m3fn)), "not a Hopper GPU"
    prompts = [chain(start, n) for start, n in CHAIN_PROMPTS]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ref = LLM(tmp_path / "bf16", device="cuda").generate(prompts, params)
    got = LLM(tmp_path / "fp8", device="cuda").generate(prompts, params)
    same = sum(a == b for r, g in zip(ref, got, strict=True) for a, b in zip(r.token_ids, g.token_ids, strict=True))
    assert same / (32 * len(prompts)) >= 0.9


def test_fp8_norms_and_silu_quantize_for_the_matmuls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp8 Llama's RMSNorms and SiLU·mul hand their projections fp8 activations (no separate
    quantize pass), and its tokens and log-probabilities equal those of the separate passes."""
    from shardserve.models import fused, llama
    from tests.builder.test_build import CHAIN_PROMPTS, chain, train_cycle_model

    build_engine(
        train_cycle_model(tmp_path / "m"),
        tmp_path / "fp8",
        BuildOptions(dtype="bfloat16", quantization="fp8", progress=False),
    )
    prompts = [chain(start, n) for start, n in CHAIN_PROMPTS]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=2)
    made = []
    for name in ("rms_norm_fp8", "silu_and_mul_fp8"):
        kernel = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, kernel=kernel, name=name: made.append(name) or kernel(*a))
    got = LLM(tmp_path / "fp8", device="cuda").generate(prompts, params)
    assert set(made) == {"rms_norm_fp8", "silu_and_mul_fp8"}
    monkeypatch.setattr(llama, "takes_fp8", lambda layer, x: False)
    made.clear()
    ref = LLM(tmp_path / "fp8", device="cuda").generate(prompts, params)
    assert not made
    for g, r in zip(got, ref, strict=True):
        assert g.token_ids == r.token_ids and g.logprobs is not None and r.logprobs is not None
        assert [(a.token_id, a.logprob) for a in g.logprobs] == [(b.token_id, b.logprob) for b in r.logprobs]


def test_scaled_mm_matches_dequantized_matmul() -> None:
    from shardserve.models.quantization import quantize_weight, quantized_linear

    torch.manual_seed(0)
    w = torch.randn(512, 256, device="cuda") * 0.08
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    q, scale = quantize_weight(w, "fp8")
    ref = torch.nn.functional.linear(x.float(), w)
    fast = quantized_linear(x, q, scale).float()  # fp8 activations too: per-token scales
    assert ((fast - ref).abs().max() / ref.abs().max()) < 0.06


def test_cuda_sampled_and_logprob_batches_equal_the_cpu_engine(tiny_checkpoint) -> None:
    """A sampled batch stays on the device (the async path); one with log-probabilities and a
    penalty takes the host path. Both give the CPU engine's tokens: top_k=1 makes sampling exact."""
    path, hf = tiny_checkpoint("llama")
    prompts = staggered_prompts(hf.config.vocab_size)
    cache = {"block_size": 8, "num_blocks": 64}
    scored = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3, repetition_penalty=1.3)
    sampled = SamplingParams(max_tokens=8, temperature=0.8, top_k=1, top_p=0.9, seed=5, ignore_eos=True)
    gpu, cpu = LLM(path, device="cuda", dtype="float32", cache=cache), LLM(path, dtype="float32", cache=cache)
    got, ref = gpu.generate(prompts, scored), cpu.generate(prompts, scored)
    for g, r in zip(got, ref, strict=True):
        assert g.token_ids == r.token_ids and g.logprobs is not None and r.logprobs is not None
        for a, b in zip(g.logprobs, r.logprobs, strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-3
    assert [o.token_ids for o in gpu.generate(prompts, sampled)] == [
        o.token_ids for o in cpu.generate(prompts, GREEDY_8)
    ]


GREEDY_8 = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_the_kv_cache_takes_memory_torch_holds_but_no_tensor_uses() -> None:
    """Weights quantized at load leave their float copies in torch's caching allocator: reserved,
    unused, and not free to the driver; the cache's budget counts them as free."""
    from shardserve.config import CacheConfig
    from shardserve.workers.worker import free_gpu_bytes, num_kv_blocks

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0]
    held = torch.empty(free // 2, dtype=torch.uint8, device=device)
    del held  # half the free memory, now reserved by the allocator and unused
    assert torch.cuda.mem_get_info(device)[0] < free * 0.6
    blocks = num_kv_blocks(CacheConfig(kv_cache_free_gpu_mem_fraction=0.5), device, 1 << 20, free_gpu_bytes(device))
    assert blocks >= free * 0.49 / (1 << 20)


def test_decode_graphs_share_one_output_and_equal_eager_steps(tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every captured graph writes its hidden states into one shared buffer (the logits are
    computed outside: a [batch, vocab] output per graph would hold memory for the whole ladder),
    decode steps replay them, and their tokens equal eager steps'."""
    from shardserve.workers.cuda_graphs import DecodeGraphs

    path, hf = tiny_checkpoint("llama")
    prompts = staggered_prompts(hf.config.vocab_size)
    options = {"device": "cuda", "dtype": "float32", "cache": {"block_size": 8, "num_blocks": 64}}
    replayed: list[int] = []
    run = DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, ids, *a: replayed.append(len(ids)) or run(self, ids, *a))
    graphed = LLM(path, cuda_graph_max_batch=64, **options)
    graphs = graphed.engine.executor.worker.runner.graphs
    assert graphs is not None and len(graphs.sizes) > 4
    assert graphs.hidden.shape == (64, hf.config.hidden_size)
    got = graphed.generate(prompts, GREEDY)
    assert replayed, "no decode step replayed a graph"
    eager = LLM(path, cuda_graphs=False, **options).generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]
