"""`shardserve doctor`: start an engine's ranks and check they can work together.

Each rank joins the world, opens its own rank file, then all ranks run an all-reduce over the
world and one per tp group (value checked, time measured) and a pipeline ping: every stage
sends a hidden-sized tensor to the next and the last back to the first. Rank 0 prints one
line per rank. A rank that does not join or answer is named (exit status 1).

    shardserve doctor --engine-dir DIR                 # spawns the ranks (gloo on CPU, nccl on CUDA)
    mpiexec -n 4 shardserve doctor --engine-dir DIR    # an MPI world
    shardserve doctor --engine-dir DIR --comm nccl --bandwidth [--max-mib 1024]

`--bandwidth` adds the world's all-reduce bus bandwidth from 1 MiB up, against torch.distributed
on the same ranks in the same run (`comm/bandwidth.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch

from shardserve.builder.checkpoint import open_checkpoint
from shardserve.builder.engine_dir import rank_file
from shardserve.comm import bandwidth
from shardserve.comm.base import CommError, Communicator
from shardserve.config import ConfigError
from shardserve.models.registry import parse_arch

REPEATS = 5


@dataclass(frozen=True, slots=True)
class RankReport:
    rank: int
    host: str
    pid: int
    device: str
    rank_file_mib: float
    join_s: float
    all_reduce_ms: float  # world, 1M floats
    tp_all_reduce_ms: float
    ping_ms: float  # pipeline round trip (rank 0's measure; others 0)


def add_doctor_parser(sub: Any) -> None:
    from shardserve.workers.entry import add_world_arguments

    p = sub.add_parser("doctor", help="start an engine's ranks; check joins, all-reduce and pipeline ping")
    add_world_arguments(p)
    p.add_argument("--bandwidth", action="store_true", help="all-reduce bus bandwidth vs torch.distributed")
    p.add_argument("--max-mib", type=int, default=None, help="largest all-reduce (default 1024 on CUDA, 64 on CPU)")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from shardserve.comm.world import init_world
    from shardserve.workers.entry import worker_config, world_spec
    from shardserve.workers.launch import LocalLauncher, free_port

    config = worker_config(args)
    spec = world_spec(args, config)
    launcher = None
    if spec.backend != "mpi" and args.rank is None:  # the starting process: rank 0 spawns the rest
        port = spec.master_port or free_port(spec.master_addr)
        spec = dataclasses.replace(spec, rank=0, master_port=port)
        extra = ("--bandwidth", "--max-mib", str(args.max_mib or 0)) if args.bandwidth else ()
        engine_dir = open_checkpoint(args.engine_dir, require_weights=False).path
        launcher = LocalLauncher(
            engine_dir, config, spec.world_size, spec.backend, port, command="doctor", extra_args=extra
        )
    started = time.perf_counter()
    ok = False
    try:
        world = init_world(spec)
        try:
            report = check_rank(world, args.engine_dir, config.model.device, time.perf_counter() - started)
            reports = gather_reports(world, report)
            table = measure_bandwidth(world, report.device, args.max_mib) if args.bandwidth else ""
        except CommError as exc:
            world.board.report_failure(exc)
            raise
        finally:
            world.close()
        if reports:
            print(describe(reports))
        if table and world.rank == 0:
            print(table)
        ok = True
        return 0
    finally:
        if launcher is not None:
            launcher.stop(clean=ok)


def check_rank(world: Any, engine_dir: str, device_name: str, join_s: float) -> RankReport:
    from shardserve.workers.worker import resolve_device

    checkpoint = open_checkpoint(engine_dir, require_weights=False)
    arch = parse_arch(checkpoint.config)
    path = checkpoint.path / rank_file(world.rank)
    weights = checkpoint.engine is None or checkpoint.engine.weights
    if weights and not path.is_file():
        raise ConfigError(f"rank {world.rank}: {path} is missing")
    device = resolve_device(device_name, world.rank)
    big = torch.ones(1 << 20, device=device)
    world_ms = _time_all_reduce(world.world, big)
    tp_ms = _time_all_reduce(world.tp, big)
    ping_ms = _ping(world, torch.zeros(arch.hidden_size, device=device))
    return RankReport(world.rank, socket.gethostname(), os.getpid(), str(device),
                      path.stat().st_size / 2**20 if weights else 0.0,
                      join_s, world_ms, tp_ms, ping_ms)  # fmt: skip


def measure_bandwidth(world: Any, device_name: str, max_mib: int | None) -> str:
    """The world's all-reduce bus bandwidth table (every rank runs it; rank 0 prints it)."""
    device = torch.device(device_name)
    baseline = bandwidth.baseline_group(world.world, device)
    rows = bandwidth.sweep(world.world, device, bandwidth.default_sizes(device, max_mib), baseline)
    return bandwidth.describe(rows, world.world_size, world.spec.backend)


def _time_all_reduce(comm: Communicator, data: torch.Tensor) -> float:
    comm.all_reduce(data.clone())  # warm-up: first-use connection set-up is not timed
    comm.barrier()
    start = time.perf_counter()
    for _ in range(REPEATS):
        bandwidth.check_sum_of_ones(comm, comm.all_reduce(data.clone()))
    return (time.perf_counter() - start) / REPEATS * 1e3


def _ping(world: Any, data: torch.Tensor) -> float:
    """Stage s sends to stage s + 1 (same tp rank); the last stage sends back to the first."""
    if world.pp_size == 1:
        return 0.0
    comm, tp = world.world, world.tp_size
    nxt = (world.rank + tp) % world.world_size
    prv = (world.rank - tp) % world.world_size
    comm.barrier()
    start = time.perf_counter()
    for i in range(-1, REPEATS):  # round -1 warms the connections up
        if i == 0:
            start = time.perf_counter()
        if world.stage == 0:
            comm.send(data + i, dst=nxt)
            back = comm.recv(torch.empty_like(data), src=prv)
            if back[0].item() != i:
                raise CommError(f"pipeline ping {i} came back as {back[0].item()}")
        else:
            comm.send(comm.recv(torch.empty_like(data), src=prv), dst=nxt)
    return (time.perf_counter() - start) / REPEATS * 1e3 if world.stage == 0 else 0.0


def gather_reports(world: Any, report: RankReport) -> list[RankReport]:
    comm = world.world
    if world.rank != 0:
        comm.send_object(report, dst=0)
        return []
    return [report] + [comm.recv_object(src=r) for r in range(1, world.world_size)]


def describe(reports: list[RankReport]) -> str:
    lines = ["rank  host          pid      device   file_MiB  join_s  all_reduce_ms  tp_all_reduce_ms  ping_ms"]
    for r in reports:
        lines.append(
            f"{r.rank:>4}  {r.host[:12]:<12}  {r.pid:<7}  {r.device:<7}  {r.rank_file_mib:>8.1f}  "
            f"{r.join_s:>6.2f}  {r.all_reduce_ms:>13.2f}  {r.tp_all_reduce_ms:>16.2f}  {r.ping_ms:>7.2f}"
        )
    lines.append(f"all {len(reports)} ranks joined and answered")
    return "\n".join(lines)
