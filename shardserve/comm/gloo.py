"""`GlooCommunicator`: collectives over torch.distributed gloo process groups, polled.

Every collective issues the torch.distributed op with `async_op=True` and polls
`work.is_completed()` through `waiting.wait_until` (timeout + rank board), then `work.wait()`
surfaces gloo's own error. Point-to-point work (isend/irecv) only completes inside `wait()`, so a
daemon thread waits on it and the caller polls that thread. `isend` / `isend_object` post and
return a `PendingSend`.
The process groups get a very long gloo timeout: deadlines are ours. torch.distributed is
initialised on the SAME TCPStore as the rank board (keys under "pg/").

Tensors move as uint8 views (every dtype, bfloat16 and bool included); all_reduce sums
float16/bfloat16 in float32 and casts back, and reduces bool as MAX over uint8 (logical or).
Objects: an int64 size, then the pickled bytes as uint8.

What gloo (torch 2.13) does when a peer goes away, measured here:
- peer killed: pending work completes within ~30 ms with "Read error ... Connection reset by peer"
  (an address, not a rank); we wait up to heartbeat_timeout for the board to say which rank.
- peer stopped (SIGSTOP): pending work never completes (until the gloo timeout); the board names it
  after heartbeat_timeout. Such a work item cannot be abandoned: `abort()`, `destroy_process_group()`
  and the process group's destructor at interpreter exit all block on it until the peer dies. So
  `close()` after a failure destroys the groups on a daemon thread (a later world in this process
  waits for it), and a rank process should report the CommError and leave with `os._exit`.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

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
from shardserve.comm.waiting import run_blocking

if TYPE_CHECKING:
    from shardserve.comm.board import RankBoard
    from shardserve.comm.world import WorldSpec

logger = logging.getLogger(__name__)
GLOO_TIMEOUT = timedelta(days=365)  # our waits enforce deadlines; gloo must never fire first
STORE_PREFIX = "pg/"
TAG_TENSOR = 101
TAG_OBJECT_SIZE = 102
TAG_OBJECT_DATA = 103


def _finish(call: Call, work: dist.Work | None) -> None:
    """Poll a collective's work item to completion, then surface its error (blamed on a rank via the board)."""
    if work is None:
        raise CommError(f"rank {call.watcher.me}: {call.label}: torch.distributed returned no work handle")
    call.wait(work.is_completed)
    try:
        work.wait()
    except Exception as exc:  # gloo raises plain RuntimeError
        raise call.fail(exc) from exc


class _WorkWaiter:
    """isend/irecv work only completes inside `wait()` (`is_completed()` stays False until then, and a
    gloo wait with a timeout poisons the whole context), so a daemon thread waits for it."""

    def __init__(self, works: list[dist.Work | None], label: str) -> None:
        self.finished = threading.Event()
        self.errors: list[BaseException] = []
        threading.Thread(target=self._wait, args=(works,), name=f"gloo wait: {label}", daemon=True).start()

    def _wait(self, works: list[dist.Work | None]) -> None:
        try:
            for work in works:
                if work is None:
                    raise RuntimeError("torch.distributed returned no work handle")
                work.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self.errors.append(exc)
        finally:
            self.finished.set()

    def done(self, call: Call) -> bool:
        return self.finished.is_set()

    def finish(self, call: Call) -> None:
        if self.errors:
            raise call.fail(self.errors[0]) from self.errors[0]


def _finish_p2p(call: Call, work: dist.Work | None) -> None:
    waiter = _WorkWaiter([work], call.label)
    call.wait(waiter.finished.is_set)
    waiter.finish(call)


