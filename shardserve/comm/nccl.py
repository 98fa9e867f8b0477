"""`NcclCommunicator`: tensor collectives through `cupy.cuda.nccl` on CUDA tensors.

Each call enqueues the NCCL kernel on the current torch stream and returns at once: no host
synchronisation inside a step (CUDA-graph friendly). Objects, barriers and the unique id of each
group's NCCL communicator go over a gloo communicator of the same ranks (the control channel, on
the world's TCPStore). A call's `timeout` cannot interrupt a kernel already queued: deadlines are
enforced where the host waits for the GPU, `synchronize(timeout)`, which polls a CUDA event under
the rank board (naming a dead or stopped peer) and aborts the NCCL communicator on failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from shardserve.comm.base import DEFAULT, CommError, Timeout, resolve_timeout
from shardserve.comm.gloo import GlooCommunicator, GlooWorldBackend
from shardserve.comm.waiting import run_blocking, wait_until

if TYPE_CHECKING:
    import torch.distributed as dist

    from shardserve.comm.board import RankBoard
    from shardserve.comm.world import WorldSpec


def _nccl() -> Any:
    try:
        from cupy.cuda import nccl
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise CommError(f"comm nccl needs CuPy with NCCL (`pip install cupy-cuda12x`): {exc}") from None
    return nccl


def _dtype(tensor: torch.Tensor) -> int:
    nccl = _nccl()
    table = {
        torch.float32: nccl.NCCL_FLOAT32,
        torch.float16: nccl.NCCL_FLOAT16,
        torch.bfloat16: getattr(nccl, "NCCL_BFLOAT16", None),
        torch.int64: nccl.NCCL_INT64,
        torch.int32: nccl.NCCL_INT32,
        torch.uint8: nccl.NCCL_UINT8,
        torch.bool: nccl.NCCL_UINT8,
    }
    code = table.get(tensor.dtype)
    if code is None or not tensor.is_cuda or not tensor.is_contiguous():
        raise ValueError(f"nccl needs a contiguous CUDA tensor of {sorted(map(str, table))}, got {tensor.dtype}")
    return code


class _Sent:
    """A send queued on the stream (`base.PendingSend`): done once the GPU passed its event."""

    def __init__(self, comm: NcclCommunicator, tensor: torch.Tensor) -> None:
        self._comm = comm
        self._tensor = tensor  # alive until the kernel ran
        self._event = torch.cuda.Event()
        self._event.record()

    def done(self) -> bool:
        return bool(self._event.query())

    def wait(self, timeout: Timeout = DEFAULT) -> None:
        self._comm.wait_event(self._event, timeout, "isend")


class NcclCommunicator:
    """One group: NCCL for tensors, `cpu` (gloo, same ranks) for objects and barriers."""

    def __init__(self, cpu: GlooCommunicator) -> None:
        nccl = _nccl()
        self.cpu = cpu
        self.rank, self.world_size, self.ranks = cpu.rank, cpu.world_size, cpu.ranks
        self.default_timeout = cpu.default_timeout
        unique_id = cpu.broadcast_object(nccl.get_unique_id() if cpu.rank == 0 else None, src=0)
        board = cpu._calls.board
        self.watcher = board.watch(self.ranks)
        device = torch.cuda.current_device()

        def create() -> Any:  # on a helper thread: the current CUDA device is per thread
            torch.cuda.set_device(device)
            return nccl.NcclCommunicator(self.world_size, unique_id, self.rank)

        self.comm = run_blocking(
            create,
            self.watcher,
            self.default_timeout,
            f"creating the NCCL communicator of {cpu.name}",
        )

    @staticmethod
    def _stream() -> int:
        return torch.cuda.current_stream().cuda_stream

    def all_reduce(self, tensor: torch.Tensor, timeout: Timeout = DEFAULT) -> torch.Tensor:
        ptr = tensor.data_ptr()
        self.comm.allReduce(ptr, ptr, tensor.numel(), _dtype(tensor), _nccl().NCCL_SUM, self._stream())
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1, timeout: Timeout = DEFAULT) -> torch.Tensor:
        out = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        self.comm.allGather(tensor.data_ptr(), out.data_ptr(), tensor.numel(), _dtype(tensor), self._stream())
        return torch.cat(out.unbind(0), dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, timeout: Timeout = DEFAULT) -> torch.Tensor:
        self.comm.bcast(tensor.data_ptr(), tensor.numel(), _dtype(tensor), src, self._stream())
        return tensor

    def send(self, tensor: torch.Tensor, dst: int, timeout: Timeout = DEFAULT) -> None:
        self.isend(tensor, dst).wait(timeout)

    def isend(self, tensor: torch.Tensor, dst: int) -> _Sent:
        self.comm.send(tensor.data_ptr(), tensor.numel(), _dtype(tensor), dst, self._stream())
        return _Sent(self, tensor)

    def recv(self, tensor: torch.Tensor, src: int, timeout: Timeout = DEFAULT) -> torch.Tensor:
        self.comm.recv(tensor.data_ptr(), tensor.numel(), _dtype(tensor), src, self._stream())
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0, timeout: Timeout = DEFAULT) -> Any:
        return self.cpu.broadcast_object(obj, src, timeout)

    def send_object(self, obj: Any, dst: int, timeout: Timeout = DEFAULT) -> None:
        self.cpu.send_object(obj, dst, timeout)

    def isend_object(self, obj: Any, dst: int) -> Any:
        return self.cpu.isend_object(obj, dst)

    def recv_object(self, src: int, timeout: Timeout = DEFAULT) -> Any:
        return self.cpu.recv_object(src, timeout)

    def barrier(self, timeout: Timeout = DEFAULT) -> None:
        self.synchronize(timeout)
        self.cpu.barrier(timeout)

    def synchronize(self, timeout: Timeout = DEFAULT) -> None:
        """Wait until the GPU ran everything queued on the current stream; names a failed peer."""
        event = torch.cuda.Event()
        event.record()
        self.wait_event(event, timeout, "synchronize")

    def wait_event(self, event: torch.cuda.Event, timeout: Timeout, what: str) -> None:
        seconds = resolve_timeout(timeout, self.default_timeout)
        try:
            wait_until(event.query, self.watcher, seconds, f"{what} on nccl {self.cpu.name}")
        except CommError:
            self.comm.abort()
            raise


class NcclWorldBackend:
    """gloo groups for control, an NCCL communicator over each (see `world.WorldBackend`)."""

    name = "nccl"

    def __init__(self) -> None:
        self._gloo = GlooWorldBackend()

    def own_rank(self, spec: WorldSpec) -> int:
        return self._gloo.own_rank(spec)

    def agree_port(self, rank: int, port: int, timeout: float) -> int:
        return port

    def make_groups(
        self, spec: WorldSpec, rank: int, board: RankBoard, store: dist.Store
    ) -> tuple[NcclCommunicator, NcclCommunicator]:
        torch.cuda.set_device(rank % torch.cuda.device_count())  # rank r of a host drives GPU r (as the Worker)
        world, tp = self._gloo.make_groups(spec, rank, board, store)
        return NcclCommunicator(world), NcclCommunicator(tp)

    def close(self, clean: bool) -> None:
        self._gloo.close(clean)
