"""All-reduce bus bandwidth of a `Communicator`, against torch.distributed on the same ranks.

`shardserve doctor --bandwidth` runs this over the world. Bus bandwidth is nccl-tests' measure:
bytes × 2(n − 1)/n over the time of one all-reduce, comparable across world sizes (a ring moves
that many bytes through each link). Each size runs `WARMUP` untimed all-reduces, then a timed batch
in place on one float32 buffer; the host waits only once at the end of the batch. The baseline is a
torch.distributed group of the same ranks with the world's kind of transport (NCCL for CUDA
tensors, gloo for CPU tensors), timed the same way in the same process. It exists where the world
set torch.distributed up (gloo and nccl worlds); an MPI world reports no baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shardserve.comm.base import CommError, Communicator

WARMUP = 2
BATCH_BYTES = 4 << 30  # each size runs about this much data through the all-reduce (5 to 50 calls)


@dataclass(frozen=True, slots=True)
class BandwidthRow:
    nbytes: int
    calls: int
    ours_gb_s: float  # bus bandwidth, GB/s (1e9 bytes)
    baseline_gb_s: float | None

    @property
    def ratio(self) -> float | None:
        return self.ours_gb_s / self.baseline_gb_s if self.baseline_gb_s else None


def default_sizes(device: torch.device, max_mib: int | None = None) -> list[int]:
    """1 MiB, 4 MiB, … up to `max_mib` (default 1 GiB on CUDA, 64 MiB on CPU), in bytes."""
    top = (max_mib or (1024 if device.type == "cuda" else 64)) << 20
    sizes, size = [], 1 << 20
    while size <= top:
        sizes.append(size)
        size *= 4
    return sizes or [top]


def baseline_group(comm: Communicator, device: torch.device) -> Any | None:
    """A torch.distributed group of `comm`'s ranks (every world rank must call this), or None."""
    import torch.distributed as dist

    if not dist.is_initialized() or comm.world_size < 2:
        return None
    return dist.new_group(list(comm.ranks), backend="nccl" if device.type == "cuda" else "gloo")


def sweep(comm: Communicator, device: torch.device, sizes: list[int], baseline: Any | None) -> list[BandwidthRow]:
    """Time every size through `comm`, then through `baseline` (a torch.distributed group) if given."""
    rows = []
    for nbytes in sizes:
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        comm.all_reduce(buf)
        _sync(comm, device)  # with a deadline that names a peer that hangs
        check_sum_of_ones(comm, buf)
        buf.zero_()  # the timed sums stay finite
        calls = max(5, min(50, BATCH_BYTES // nbytes))
        ours = _time(lambda b=buf: comm.all_reduce(b), comm, device, calls)
        theirs = None
        if baseline is not None:
            import torch.distributed as dist

            theirs = _time(lambda b=buf: dist.all_reduce(b, group=baseline), comm, device, calls)
        rows.append(BandwidthRow(nbytes, calls, _bus(nbytes, comm.world_size, ours),
                                 _bus(nbytes, comm.world_size, theirs) if theirs else None))  # fmt: skip
    return rows


def check_sum_of_ones(comm: Communicator, out: torch.Tensor) -> None:
    """`out` is an all-reduce of ones over `comm`: every rank must have contributed."""
    got = out[0].item()
    if got != comm.world_size:
        raise CommError(f"all_reduce over ranks {list(comm.ranks)} gave {got}, not {comm.world_size}")


def _time(call: Callable[[], Any], comm: Communicator, device: torch.device, calls: int) -> float:
    """Seconds per call: `WARMUP` untimed, then `calls` back to back, all ranks starting together."""
    for _ in range(WARMUP):
        call()
    _sync(comm, device)
    comm.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    _sync(comm, device)
    return (time.perf_counter() - start) / calls


def _sync(comm: Communicator, device: torch.device) -> None:
    """Wait for the queued all-reduces (a CPU world's calls return done). The current stream follows the
    baseline's NCCL stream too, so one event covers both; `synchronize` names a peer that hangs."""
    wait = getattr(comm, "synchronize", None)
    if device.type == "cuda" and wait is not None:
        wait()
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


def _bus(nbytes: int, world_size: int, seconds: float) -> float:
    return nbytes * 2 * (world_size - 1) / world_size / seconds / 1e9


def describe(rows: list[BandwidthRow], world_size: int, transport: str) -> str:
    lines = [
        f"all-reduce bus bandwidth over {world_size} ranks, float32, in place ({transport} vs torch.distributed)",
        f"{'size':>10}{'calls':>7}{'ours GB/s':>11}{'torch GB/s':>12}{'ratio':>8}",
    ]
    for r in rows:
        size = f"{r.nbytes >> 20} MiB"
        base = f"{r.baseline_gb_s:.3f}" if r.baseline_gb_s is not None else "-"
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
        lines.append(f"{size:>10}{r.calls:>7}{r.ours_gb_s:>11.3f}{base:>12}{ratio:>8}")
    return "\n".join(lines)
