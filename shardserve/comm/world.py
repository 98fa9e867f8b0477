"""`init_world(spec) -> World`: one rank's view of a tp × pp world of processes.

Layout: rank r is pipeline stage r // tp and tensor-parallel rank r % tp; the tp group of stage s is
global ranks [s*tp, ..., s*tp + tp - 1]. `World.world` spans every rank (group rank == global rank:
step plans, pipeline send/recv, results); `World.tp` spans this rank's stage.

Set-up: global rank 0 hosts a TCPStore (the rank board and the backend's rendezvous); every rank
starts its heartbeat, waits until all ranks' heartbeats are on the board (CommError naming the
missing ranks after `timeout_s`), then the backend builds its groups. A backend is a
`WorldBackend`; "nccl" slots in by adding one to `_backend`.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Protocol, Self

import torch.distributed as dist

from shardserve.comm.base import CommError, Communicator
from shardserve.comm.board import STORE_HOST_RANK, RankBoard, wait_joined

Backend = Literal["mpi", "gloo", "nccl"]
BACKENDS: tuple[str, ...] = ("mpi", "gloo", "nccl")


@dataclass(frozen=True, slots=True)
class WorldSpec:
    backend: Backend
    world_size: int
    tp: int = 1  # pp = world_size // tp; rank r is pipeline stage r // tp, tp rank r % tp
    rank: int | None = None  # gloo: required; mpi: from MPI.COMM_WORLD (must equal if given)
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # gloo: required (rank 0 hosts the TCPStore there); mpi: 0 = rank 0 picks a free port
    timeout_s: float = 60.0  # default per-collective timeout and the set-up (join) timeout
    heartbeat_timeout_s: float = 3.0
    heartbeat_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown communication backend {self.backend!r}; choose one of {list(BACKENDS)}")
        if self.world_size < 1 or self.tp < 1:
            raise ValueError(f"world_size ({self.world_size}) and tp ({self.tp}) must be at least 1")
        if self.world_size % self.tp:
            raise ValueError(
                f"world_size {self.world_size} is not a multiple of tp {self.tp}: "
                "every pipeline stage needs a full tensor-parallel group"
            )
        if self.rank is not None and not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"master_port {self.master_port} is not a TCP port")
        if not (self.timeout_s > 0 and self.heartbeat_timeout_s > self.heartbeat_interval_s > 0):
            raise ValueError(
                "need timeout_s > 0 and heartbeat_timeout_s > heartbeat_interval_s > 0, got "
                f"{self.timeout_s}, {self.heartbeat_timeout_s}, {self.heartbeat_interval_s}"
            )

    @property
    def pp(self) -> int:
        return self.world_size // self.tp


class WorldBackend(Protocol):
    """What a backend does to set a world up (implemented by mpi.MpiWorldBackend, gloo.GlooWorldBackend)."""

    name: str

    def own_rank(self, spec: WorldSpec) -> int: ...

    def agree_port(self, rank: int, port: int, timeout: float) -> int:
        """Every rank learns rank 0's store port: `port` is the bound port on rank 0, `spec.master_port` elsewhere."""
        ...

    def make_groups(
        self, spec: WorldSpec, rank: int, board: RankBoard, store: dist.Store
    ) -> tuple[Communicator, Communicator]:
        """(world, tp) communicators; called by every rank once all have joined."""
        ...

    def close(self, clean: bool) -> None:
        """Release the groups; `clean` is False after a failure (then nothing may block)."""
        ...


def _backend(name: str) -> WorldBackend:
    if name == "mpi":
        from shardserve.comm.mpi import MpiWorldBackend

        return MpiWorldBackend()
    if name == "gloo":
        from shardserve.comm.gloo import GlooWorldBackend

        return GlooWorldBackend()
    if name == "nccl":
        from shardserve.comm.nccl import NcclWorldBackend

        return NcclWorldBackend()
    raise ValueError(f"unknown communication backend {name!r}")


