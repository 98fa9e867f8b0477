"""float32 matmuls on the CPU through oneDNN instead of torch's default sgemm.

torch's default float32 CPU product (MKL sgemm) splits a small-batch product x [m, k] · Wᵀ over
the rows of x, so at m = 16 decode rows each thread streams the whole weight from memory: a
decode step, which is bound by reading the weights, reads them once per thread. oneDNN's inner
product (`torch.ops.mkldnn._linear_pointwise`, given the plain weight: no packed copy, no extra
memory) splits over the output columns. On the 2-vCPU EPYC of CI (benchmarks/README.md), SmolLM2's
30 layers at 16 rows: 82 against 99 ms; its 49152-row vocab projection: 18.9 against 34.7 ms; a
2048-row prefill of the layers: 3.15 against 3.76 s. Other dtypes (no bfloat16 inner product on
CPUs without AVX-512 BF16) and other devices keep `torch.nn.functional.linear`.
"""

from __future__ import annotations

import torch
from torch import nn

ENABLED = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ (+ b), as `torch.nn.functional.linear`."""
    if ENABLED and _takes(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return nn.functional.linear(x, weight, bias)


def _takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and weight.is_contiguous()
        and x.dim() >= 2
    )
