"""Host-side helpers of the attention backends: slot mapping and host lists to tensors."""

from __future__ import annotations

import pytest
import torch

from shardserve.workers.attention import SeqSpan, slot_mapping, to_device


def test_slot_mapping_of_decodes_and_chunks() -> None:
    bs = 4
    seqs = [
        SeqSpan(0, 1, 9, [7, 2, 5]),  # a decode at position 8: block 5, offset 0
        SeqSpan(1, 3, 6, [3, 8]),  # a chunk at positions 3..5: across a block boundary
        SeqSpan(4, 1, 1, [6]),  # a one-token prompt
    ]
    expected = [
        s.block_table[p // bs] * bs + p % bs for s in seqs for p in range(s.context_len - s.query_len, s.context_len)
    ]
    assert slot_mapping(seqs, bs) == expected == [20, 15, 32, 33, 24]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("values", [[], [0, 5, -3, 2**30]])
def test_to_device_equals_torch_tensor(dtype: torch.dtype, values: list[int]) -> None:
    got = to_device(values, dtype, torch.device("cpu"))
    want = torch.tensor(values, dtype=dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)
    got.add_(1)  # a tensor of its own, writable
    assert torch.equal(got, want + 1)
