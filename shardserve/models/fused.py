"""Fused CUDA kernels (Triton) for the elementwise work around the matmuls.

Each replaces a chain of torch kernels that reads and writes the activations several times:
- `rms_norm`: (x + residual) → new residual, RMSNorm in float32 → weight · normed: one pass;
- `silu_and_mul`: silu(gate) · up from the fused gate/up projection: one pass;
- `rms_norm_fp8`, `silu_and_mul_fp8`: the same, quantized per token for the fp8 matmul that reads
  them (`quantization.Fp8Input`), so no separate quantize pass reads them again;
- `rotary_`: rotate-half rotary embeddings of q and k in place (views of the fused qkv output);
- `quantize_fp8_per_token`: a row's amax, its scale and the fp8 cast (before `torch._scaled_mm`).
They round where the torch layers round (the residual sum and the normed value to the activation
dtype), so the results equal the torch path's up to float32 summation order. `enabled(x)` says
whether a tensor takes the fused path: on CUDA. (The tests also run the kernels on a CPU, in
Triton's interpreter.)
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch layers are used
    triton = None


def enabled(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _store_row(out, scale_out, y, ok, FP8_MAX: tl.constexpr):
        """Store a row of activations as they are or, with FP8_MAX > 0, quantized per token: its
        amax / FP8_MAX to `scale_out` and y / scale in fp8, as `_quant_fp8_kernel` would (masked
        columns must hold zeros)."""
        if FP8_MAX > 0:
            yf = y.to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(yf), 0), 1e-12) / FP8_MAX
            tl.store(out, tl.minimum(tl.maximum(yf / scale, -FP8_MAX), FP8_MAX).to(out.dtype.element_ty), mask=ok)
            tl.store(scale_out, scale)
        else:
            tl.store(out, y.to(out.dtype.element_ty), mask=ok)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, eps,
        stride_x, stride_res, stride_out, stride_res_out,
        N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FP8_MAX: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded as the torch add rounds
            tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=ok)
        h = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(h * h, 0) / N + eps)
        normed = (h * inv).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        _store_row(out_ptr + row * stride_out + cols, scale_ptr + row, (w * normed).to(x.dtype), ok, FP8_MAX)

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr, out_ptr, scale_ptr, stride_x, stride_out, N: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # FP8_MAX > 0: one block holds the row
        ok = cols < N
        gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + N + cols, mask=ok, other=0.0)
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # silu, rounded as torch's silu output is
        y = (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype)
        _store_row(out_ptr + row * stride_out + cols, scale_ptr + row, y, ok, FP8_MAX)

    @triton.jit
    def _quant_fp8_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, N: tl.constexpr, BLOCK: tl.constexpr,
                          FP8_MAX: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        _store_row(q_ptr + row * stride_q + cols, scale_ptr + row, x, ok, FP8_MAX)

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
        HEADS_PAD: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        d = tl.arange(0, HALF_PAD)
        d_ok = d < HALF
        cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d_ok, other=0.0)[None, :]
        sin = tl.load(sin_ptr + pos * stride_cos + d, mask=d_ok, other=0.0)[None, :]
        h = tl.arange(0, HEADS_PAD)[:, None]
        for which in tl.static_range(2):
            if which == 0:
                base = q_ptr + t * stride_qt + h * stride_qh
                ok = (h < HEADS) & d_ok[None, :]
            else:
                base = k_ptr + t * stride_kt + h * stride_kh
                ok = (h < KV_HEADS) & d_ok[None, :]
            x1 = tl.load(base + d[None, :], mask=ok, other=0.0)
            x2 = tl.load(base + HALF + d[None, :], mask=ok, other=0.0)
            a, b = x1.to(tl.float32), x2.to(tl.float32)
            tl.store(base + d[None, :], (a * cos - b * sin).to(x1.dtype), mask=ok)
            tl.store(base + HALF + d[None, :], (b * cos + a * sin).to(x1.dtype), mask=ok)


def quantize_fp8_per_token(x: torch.Tensor, fp8_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, n] → (x / scale as float8_e4m3fn, scale [tokens, 1] float32), scale = amax / fp8_max."""
    n = x.shape[-1]
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n)
    _quant_fp8_kernel[(x.shape[0],)](
        x, q, scale, x.stride(0), q.stride(0), N=n, BLOCK=block, FP8_MAX=fp8_max, num_warps=_row_warps(block)
    )
    return q, scale


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, residual [tokens, hidden] → (weight · rmsnorm(x + residual), x + residual or None)."""
    out, _, added = _rms_norm(x, weight, eps, residual, torch.empty_like(x), 0.0)
    return out, added


def rms_norm_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, fp8_max: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`rms_norm` quantized per token on the way out: (fp8 values, scale [tokens, 1] float32,
    x + residual or None), what `quantize_fp8_per_token` makes of `rms_norm`'s output."""
    return _rms_norm(
        x, weight, eps, residual, torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device), fp8_max
    )


def _rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, out: torch.Tensor, fp8_max: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device) if fp8_max else out
    res_out = torch.empty_like(x) if residual is not None else None
    res = residual if residual is not None else x
    _rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, res_out if res_out is not None else out, scale, eps,
        x.stride(0), res.stride(0), out.stride(0), (res_out if res_out is not None else out).stride(0),
        N=n, BLOCK=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None, FP8_MAX=fp8_max,
        num_warps=_warps(n),
    )  # fmt: skip
    return out, scale, res_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [tokens, 2·inter] (gate, then up) → silu(gate) · up [tokens, inter]."""
    n = x.shape[-1] // 2
    out = x.new_empty(x.shape[0], n)
    block = 1024
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(n, block))](
        x, out, out, x.stride(0), out.stride(0), N=n, BLOCK=block, FP8_MAX=0.0
    )
    return out


def silu_and_mul_fp8(x: torch.Tensor, fp8_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`silu_and_mul` quantized per token on the way out: (fp8 values, scale [tokens, 1] float32).
    One program holds a whole row (its amax)."""
    n = x.shape[-1] // 2
    out = torch.empty(x.shape[0], n, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n)
    _silu_and_mul_kernel[(x.shape[0], 1)](
        x, out, scale, x.stride(0), out.stride(0), N=n, BLOCK=block, FP8_MAX=fp8_max,
        num_warps=_row_warps(block),
    )  # fmt: skip
    return out, scale


def rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half rotary embeddings of q [tokens, heads, d] and k [tokens, kv_heads, d], in place.
    cos, sin: [positions, d] float32 (each half repeats the frequencies)."""
    half = q.shape[-1] // 2
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1
    heads = max(q.shape[1], k.shape[1])
    _rotary_kernel[(q.shape[0],)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        HEADS=q.shape[1], KV_HEADS=k.shape[1], HALF=half, HALF_PAD=triton.next_power_of_2(half),
        HEADS_PAD=triton.next_power_of_2(heads),
    )  # fmt: skip


def _warps(n: int) -> int:
    return 4 if n <= 2048 else 8


def _row_warps(block: int) -> int:
    """Warps of a program that holds a whole row of `block` columns (its amax for fp8 scales)."""
    return 16 if block >= 8192 else 8
