"""`MpiCommunicator`: collectives over an mpi4py communicator, every call non-blocking and polled.

Each call posts a non-blocking MPI operation (Iallreduce, Iallgather, Ibcast, Isend/Irecv,
Ibarrier; objects: Isend of pickled bytes, Improbe + Irecv on the other side) on numpy views of the
tensor's memory and polls `Request.Test` through `waiting.wait_until`, which enforces the timeout
and watches the rank board. `isend` / `isend_object` post and return a `PendingSend` to wait on
later. bfloat16 has no numpy type: byte-copy ops move every dtype as a uint8 view, and all_reduce
sums float16/bfloat16 in float32 and casts back. bool all_reduce is MPI_LOR.

What MPICH 5.0.2 (PyPI `mpich`, hydra `mpiexec`) does when a rank dies, measured here:
- By default hydra kills every other rank as soon as one exits abnormally ("BAD TERMINATION ...
  CLEANING UP REMAINING PROCESSES"), within a fraction of a second, so survivors cannot report.
  Launch with `mpiexec -disable-auto-cleanup` to keep them (mpiexec then exits when the last rank
  does, with the dead rank's status, e.g. 9).
- Even then, hydra's proxy SIGKILLs every remaining rank as soon as it reaps a rank that was
  killed by a signal (proxy/pmip.c main loop: `if (WIFSIGNALED(...)) PMIP_bcast_signal(SIGKILL)`,
  whatever -disable-auto-cleanup says). It reaps on its next event: the dead rank's own PMI socket
  closing (a race: 2 runs in 12 on a loaded machine killed every survivor at once), any rank
  writing to the stdout/stderr hydra forwards, or a rank exiting.
- hydra also sends SIGUSR1 to the other ranks' process groups when one dies; its default action
  terminates the process. `mpiexec.gforker` instead SIGINTs every rank when one dies.
- What works: run each rank under a shell that outlives it and ignores SIGUSR1, so hydra reaps a
  plain exit (status 137), never a signal:
      mpiexec -disable-auto-cleanup -n N sh -c 'trap "" USR1; "$0" "$@"; status=$?; exit $status' \
          python -m shardserve.cli worker ...
  Then survivors live, print and report (12 runs in 12 under load). `MpiWorldBackend` also
  installs a SIGUSR1 handler that only records the notice, for ranks started without the shell.
- A pending operation that involves a killed or stopped rank never completes and never raises
  (no ULFM / fault tolerance in this build): only the rank board's heartbeats notice, after
  `heartbeat_timeout`. Errors that MPI does raise (truncation, bad arguments) become CommError.
- At exit mpi4py calls MPI_Finalize: after a peer was killed it returns (warning "Builtin
  communicator ... has pending N references"); with a peer that is stopped (SIGSTOP) it blocks
  forever. So after a CommError, report it and leave with `os._exit`.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mpi4py import MPI

from shardserve.comm.base import DEFAULT, CommError, Timeout
from shardserve.comm.group import Call, GroupCalls, PendingOp
from shardserve.comm.tensors import (
    byte_view,
    check_gather,
    check_tensor,
    finish_reduce,
    pack_object,
    reduce_buffer,
    unpack_gathered,
    unpack_object,
)
from shardserve.comm.waiting import NoWatcher, run_blocking, wait_until

if TYPE_CHECKING:
    from shardserve.comm.board import RankBoard
    from shardserve.comm.world import WorldSpec

TAG_TENSOR = 101
TAG_OBJECT = 102
_USAGE_ERRORS = frozenset(
    {MPI.ERR_TRUNCATE, MPI.ERR_COUNT, MPI.ERR_TYPE, MPI.ERR_BUFFER, MPI.ERR_ARG, MPI.ERR_RANK, MPI.ERR_TAG}
)


def _done(call: Call, request: MPI.Request, status: MPI.Status | None = None) -> bool:
    """Poll one request; MPI usage errors fail at once, others are blamed via the board."""
    try:
        return request.Test(status)
    except MPI.Exception as exc:
        if exc.Get_error_class() in _USAGE_ERRORS:
            raise CommError(f"rank {call.watcher.me}: {call.label} failed: {exc}", call.watcher.ranks) from exc
        raise


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).numpy()


def global_ranks(comm: MPI.Comm) -> tuple[int, ...]:
    """The COMM_WORLD ranks of `comm`'s members, in `comm` rank order."""
    group, world = comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        return tuple(int(r) for r in MPI.Group.Translate_ranks(group, list(range(comm.Get_size())), world))
    finally:
        group.Free()
        world.Free()


