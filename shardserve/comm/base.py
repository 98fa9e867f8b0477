"""The `Communicator` protocol, its errors, and the world-of-one implementations.

Ranks: a communicator serves one group. `rank` / `world_size` are this process's place in the
group and the group's size; `ranks[i]` is the GLOBAL rank of group rank `i`. `src` / `dst`
arguments are group ranks; error messages and `CommError.ranks` always use global ranks.

Timeouts: every call takes `timeout` in seconds. `DEFAULT` means the communicator's own default
(the world's `timeout_s`); `None` means no deadline, yet a call still fails with
`RankFailedError` as soon as a peer it waits on is seen dead or stopped.

Failures: after any CommError a communicator is unusable (the failed operation is still posted).
A rank process should `world.board.report_failure(str(err))`, `world.close()`, and leave with
`os._exit(code)`: MPI_Finalize and gloo's destructors can block forever on a stopped peer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

DEFAULT_TIMEOUT_S = 60.0


class _Default(enum.Enum):
    DEFAULT = "default"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default.DEFAULT
"""Use the communicator's default timeout (`default_timeout`, the world's `timeout_s`)."""

Timeout = float | None | _Default


class CommError(RuntimeError):
    """A collective failed; the message starts with "rank <r>: " and names the rank(s) responsible."""

    def __init__(self, message: str, ranks: tuple[int, ...] | list[int] = ()) -> None:
        super().__init__(message)
        self.ranks: tuple[int, ...] = tuple(ranks)  # GLOBAL ranks blamed


class CollectiveTimeoutError(CommError, TimeoutError):
    """A call did not complete in time; `ranks` are the peers that did not arrive."""


class RankFailedError(CommError):
    """A peer died, closed its connection, or stopped answering (its heartbeat went stale)."""


def rank_names(ranks: Iterable[int]) -> str:
    """ "rank 1, rank 3": every rank spelled out, so messages can be searched for "rank N"."""
    return ", ".join(f"rank {r}" for r in ranks)


def resolve_timeout(timeout: Timeout, default: float | None) -> float | None:
    """The deadline length a call runs under: `DEFAULT` -> `default`, else `timeout` itself."""
    if timeout is DEFAULT:
        return default
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout}")
    return timeout


@runtime_checkable
class PendingSend(Protocol):
    """A send posted by `isend` / `isend_object`; the sent tensor must stay untouched until `wait` returns."""

    def done(self) -> bool:
        """True once the send completed (never blocks; errors surface in `wait`)."""
        ...

    def wait(self, timeout: Timeout = DEFAULT) -> None:
        """Block until the peer has taken the data; the same errors (and timeout rules) as `send`."""
        ...


@runtime_checkable
class Communicator(Protocol):
    """Collectives over one group of ranks. Every call takes a timeout in seconds (see module doc).

    Tensors are contiguous CPU tensors of float32, float16, bfloat16, int64, int32, uint8 or bool.
    `all_reduce` sums (float16/bfloat16 accumulate in float32; bool is logical or).
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def ranks(self) -> tuple[int, ...]: ...

    def all_reduce(self, tensor: torch.Tensor, timeout: Timeout = DEFAULT) -> torch.Tensor: ...

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, timeout: Timeout = DEFAULT) -> torch.Tensor: ...

    def broadcast(self, tensor: torch.Tensor, src: int = 0, timeout: Timeout = DEFAULT) -> torch.Tensor: ...

    def broadcast_object(self, obj: Any, src: int = 0, timeout: Timeout = DEFAULT) -> Any: ...

    def send(self, tensor: torch.Tensor, dst: int, timeout: Timeout = DEFAULT) -> None: ...

    def recv(self, tensor: torch.Tensor, src: int, timeout: Timeout = DEFAULT) -> torch.Tensor: ...

    def send_object(self, obj: Any, dst: int, timeout: Timeout = DEFAULT) -> None: ...

    def recv_object(self, src: int, timeout: Timeout = DEFAULT) -> Any: ...

    def isend(self, tensor: torch.Tensor, dst: int) -> PendingSend:
        """Post a send and return at once (pipeline stages overlap it with compute)."""
        ...

    def isend_object(self, obj: Any, dst: int) -> PendingSend: ...

    def barrier(self, timeout: Timeout = DEFAULT) -> None: ...


class SingleRankCommunicator:
    """A world of one: every collective is the identity; point-to-point has no peer."""

    rank = 0
    world_size = 1
    ranks: tuple[int, ...] = (0,)

    def all_reduce(self, tensor: torch.Tensor, timeout: Timeout = DEFAULT) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, timeout: Timeout = DEFAULT) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0, timeout: Timeout = DEFAULT) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0, timeout: Timeout = DEFAULT) -> Any:
        return obj

    def send(self, tensor: torch.Tensor, dst: int, timeout: Timeout = DEFAULT) -> None:
        raise RuntimeError("a world of one rank has no peer to send to")

    def recv(self, tensor: torch.Tensor, src: int, timeout: Timeout = DEFAULT) -> torch.Tensor:
        raise RuntimeError("a world of one rank has no peer to receive from")

    def send_object(self, obj: Any, dst: int, timeout: Timeout = DEFAULT) -> None:
        raise RuntimeError("a world of one rank has no peer to send to")

    def recv_object(self, src: int, timeout: Timeout = DEFAULT) -> Any:
        raise RuntimeError("a world of one rank has no peer to receive from")

    def isend(self, tensor: torch.Tensor, dst: int) -> PendingSend:
        raise RuntimeError("a world of one rank has no peer to send to")

    def isend_object(self, obj: Any, dst: int) -> PendingSend:
        raise RuntimeError("a world of one rank has no peer to send to")

    def barrier(self, timeout: Timeout = DEFAULT) -> None:
        return None


class ShapeOnlyCommunicator(SingleRankCommunicator):
    """Rank `rank` of a world of `world_size`, for building models that are never run (shard planning)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.ranks = tuple(range(world_size))

    def all_reduce(self, tensor: torch.Tensor, timeout: Timeout = DEFAULT) -> torch.Tensor:
        raise RuntimeError("a shape-only communicator cannot run collectives")

    all_gather = broadcast = all_reduce  # type: ignore[assignment]
