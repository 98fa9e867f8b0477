"""Reading safetensors files: pread into fresh memory (the builder) and a read-only memory map
(engine loading) give the same tensors; a truncated file is a clear error either way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardserve.builder.errors import CheckpointError
from shardserve.builder.safetensors_io import StreamingWriter, TensorSpec, iter_tensors, map_tensors

TENSORS = {
    "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
    "empty": torch.empty(0, 5, dtype=torch.float16),
    "c": torch.arange(7, dtype=torch.int8),
}


def write(path: Path) -> Path:
    writer = StreamingWriter(path, [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in TENSORS.items()])
    for name, tensor in TENSORS.items():
        writer.write(name, tensor)
    writer.close()
    return path


def test_mapped_tensors_equal_read_ones(tmp_path: Path) -> None:
    file = write(tmp_path / "t.safetensors")
    read, mapped = dict(iter_tensors(file)), dict(map_tensors(file))
    assert read.keys() == mapped.keys() == TENSORS.keys()
    for name, tensor in TENSORS.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor)
        assert torch.equal(read[name], tensor)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    file = write(tmp_path / "t.safetensors")
    file.write_bytes(file.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="truncated"):
        list(map_tensors(file))
    with pytest.raises(CheckpointError, match="truncated"):
        list(iter_tensors(file))