class GlooCommunicator:
    """One gloo process group as a `Communicator`; `ranks` are its members' global ranks."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        name: str,
        ranks: tuple[int, ...],
        board: RankBoard,
        default_timeout: float | None,
    ) -> None:
        self.group = group
        self._calls = GroupCalls(name, ranks, board.rank, board, default_timeout)
        self.rank = self._calls.rank
        self.world_size = len(ranks)
        self.ranks = ranks
        self.name = self._calls.name
        self.default_timeout = default_timeout

    @property
    def failed(self) -> CommError | None:
        """The error that made this communicator unusable, if any."""
        return self._calls.failed

    def all_reduce(self, tensor: torch.Tensor, timeout: Timeout = DEFAULT) -> torch.Tensor:
        check_tensor(tensor, "all_reduce")
        is_bool = tensor.dtype == torch.bool
        buffer = tensor.view(torch.uint8) if is_bool else reduce_buffer(tensor)
        op = dist.ReduceOp.MAX if is_bool else dist.ReduceOp.SUM
        with self._calls.call("all_reduce", timeout) as call:
            _finish(call, dist.all_reduce(buffer, op=op, group=self.group, async_op=True))
        return tensor if is_bool else finish_reduce(tensor, buffer)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, timeout: Timeout = DEFAULT) -> torch.Tensor:
        check_gather(tensor, dim)
        mine = byte_view(tensor)
        gathered = torch.empty(self.world_size * mine.numel(), dtype=torch.uint8)
        with self._calls.call("all_gather", timeout) as call:
            n = mine.numel()
            parts = [gathered[i * n : (i + 1) * n] for i in range(self.world_size)]
            _finish(call, dist.all_gather(parts, mine, group=self.group, async_op=True))
        return unpack_gathered(gathered, tensor, self.world_size, dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, timeout: Timeout = DEFAULT) -> torch.Tensor:
        check_tensor(tensor, "broadcast")
        root = self.ranks[self._calls.root_rank(src)]
        with self._calls.call("broadcast", timeout) as call:
            _finish(call, dist.broadcast(byte_view(tensor), src=root, group=self.group, async_op=True))
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0, timeout: Timeout = DEFAULT) -> Any:
        root = self.ranks[self._calls.root_rank(src)]
        mine = self.ranks[self.rank] == root
        payload = _bytes_tensor(pack_object(obj)) if mine else torch.empty(0, dtype=torch.uint8)
        with self._calls.call("broadcast_object", timeout) as call:
            size = torch.tensor([payload.numel()], dtype=torch.int64)
            _finish(call, dist.broadcast(size, src=root, group=self.group, async_op=True))
            if not mine:
                payload = torch.empty(int(size.item()), dtype=torch.uint8)
            _finish(call, dist.broadcast(payload, src=root, group=self.group, async_op=True))
        return obj if mine else unpack_object(payload.numpy().tobytes())

    def send(self, tensor: torch.Tensor, dst: int, timeout: Timeout = DEFAULT) -> None:
        check_tensor(tensor, "send")
        peer = self._calls.peer_rank(dst, "dst")
        with self._calls.call("send", timeout, peer=peer) as call:
            _finish_p2p(call, dist.isend(byte_view(tensor), dst=self.ranks[peer], group=self.group, tag=TAG_TENSOR))

    def recv(self, tensor: torch.Tensor, src: int, timeout: Timeout = DEFAULT) -> torch.Tensor:
        check_tensor(tensor, "recv")
        peer = self._calls.peer_rank(src, "src")
        with self._calls.call("recv", timeout, peer=peer) as call:
            _finish_p2p(call, dist.irecv(byte_view(tensor), src=self.ranks[peer], group=self.group, tag=TAG_TENSOR))
        return tensor

    def send_object(self, obj: Any, dst: int, timeout: Timeout = DEFAULT) -> None:
        peer = self._calls.peer_rank(dst, "dst")
        payload = _bytes_tensor(pack_object(obj))
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        with self._calls.call("send_object", timeout, peer=peer) as call:
            dst_global = self.ranks[peer]
            _finish_p2p(call, dist.isend(size, dst=dst_global, group=self.group, tag=TAG_OBJECT_SIZE))
            _finish_p2p(call, dist.isend(payload, dst=dst_global, group=self.group, tag=TAG_OBJECT_DATA))

    def isend(self, tensor: torch.Tensor, dst: int) -> PendingOp:
        check_tensor(tensor, "isend")
        peer = self._calls.peer_rank(dst, "dst")
        data = byte_view(tensor)
        work = self._calls.post(
            "isend", peer, lambda: dist.isend(data, dst=self.ranks[peer], group=self.group, tag=TAG_TENSOR)
        )
        waiter = _WorkWaiter([work], f"isend to rank {self.ranks[peer]}")
        return PendingOp(self._calls, "isend", peer, waiter.done, waiter.finish, keep=(tensor, data))

    def isend_object(self, obj: Any, dst: int) -> PendingOp:
        peer = self._calls.peer_rank(dst, "dst")
        payload = _bytes_tensor(pack_object(obj))
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        dst_global = self.ranks[peer]
        works = self._calls.post(
            "isend_object",
            peer,
            lambda: [
                dist.isend(size, dst=dst_global, group=self.group, tag=TAG_OBJECT_SIZE),
                dist.isend(payload, dst=dst_global, group=self.group, tag=TAG_OBJECT_DATA),
            ],
        )
        waiter = _WorkWaiter(works, f"isend_object to rank {dst_global}")
        return PendingOp(self._calls, "isend_object", peer, waiter.done, waiter.finish, keep=(size, payload))

    def recv_object(self, src: int, timeout: Timeout = DEFAULT) -> Any:
        peer = self._calls.peer_rank(src, "src")
        size = torch.zeros(1, dtype=torch.int64)
        with self._calls.call("recv_object", timeout, peer=peer) as call:
            src_global = self.ranks[peer]
            _finish_p2p(call, dist.irecv(size, src=src_global, group=self.group, tag=TAG_OBJECT_SIZE))
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
            _finish_p2p(call, dist.irecv(payload, src=src_global, group=self.group, tag=TAG_OBJECT_DATA))
        return unpack_object(payload.numpy().tobytes())

    def barrier(self, timeout: Timeout = DEFAULT) -> None:
        with self._calls.call("barrier", timeout) as call:
            _finish(call, dist.barrier(group=self.group, async_op=True))


def _bytes_tensor(payload: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


class GlooWorldBackend:
    """World set-up over torch.distributed gloo (see `world.WorldBackend`)."""

    name = "gloo"

    def __init__(self) -> None:
        self._initialised = False

    def own_rank(self, spec: WorldSpec) -> int:
        if spec.rank is None:
            raise ValueError("the gloo backend needs WorldSpec.rank (no launcher tells it)")
        if spec.master_port == 0:
            raise ValueError("the gloo backend needs WorldSpec.master_port (rank 0 hosts the TCPStore there)")
        return spec.rank

    def agree_port(self, rank: int, port: int, timeout: float) -> int:
        return port

    def make_groups(
        self, spec: WorldSpec, rank: int, board: RankBoard, store: dist.Store
    ) -> tuple[GlooCommunicator, GlooCommunicator]:
        if _teardown is not None:
            _teardown.join(timeout=spec.timeout_s)  # an earlier failed world of this process
        if dist.is_initialized():
            raise RuntimeError(f"rank {rank}: torch.distributed is already initialised in this process")
        watcher = board.watch(range(spec.world_size))
        stage_ranks = [tuple(range(s * spec.tp, (s + 1) * spec.tp)) for s in range(spec.world_size // spec.tp)]

        def create() -> list[dist.ProcessGroup]:
            pg_store = dist.PrefixStore(STORE_PREFIX, store)
            dist.init_process_group("gloo", store=pg_store, rank=rank, world_size=spec.world_size, timeout=GLOO_TIMEOUT)
            self._initialised = True
            # every rank creates every stage's group, in the same order (torch.distributed requires it)
            return [dist.new_group(list(ranks), timeout=GLOO_TIMEOUT, backend="gloo") for ranks in stage_ranks]

        tp_groups = run_blocking(create, watcher, spec.timeout_s, "creating the gloo process groups")
        stage = rank // spec.tp
        world_group = dist.group.WORLD
        assert world_group is not None
        return (
            GlooCommunicator(world_group, "world", tuple(range(spec.world_size)), board, spec.timeout_s),
            GlooCommunicator(tp_groups[stage], "tp", stage_ranks[stage], board, spec.timeout_s),
        )

    def close(self, clean: bool) -> None:
        """Destroy the process groups. After a failure a stuck work item (a stopped peer) can block
        that, so it runs on a daemon thread: done at once if the peers are dead, else once they are
        (the next `make_groups` in this process waits for it)."""
        if not self._initialised:
            return
        self._initialised = False
        if clean:
            dist.destroy_process_group()
            return
        global _teardown
        _teardown = threading.Thread(target=_destroy_quietly, name="gloo teardown after a failure", daemon=True)
        _teardown.start()
        _teardown.join(timeout=1.0)


_teardown: threading.Thread | None = None  # a destroy_process_group still running after a failure


def _destroy_quietly() -> None:
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - best effort after a failure
        logger.debug("destroying the gloo process groups after a failure: %s", exc)
