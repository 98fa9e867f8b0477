"""`shardserve worker`: one rank process of a tp × pp engine, whoever launched it.

Under `mpiexec -n N` the MPI world gives rank and size (comm `mpi`); spawned by the local
launcher (or by hand) it gets `--rank`, `--world-size` and rank 0's `--master-addr/--master-port`
(comm `gloo` or `nccl`). Rank 0 is the leader: it runs the engine over stdin/stdout JSON lines
(`engine/jsonl.py`); every other rank follows the leader's plans. A failure prints one line
naming the rank at fault and exits with status 1 (see `cli.main`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from shardserve.builder.checkpoint import open_checkpoint
from shardserve.comm.base import CommError
from shardserve.config import CommBackend, ConfigError, DeploymentConfig
from shardserve.models.registry import parse_arch

if TYPE_CHECKING:
    from shardserve.comm.world import WorldSpec

_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID")


def add_worker_parser(sub: Any) -> None:
    p = sub.add_parser("worker", help="run one rank of an engine (under mpiexec, or spawned by a launcher)")
    add_world_arguments(p)
    p.set_defaults(func=cmd_worker)


def add_world_arguments(p: argparse.ArgumentParser) -> None:
    """The engine and this rank's place in its world (`worker` and `doctor`)."""
    p.add_argument("--engine-dir", required=True)
    cfg = p.add_mutually_exclusive_group()
    cfg.add_argument("--config", help="deployment YAML")
    cfg.add_argument("--config-json", help="the deployment config as JSON (launchers pass it so)")
    p.add_argument("--comm", choices=[b.value for b in CommBackend], default=None)
    p.add_argument("--rank", type=int, default=None, help="this rank (not under mpiexec)")
    p.add_argument("--world-size", type=int, default=None, help="ranks in all (default: the engine's tp × pp)")
    p.add_argument("--master-addr", default=None)
    p.add_argument("--master-port", type=int, default=None)


def under_mpi() -> bool:
    return any(name in os.environ for name in _MPI_ENV)


def worker_config(args: argparse.Namespace) -> DeploymentConfig:
    if args.config_json:
        import json

        base = DeploymentConfig.from_dict(json.loads(args.config_json))
    else:
        base = DeploymentConfig.from_yaml(args.config) if args.config else DeploymentConfig()
    data = base.model_dump(mode="json")
    data["model"]["path"] = args.engine_dir
    parallel = data["parallel"]
    for key, value in (("comm", args.comm), ("master_addr", args.master_addr), ("master_port", args.master_port)):
        if value is not None:
            parallel[key] = value
    if parallel["comm"] == "auto" and under_mpi():
        parallel["comm"] = "mpi"
    return DeploymentConfig.from_dict(data)


def world_spec(args: argparse.Namespace, config: DeploymentConfig) -> WorldSpec:
    from shardserve.comm.world import WorldSpec
    from shardserve.workers.launch import resolve_backend

    checkpoint = open_checkpoint(args.engine_dir, require_weights=False)  # the engine's shape only
    if checkpoint.engine is None:
        raise ConfigError(f"{args.engine_dir}: not an engine directory (build one with `shardserve build`)")
    engine = checkpoint.engine
    backend = resolve_backend(config.parallel.comm, config.model.device)
    p = config.parallel
    try:
        return WorldSpec(backend, args.world_size or engine.world_size, engine.tp, args.rank, p.master_addr,
                         p.master_port, p.timeout_s, p.heartbeat_timeout_s)  # fmt: skip
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cmd_worker(args: argparse.Namespace) -> int:
    from shardserve.comm.world import init_world
    from shardserve.engine.engine import LLMEngine

    config = worker_config(args)
    spec = world_spec(args, config)
    if spec.backend != "mpi" and spec.rank is None:  # rank 0 here; the local launcher starts the rest
        lead(LLMEngine(config))
        return 0
    world = None
    try:
        world = init_world(spec)
        run_rank(config, world)
        return 0
    except CommError as exc:
        if world is not None:
            world.board.report_failure(exc)
            world.board.fence(exc.ranks)  # a stopped rank would keep mpiexec waiting forever
        raise
    finally:
        if world is not None:
            world.close()


def run_rank(config: DeploymentConfig, world: Any) -> None:
    """Rank 0: the engine over stdin/stdout JSON lines. Others: follow the leader's plans."""
    from shardserve.engine.engine import LLMEngine, freeze_startup_heap, max_model_len, open_model
    from shardserve.workers.group import follow
    from shardserve.workers.worker import Worker

    if world.rank == 0:
        lead(LLMEngine(config, world=world))
        return
    checkpoint = open_model(config)
    arch = parse_arch(checkpoint.config)
    max_len = max_model_len(checkpoint, arch, config)
    worker = Worker(checkpoint, arch, config.model, config.cache, config.scheduler, max_len, world)
    freeze_startup_heap(config.scheduler.gc_gen0_threshold)
    follow(worker, world)


def lead(engine: Any) -> None:
    """The leader: serve JSON lines until end of input, stop the ranks, print their stats."""
    from shardserve.engine.jsonl import serve_jsonl
    from shardserve.workers.group import describe_stats

    try:
        serve_jsonl(engine, sys.stdin, sys.stdout)
    finally:
        engine.shutdown()
    stats = getattr(engine.executor, "rank_stats", None)
    if stats and len(stats) > 1:
        print(describe_stats(stats), file=sys.stderr)
