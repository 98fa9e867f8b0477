"""The `Communicator` protocol and the world-of-one implementation."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

DEFAULT_TIMEOUT_S = 60.0


class CollectiveTimeoutError(TimeoutError):
    """A collective did not complete in time; the message names the rank(s) that did not arrive."""


@runtime_checkable
class Communicator(Protocol):
    """Collectives over one group of ranks. Every call takes a timeout in seconds."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce(self, tensor: torch.Tensor, timeout: float = DEFAULT_TIMEOUT_S) -> torch.Tensor: ...

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, timeout: float = DEFAULT_TIMEOUT_S) -> torch.Tensor: ...

    def broadcast(self, tensor: torch.Tensor, src: int = 0, timeout: float = DEFAULT_TIMEOUT_S) -> torch.Tensor: ...

    def broadcast_object(self, obj: Any, src: int = 0, timeout: float = DEFAULT_TIMEOUT_S) -> Any: ...

    def send(self, tensor: torch.Tensor, dst: int, timeout: float = DEFAULT_TIMEOUT_S) -> None: ...

    def recv(self, tensor: torch.Tensor, src: int, timeout: float = DEFAULT_TIMEOUT_S) -> torch.Tensor: ...

    def barrier(self, timeout: float = DEFAULT_TIMEOUT_S) -> None: ...


class SingleRankCommunicator:
    """A world of one: every collective is the identity; point-to-point has no peer."""

    rank = 0
    world_size = 1

    def all_reduce(self, tensor: torch.Tensor, timeout: float = DEFAULT_TIMEOUT_S) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, timeout: float = DEFAULT_TIMEOUT_S) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0, timeout: float = DEFAULT_TIMEOUT_S) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        return obj

    def send(self, tensor: torch.Tensor, dst: int, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        raise RuntimeError("a world of one rank has no peer to send to")

    def recv(self, tensor: torch.Tensor, src: int, timeout: float = DEFAULT_TIMEOUT_S) -> torch.Tensor:
        raise RuntimeError("a world of one rank has no peer to receive from")

    def barrier(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        return None


class ShapeOnlyCommunicator(SingleRankCommunicator):
    """Rank `rank` of a world of `world_size`, for building models that are never run (shard planning)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def all_reduce(self, tensor: torch.Tensor, timeout: float = DEFAULT_TIMEOUT_S) -> torch.Tensor:
        raise RuntimeError("a shape-only communicator cannot run collectives")

    all_gather = broadcast = all_reduce  # type: ignore[assignment]
