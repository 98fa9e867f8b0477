"""The fused kernels (models/fused.py) against the torch layers they replace, and a whole model
on them (compiled on a GPU, interpreted on a CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.models import fused  # noqa: E402
from shardserve.models.layers import RMSNorm  # noqa: E402
from shardserve.models.rotary import RotaryEmbedding  # noqa: E402
from tests.triton_cpu import DEVICE  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = 1e-5 if a.dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 200])
def test_rms_norm_matches_the_layer(dtype: torch.dtype, hidden: int) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(hidden, 1e-5).to(DEVICE, dtype)
    norm.weight.data.copy_(torch.rand(hidden) + 0.5)
    x, residual = (torch.randn(7, hidden, device=DEVICE, dtype=dtype) for _ in range(2))
    out, none = fused.rms_norm(x, norm.weight, norm.eps)
    assert none is None
    close(out, _torch_norm(norm, x))
    out, added = fused.rms_norm(x, norm.weight, norm.eps, residual)
    ref_out, ref_added = _torch_norm(norm, x, residual)
    close(out, ref_out)
    assert torch.equal(added, ref_added)  # the residual sum is rounded as torch rounds it


def _torch_norm(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None = None):  # noqa: ANN202
    """The torch path of RMSNorm, even on CUDA (where the layer would take the fused one)."""
    enabled = fused.enabled
    try:
        fused.enabled = lambda _: False
        return norm(x, residual) if residual is not None else norm(x)
    finally:
        fused.enabled = enabled


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    x = torch.randn(5, 2 * 1100, device=DEVICE, dtype=dtype)  # not a multiple of the kernel's block
    gate, up = x.chunk(2, dim=-1)
    close(fused.silu_and_mul(x), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 rounds before quantizing
def test_fp8_outputs_equal_the_kernel_then_a_quantize_pass(dtype: torch.dtype) -> None:
    """`rms_norm_fp8` and `silu_and_mul_fp8` hand the fp8 matmul exactly what the quantize pass
    makes of `rms_norm`'s and `silu_and_mul`'s outputs: the same fp8 values and scales."""
    from shardserve.models.quantization import FP8_MAX

    torch.manual_seed(4)
    x, residual = (torch.randn(6, 300, device=DEVICE, dtype=dtype) * 3 for _ in range(2))
    weight = torch.rand(300, device=DEVICE, dtype=dtype) + 0.5
    gate_up = torch.randn(6, 2 * 1100, device=DEVICE, dtype=dtype) * 4
    gate_up[2] = 0  # an all-zero row keeps a finite scale
    for res in (None, residual):
        out, added = fused.rms_norm(x, weight, 1e-5, res)
        q, scale, added8 = fused.rms_norm_fp8(x, weight, 1e-5, res, FP8_MAX)
        _assert_same_fp8((q, scale), fused.quantize_fp8_per_token(out, FP8_MAX))
        assert (added8 is None and added is None) or torch.equal(added8, added)
    _assert_same_fp8(
        fused.silu_and_mul_fp8(gate_up, FP8_MAX), fused.quantize_fp8_per_token(fused.silu_and_mul(gate_up), FP8_MAX)
    )


def _assert_same_fp8(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert got[0].dtype == torch.float8_e4m3fn and got[1].shape == (got[0].shape[0], 1)
    assert torch.equal(got[0].float(), ref[0].float()) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (6, 1, 24)])
def test_rotary_in_place_matches_the_layer(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    torch.manual_seed(2)
    rope = RotaryEmbedding(head_dim, head_dim, 64, {"rope_theta": 10000.0}).to(DEVICE)
    qkv = torch.randn(9, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(9, heads, head_dim), k.view(9, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 2, 5, 17, 33, 40, 62, 63], device=DEVICE)
    cos, sin = rope.cos[positions].to(dtype)[:, None], rope.sin[positions].to(dtype)[:, None]
    ref_q, ref_k = rope._rotate(q.clone(), cos, sin), rope._rotate(k.clone(), cos, sin)
    fused.rotary_(positions, q, k, rope.cos, rope.sin)
    close(q, ref_q)
    close(k, ref_k)


def test_model_on_fused_kernels_equals_transformers(tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer of a Llama on the fused kernels (forced on a CPU): greedy tokens equal transformers."""
    from shardserve.engine.engine import LLM
    from shardserve.engine.request import SamplingParams
    from tests.checkpoints import hf_greedy, staggered_prompts

    monkeypatch.setattr(fused, "enabled", lambda x: True)
    path, hf = tiny_checkpoint("llama")
    llm = LLM(path, device=DEVICE.type, dtype="float32", cache={"block_size": 8, "num_blocks": 64})
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = staggered_prompts(hf.config.vocab_size)[:4]
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, params.max_tokens)


@pytest.mark.cuda
def test_fp8_per_token_quantization_matches_torch() -> None:
    from shardserve.models.quantization import FP8_MAX

    torch.manual_seed(3)
    x = torch.randn(33, 3000, device="cuda", dtype=torch.bfloat16) * 3
    x[5] = 0  # an all-zero row keeps a finite scale
    q, scale = fused.quantize_fp8_per_token(x, FP8_MAX)
    ref_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    ref_q = (x / ref_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    torch.testing.assert_close(scale, ref_scale)
    assert (q.float() - ref_q.float()).abs().max() <= 16  # at most one fp8 step apart near 448
    assert torch.equal(q.float()[5], torch.zeros(3000, device="cuda"))
