"""Streaming safetensors I/O: one tensor in memory at a time.

The reader uses positioned reads (not a memory map), so tensors already read do not stay in
the process's resident set; the writer lays out the header from the tensors' specs first and
then appends each tensor's bytes in order.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from shardserve.builder.errors import CheckpointError

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def read_header(file: Path) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file; a short or corrupt header is a CheckpointError."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise CheckpointError(f"{file}: truncated safetensors file (header of {length} bytes, file {size})")
        try:
            return 8 + length, json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: corrupt safetensors header") from None


def _entries(header: dict) -> list[tuple[str, dict]]:
    """Header entries in file order."""
    items = ((n, i) for n, i in header.items() if n != "__metadata__")
    return sorted(items, key=lambda kv: kv[1]["data_offsets"][0])


def tensor_specs(file: Path) -> list[TensorSpec]:
    """The tensors of `file` in file order (the order `iter_tensors` reads them)."""
    _, header = read_header(file)
    return [TensorSpec(name, CODE_DTYPES[info["dtype"]], tuple(info["shape"])) for name, info in _entries(header)]


def iter_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of `file`, read with pread into fresh memory (file order)."""
    start, header = read_header(file)
    items = _entries(header)
    fd = os.open(file, os.O_RDONLY)
    try:
        for name, info in items:
            begin, end = info["data_offsets"]
            buf = bytearray(end - begin)
            if os.preadv(fd, [buf], start + begin) != len(buf):
                raise CheckpointError(f"{file}: truncated while reading {name}")
            dtype = CODE_DTYPES[info["dtype"]]
            tensor = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(info["shape"])
    finally:
        os.close(fd)


def map_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of `file` as a read-only view of a memory map (file order): no zero-filled
    buffer and no copy, so loading an engine whose file is in the page cache costs only the copy
    to the device. The views must only be read (copied into parameters): writing one faults.
    The map stays alive while any view does. (A private copy-on-write map would be charged in
    full against the host's commit limit and fail for files larger than RAM.)"""
    start, header = read_header(file)
    with file.open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    for name, info in _entries(header):
        begin, end = info["data_offsets"]
        dtype = CODE_DTYPES[info["dtype"]]
        if start + end > len(mm):
            raise CheckpointError(f"{file}: truncated: {name} ends at byte {start + end}, the file has {len(mm)}")
        if end == begin:
            yield name, torch.empty(info["shape"], dtype=dtype)
            continue
        with warnings.catch_warnings():  # torch warns that the buffer is not writable: it is not written
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        yield name, view.reshape(info["shape"])


class StreamingWriter:
    """Writes a safetensors file whose tensors are known up front and arrive one by one, in order."""

    def __init__(self, file: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.file = file
        self.specs = specs
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": DTYPE_CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._f = file.open("wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            got = (name, tensor.dtype, tuple(tensor.shape))
            raise RuntimeError(f"{self.file.name}: expected {spec} next, got {got}")
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._f.write(data.reshape(-1).view(torch.uint8).numpy().data)  # no extra copy
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next :]]
            self._f.close()
            raise RuntimeError(f"{self.file.name}: {len(missing)} tensors never written, first {missing[0]}")
        self._f.close()