class MpiCommunicator:
    """One MPI communicator (COMM_WORLD or a Split of it) as a `Communicator`."""

    def __init__(self, comm: MPI.Comm, name: str, board: RankBoard, default_timeout: float | None) -> None:
        self.comm = comm
        self._calls = GroupCalls(name, global_ranks(comm), board.rank, board, default_timeout)
        self.rank = self._calls.rank
        self.world_size = len(self._calls.ranks)
        self.ranks = self._calls.ranks
        self.name = self._calls.name
        self.default_timeout = default_timeout

    @property
    def failed(self) -> CommError | None:
        """The error that made this communicator unusable, if any."""
        return self._calls.failed

    def all_reduce(self, tensor: torch.Tensor, timeout: Timeout = DEFAULT) -> torch.Tensor:
        check_tensor(tensor, "all_reduce")
        buffer = reduce_buffer(tensor)
        op = MPI.LOR if tensor.dtype == torch.bool else MPI.SUM
        with self._calls.call("all_reduce", timeout) as call:
            request = self.comm.Iallreduce(MPI.IN_PLACE, _np(buffer), op)
            call.wait(lambda: _done(call, request))
        return finish_reduce(tensor, buffer)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, timeout: Timeout = DEFAULT) -> torch.Tensor:
        check_gather(tensor, dim)
        mine = byte_view(tensor)
        gathered = torch.empty(self.world_size * mine.numel(), dtype=torch.uint8)
        with self._calls.call("all_gather", timeout) as call:
            request = self.comm.Iallgather(mine.numpy(), gathered.numpy())
            call.wait(lambda: _done(call, request))
        return unpack_gathered(gathered, tensor, self.world_size, dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, timeout: Timeout = DEFAULT) -> torch.Tensor:
        check_tensor(tensor, "broadcast")
        root = self._calls.root_rank(src)
        with self._calls.call("broadcast", timeout) as call:
            request = self.comm.Ibcast(byte_view(tensor).numpy(), root=root)
            call.wait(lambda: _done(call, request))
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0, timeout: Timeout = DEFAULT) -> Any:
        root = self._calls.root_rank(src)
        payload = bytearray(pack_object(obj)) if self.rank == root else bytearray()
        with self._calls.call("broadcast_object", timeout) as call:
            size = np.array([len(payload)], dtype=np.int64)
            request = self.comm.Ibcast(size, root=root)
            call.wait(lambda: _done(call, request))
            if self.rank != root:
                payload = bytearray(int(size[0]))
            request = self.comm.Ibcast(payload, root=root)
            call.wait(lambda: _done(call, request))
        return obj if self.rank == root else unpack_object(payload)

    def send(self, tensor: torch.Tensor, dst: int, timeout: Timeout = DEFAULT) -> None:
        check_tensor(tensor, "send")
        peer = self._calls.peer_rank(dst, "dst")
        with self._calls.call("send", timeout, peer=peer) as call:
            request = self.comm.Isend(byte_view(tensor).numpy(), dest=peer, tag=TAG_TENSOR)
            call.wait(lambda: _done(call, request))

    def recv(self, tensor: torch.Tensor, src: int, timeout: Timeout = DEFAULT) -> torch.Tensor:
        check_tensor(tensor, "recv")
        peer = self._calls.peer_rank(src, "src")
        status = MPI.Status()
        with self._calls.call("recv", timeout, peer=peer) as call:
            request = self.comm.Irecv(byte_view(tensor).numpy(), source=peer, tag=TAG_TENSOR)
            call.wait(lambda: _done(call, request, status))
            got, expected = status.Get_count(MPI.BYTE), tensor.numel() * tensor.element_size()
            if got != expected:
                raise CommError(
                    f"rank {call.watcher.me}: {call.label}: rank {self.ranks[peer]} sent {got} bytes, "
                    f"this rank expected {expected} ({tensor.dtype}, {list(tensor.shape)})",
                    (self.ranks[peer],),
                )
        return tensor

    def send_object(self, obj: Any, dst: int, timeout: Timeout = DEFAULT) -> None:
        peer = self._calls.peer_rank(dst, "dst")
        payload = pack_object(obj)
        with self._calls.call("send_object", timeout, peer=peer) as call:
            request = self.comm.Isend([payload, MPI.BYTE], dest=peer, tag=TAG_OBJECT)
            call.wait(lambda: _done(call, request))

    def isend(self, tensor: torch.Tensor, dst: int) -> PendingOp:
        check_tensor(tensor, "isend")
        peer = self._calls.peer_rank(dst, "dst")
        self._calls.check_usable()
        buffer = byte_view(tensor).numpy()
        request = self.comm.Isend(buffer, dest=peer, tag=TAG_TENSOR)
        return PendingOp(self._calls, "isend", peer, lambda call: _done(call, request), keep=(tensor, buffer))

    def isend_object(self, obj: Any, dst: int) -> PendingOp:
        peer = self._calls.peer_rank(dst, "dst")
        self._calls.check_usable()
        payload = pack_object(obj)
        request = self.comm.Isend([payload, MPI.BYTE], dest=peer, tag=TAG_OBJECT)
        return PendingOp(self._calls, "isend_object", peer, lambda call: _done(call, request), keep=payload)

    def recv_object(self, src: int, timeout: Timeout = DEFAULT) -> Any:
        peer = self._calls.peer_rank(src, "src")
        status = MPI.Status()
        found: list[MPI.Message] = []

        def probed() -> bool:
            message = self.comm.Improbe(source=peer, tag=TAG_OBJECT, status=status)
            if message is not None:
                found.append(message)
            return bool(found)

        with self._calls.call("recv_object", timeout, peer=peer) as call:
            call.wait(probed)
            payload = bytearray(status.Get_count(MPI.BYTE))
            request = found[0].Irecv([payload, MPI.BYTE])
            call.wait(lambda: _done(call, request))
        return unpack_object(payload)

    def barrier(self, timeout: Timeout = DEFAULT) -> None:
        with self._calls.call("barrier", timeout) as call:
            request = self.comm.Ibarrier()
            call.wait(lambda: _done(call, request))


