"""Weight quantization: per-output-channel scales, fp8 (e4m3) and int8 weight-only.

`quantize_weight` runs at build time. `quantize_linears` turns a model's parallel linear layers
into quantized ones before its rank file is loaded: the weight parameter takes the quantized dtype
and a `weight_scale` [local out features] parameter appears beside it, sharded with its weight
(split with the rows of a column-parallel layer, whole on every rank of a row-parallel one).
`quantized_linear` is the matmul: `torch._scaled_mm` with per-token activation scales for fp8 on
GPUs that have fp8 tensor cores, dequantize-then-matmul everywhere else. Where a fused kernel
makes the activation (RMSNorm, SiLU·mul) and `takes_fp8` says its layer multiplies in fp8, the
kernel quantizes it on the way out and hands the layer an `Fp8Input`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from shardserve.models import fused

QUANT_DTYPES: dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "int8_weight_only": torch.int8}
QUANTIZATIONS = ("none", *QUANT_DTYPES)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


class Fp8Input(NamedTuple):
    """An activation already quantized per token by the kernel that made it: values [tokens, in]
    float8_e4m3fn, scale [tokens, 1] float32 (amax / FP8_MAX), and the dtype of the matmul's output."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def quantize_weight(weight: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] → (quantized [out, in], scale [out] float32) with weight ≈ q · scale."""
    w = weight.float()
    amax = w.abs().amax(dim=1).clamp_min(1e-12)
    if method == "fp8":
        scale = amax / FP8_MAX
        q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    elif method == "int8_weight_only":
        scale = amax / 127.0
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    else:
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATIONS)}")
    return q, scale


def quantize_linears(model: nn.Module, method: str) -> None:
    """Give every parallel linear layer of `model` a quantized weight and a `weight_scale`."""
    from shardserve.models.layers import ColumnParallelLinear, RowParallelLinear, _param

    for module in model.modules():
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear):
            continue
        old = module.weight
        weight = nn.Parameter(torch.empty(old.shape, dtype=QUANT_DTYPES[method], device=old.device), False)
        weight.shard_fn, weight.place_fn = old.shard_fn, old.place_fn  # type: ignore[attr-defined]
        weight.quantized = True  # type: ignore[attr-defined]
        module.weight = weight
        if isinstance(module, ColumnParallelLinear):
            scale = _param(old.shape[0], shard=module.shard_rows, place=module.place_rows)
        else:
            scale = _param(old.shape[0])
        module.weight_scale = nn.Parameter(scale.data.to(device=old.device, dtype=torch.float32), False)
        module.weight_scale.shard_fn, module.weight_scale.place_fn = scale.shard_fn, scale.place_fn
        module.quantization = method


def quantize_loaded(model: nn.Module, method: str) -> None:
    """Quantize the loaded float weights of every parallel linear layer in place (at run time,
    for a checkpoint that was not built quantized), one layer at a time."""
    from shardserve.models.layers import ColumnParallelLinear, RowParallelLinear

    for module in model.modules():
        if isinstance(module, ColumnParallelLinear | RowParallelLinear):
            q, scale = quantize_weight(module.weight.data, method)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.weight_scale = nn.Parameter(scale, requires_grad=False)
            module.quantization = method


def takes_fp8(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` multiplies x through `torch._scaled_mm` with x quantized by a fused kernel,
    so the kernel that makes x may hand it over as an `Fp8Input`."""
    weight = layer.weight
    return weight.dtype == torch.float8_e4m3fn and fused.enabled(x) and _has_fp8_mm(x, weight)


def quantized_linear(x: torch.Tensor | Fp8Input, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: [tokens, in] (or its fp8 values and scales); weight: [out, in] fp8/int8; scale: [out] float32 -> [tokens, out]
    if isinstance(x, Fp8Input):
        return _scaled_mm(x, weight, scale)
    if weight.dtype == torch.float8_e4m3fn and _has_fp8_mm(x, weight):
        if fused.enabled(x) and x.stride(-1) == 1:
            xq, x_scale = fused.quantize_fp8_per_token(x, FP8_MAX)
        else:
            x_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
            xq = (x / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return _scaled_mm(Fp8Input(xq, x_scale, x.dtype), weight, scale)
    return nn.functional.linear(x, weight.to(x.dtype) * scale[:, None].to(x.dtype))


def _scaled_mm(x: Fp8Input, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # fast accumulation (partial sums not promoted to float32 along K, like vLLM's CUTLASS fp8
    # kernels): 8-20 % faster on an H100 (benchmarks/README.md), within the fp8 tests' tolerance
    return torch._scaled_mm(
        x.data, weight.t(), scale_a=x.scale, scale_b=scale[None, :], out_dtype=x.dtype, use_fast_accum=True
    )


def _has_fp8_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not x.is_cuda or torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    return weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0 and x.dim() == 2
