"""The oneDNN float32 product equals torch's, and other inputs keep torch's path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardserve.models import cpu_matmul


@pytest.mark.skipif(not cpu_matmul.ENABLED, reason="torch built without oneDNN")
@pytest.mark.parametrize("rows", [(0,), (1,), (16,), (3, 5), (300,)])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_torch_linear(rows: tuple[int, ...], bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 96, generator=g)
    b = torch.randn(1000, generator=g) if bias else None
    x = torch.randn(*rows, 96, generator=g)
    got = cpu_matmul.linear(x, weight, b)
    assert got.shape == (*rows, 1000)
    torch.testing.assert_close(got, nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_takes_only_float32_on_the_cpu_with_a_plain_weight() -> None:
    w = torch.randn(8, 4)
    assert cpu_matmul._takes(torch.randn(2, 4), w, None)
    assert not cpu_matmul._takes(torch.randn(2, 4, dtype=torch.bfloat16), w.bfloat16(), None)
    assert not cpu_matmul._takes(torch.randn(2, 4, dtype=torch.float64), w.double(), None)
    assert not cpu_matmul._takes(torch.randn(2, 8), torch.randn(8, 8)[:, ::1].t(), None)  # transposed weight
    assert not cpu_matmul._takes(torch.randn(4), w, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_give_torch_results(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    weight, x = torch.randn(32, 16, generator=g).to(dtype), torch.randn(4, 16, generator=g).to(dtype)
    assert torch.equal(cpu_matmul.linear(x, weight), nn.functional.linear(x, weight))