HYDRA_DEATH_NOTICES: list[float] = []  # monotonic times of hydra's SIGUSR1 "a rank died" notices


def _on_hydra_notice(signum: int, frame: object) -> None:
    HYDRA_DEATH_NOTICES.append(time.monotonic())  # silent: output makes hydra reap (see module doc)


def keep_alive_on_peer_death() -> bool:
    """Survive hydra's SIGUSR1 notice of a dead rank (see module doc); True if the handler is installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, _on_hydra_notice):
        return False
    signal.signal(signal.SIGUSR1, _on_hydra_notice)
    return True


class MpiWorldBackend:
    """World set-up over MPI.COMM_WORLD (see `world.WorldBackend`)."""

    name = "mpi"

    def __init__(self) -> None:
        self._comms: list[MPI.Comm] = []

    def own_rank(self, spec: WorldSpec) -> int:
        keep_alive_on_peer_death()
        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        if size != spec.world_size:
            raise ValueError(f"rank {rank}: WorldSpec.world_size is {spec.world_size} but MPI started {size} ranks")
        if spec.rank is not None and spec.rank != rank:
            raise ValueError(f"rank {rank}: WorldSpec.rank is {spec.rank} but MPI says this process is rank {rank}")
        return rank

    def agree_port(self, rank: int, port: int, timeout: float) -> int:
        """Rank 0's store port, broadcast to every rank (Ibcast, polled, with the set-up timeout)."""
        value = np.array([port], dtype=np.int64)
        request = MPI.COMM_WORLD.Ibcast(value, root=0)
        watcher = NoWatcher(rank, (0,), " (rank 0 picks the rank board's port)")
        wait_until(request.Test, watcher, timeout, "receiving the rank board's port from rank 0")
        return int(value[0])

    def make_groups(
        self, spec: WorldSpec, rank: int, board: RankBoard, store: object
    ) -> tuple[MpiCommunicator, MpiCommunicator]:
        watcher = board.watch(range(spec.world_size))
        world, request = MPI.COMM_WORLD.Idup()
        wait_until(request.Test, watcher, spec.timeout_s, "duplicating MPI.COMM_WORLD")
        self._comms.append(world)
        stage = rank // spec.tp
        tp = run_blocking(lambda: world.Split(color=stage, key=rank), watcher, spec.timeout_s, "splitting tp groups")
        self._comms.append(tp)
        return (
            MpiCommunicator(world, "world", board, spec.timeout_s),
            MpiCommunicator(tp, "tp", board, spec.timeout_s),
        )

    def close(self, clean: bool) -> None:
        """Free the communicators; after a failure leave them (freeing may wait on a dead peer)."""
        comms, self._comms = self._comms, []
        if clean:
            for comm in reversed(comms):
                comm.Free()