class World:
    """This rank's place in the world and its communicators; `close()` when done (idempotent)."""

    def __init__(
        self,
        spec: WorldSpec,
        rank: int,
        world: Communicator,
        tp: Communicator,
        board: RankBoard,
        backend: WorldBackend,
        stores: list[dist.Store],
    ) -> None:
        self.spec = spec
        self.rank = rank
        self.world_size = spec.world_size
        self.tp_size = spec.tp
        self.pp_size = spec.pp
        self.stage = rank // spec.tp
        self.tp_rank = rank % spec.tp
        self.world = world
        self.tp = tp
        self.board = board
        self._backend = backend
        self._stores = stores
        self._closed = False

    @property
    def failed(self) -> bool:
        """True once a call on `world` or `tp` failed (then close() leaves the groups alone)."""
        return any(getattr(comm, "failed", None) is not None for comm in (self.world, self.tp))

    def close(self) -> None:
        """Stop the heartbeat (peers still waiting on this rank fail at once) and destroy the groups."""
        if self._closed:
            return
        self._closed = True
        # rank 0 hosts the board: linger until the peers have read its last beat (or are gone)
        self.board.close(linger=self.spec.heartbeat_timeout_s if self.rank == STORE_HOST_RANK else 0.0)
        self._backend.close(clean=not self.failed)
        self._stores.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def init_world(spec: WorldSpec) -> World:
    """Join the world described by `spec`; CommError naming the ranks that did not join in `timeout_s`."""
    backend = _backend(spec.backend)
    rank = backend.own_rank(spec)
    store, board_store = _open_stores(spec, rank, backend)
    board = RankBoard(
        board_store,
        rank,
        spec.world_size,
        interval=spec.heartbeat_interval_s,
        heartbeat_timeout=spec.heartbeat_timeout_s,
    ).start()
    try:
        wait_joined(board, spec.timeout_s)
        world, tp = backend.make_groups(spec, rank, board, store)
    except BaseException:
        board.close()
        backend.close(clean=False)
        raise
    return World(spec, rank, world, tp, board, backend, [store, board_store])


def _open_stores(spec: WorldSpec, rank: int, backend: WorldBackend) -> tuple[dist.TCPStore, dist.TCPStore]:
    """(primary store for the backend, a second connection for the board's heartbeat thread)."""
    join = timedelta(seconds=spec.timeout_s)
    if rank == STORE_HOST_RANK:
        try:
            store = dist.TCPStore(
                spec.master_addr, spec.master_port, spec.world_size, True, timeout=join, wait_for_workers=False
            )
        except Exception as exc:  # torch raises several types for bind failures
            raise CommError(
                f"rank {rank}: could not host the rank board on port {spec.master_port}: {_first_line(exc)}", (rank,)
            ) from exc
        port = backend.agree_port(rank, store.port, spec.timeout_s)
    else:
        port = backend.agree_port(rank, spec.master_port, spec.timeout_s)
        store = _connect(spec, rank, port, spec.timeout_s)
    return store, _connect(spec, rank, port, max(spec.heartbeat_timeout_s, 1.0))


def _connect(spec: WorldSpec, rank: int, port: int, timeout: float) -> dist.TCPStore:
    """A client connection to rank 0's store within `timeout`. TCPStore's own connect retries overrun
    their timeout, so first wait (with our deadline) until the port accepts connections."""
    where = f"{spec.master_addr}:{port}"
    deadline = time.monotonic() + timeout
    while not _accepts(spec.master_addr, port, deadline):
        if time.monotonic() >= deadline:
            raise CommError(
                f"rank {rank}: could not reach the rank board at {where} within {timeout:g} s: "
                f"rank {STORE_HOST_RANK} hosts it and did not answer",
                (STORE_HOST_RANK,),
            )
        time.sleep(0.05)
    try:
        return dist.TCPStore(
            spec.master_addr, port, spec.world_size, False, timeout=timedelta(seconds=timeout), wait_for_workers=False
        )
    except Exception as exc:  # DistNetworkError, DistStoreError, RuntimeError
        raise CommError(
            f"rank {rank}: could not reach the rank board at {where}: rank {STORE_HOST_RANK} hosts it and "
            f"did not answer ({_first_line(exc)})",
            (STORE_HOST_RANK,),
        ) from exc


def _accepts(host: str, port: int, deadline: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
