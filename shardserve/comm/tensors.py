"""Tensor and object plumbing shared by the CPU backends: checks, byte views, reduce dtypes, pickling."""

from __future__ import annotations

import pickle
from typing import Any

import torch

SUPPORTED_DTYPES = frozenset(
    {torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool}
)
HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})


def check_tensor(tensor: torch.Tensor, op: str) -> None:
    """Raise a clear error for tensors no backend can move (GPU, strided, unsupported dtype)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{op}: CPU backends move CPU tensors, got one on {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"{op}: the tensor must be contiguous (call .contiguous() first)")
    if tensor.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES))
        raise TypeError(f"{op}: dtype {tensor.dtype} is not supported (supported: {names})")


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as a flat uint8 tensor (shares storage: writes land in `tensor`)."""
    # bytes: [numel * itemsize]
    return tensor.reshape(-1).view(torch.uint8)


def reduce_buffer(tensor: torch.Tensor) -> torch.Tensor:
    """What to reduce: float32 copies for half types (sum in float32), else the tensor itself."""
    return tensor.float() if tensor.dtype in HALF_DTYPES else tensor


def finish_reduce(tensor: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """Copy a float32 reduce buffer back into the caller's tensor (in place); return the tensor."""
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def unpack_gathered(gathered: torch.Tensor, like: torch.Tensor, world_size: int, dim: int) -> torch.Tensor:
    """Bytes of `world_size` tensors shaped like `like`, back-to-back -> one tensor concatenated on `dim`."""
    # gathered: [world_size * like.nbytes] uint8 -> parts: [world_size, *like.shape]
    parts = gathered.view(like.dtype).view(world_size, *like.shape)
    return torch.cat(parts.unbind(0), dim=dim)


def check_gather(tensor: torch.Tensor, dim: int) -> None:
    check_tensor(tensor, "all_gather")
    if tensor.dim() == 0:
        raise ValueError("all_gather: a 0-dim tensor has no dimension to concatenate on; reshape it to [1]")
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"all_gather: dim {dim} is out of range for a tensor of shape {list(tensor.shape)}")


def pack_object(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_object(payload: bytes | bytearray | memoryview) -> Any:
    return pickle.loads(payload)
