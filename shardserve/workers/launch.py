"""Starting the ranks of one engine (the `Launcher` seam), separate from the rank code.

- `LocalLauncher`: this process is rank 0 (the leader); it spawns ranks 1..N-1 on this host
  as `python -m shardserve.cli worker --rank r ...` processes (what `shardserve generate
  --model-dir ENGINE_DIR` does for a tp × pp engine) and stops them when the engine stops.
- mpiexec: `mpiexec -n N shardserve worker --engine-dir DIR`; every rank is started by MPI
  (see `workers/entry.py`), nothing is spawned here.
- Ray actors in a placement group: the cluster's controller.
A launcher notices rank deaths; after a failure it gives the ranks the heartbeat timeout to
exit with their own error (naming the failed rank), then kills whatever is left, stopped ones too.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from shardserve.builder.checkpoint import Checkpoint
from shardserve.config import CommBackend, ConfigError, DeploymentConfig
from shardserve.models.arch import ArchConfig
from shardserve.workers.executor import Executor, LocalExecutor
from shardserve.workers.worker import Worker, resolve_device

if TYPE_CHECKING:
    from shardserve.comm.world import World


class Launcher(Protocol):
    def exited(self) -> dict[int, int]:
        """Ranks whose process has ended, with their exit codes."""
        ...

    def stop(self, clean: bool) -> None:
        """Wait for the ranks to exit (`clean`: after a normal shutdown), then kill the rest."""
        ...


class LocalLauncher:
    """Ranks 1..N-1 of an engine as child processes of this one (rank 0)."""

    def __init__(
        self,
        engine_dir: Path,
        config: DeploymentConfig,
        world_size: int,
        backend: str,
        port: int,
        command: str = "worker",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.grace_s = config.parallel.heartbeat_timeout_s + 2.0
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        config_json = json.dumps(config.model_dump(mode="json"))
        for rank in range(1, world_size):
            cmd = [
                sys.executable, "-m", "shardserve.cli", command,
                "--engine-dir", str(engine_dir), "--config-json", config_json,
                "--comm", backend, "--rank", str(rank), "--world-size", str(world_size),
                "--master-addr", config.parallel.master_addr, "--master-port", str(port), *extra_args,
            ]  # fmt: skip
            self.procs[rank] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    @property
    def pids(self) -> dict[int, int]:
        return {rank: p.pid for rank, p in self.procs.items()}

    def exited(self) -> dict[int, int]:
        return {rank: code for rank, p in self.procs.items() if (code := p.poll()) is not None}

    def stop(self, clean: bool) -> None:
        deadline = time.monotonic() + (10.0 if clean else self.grace_s)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)  # also ends a stopped (SIGSTOP) rank
                proc.wait()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def resolve_backend(comm: CommBackend, device_name: str) -> str:
    if comm is not CommBackend.AUTO:
        return comm.value
    return "nccl" if resolve_device(device_name).type == "cuda" else "gloo"


def start_executor(
    checkpoint: Checkpoint, arch: ArchConfig, config: DeploymentConfig, max_len: int, world: World | None = None
) -> Executor:
    """The leader's executor: one rank in-process; or rank 0 of a world (given, or started here)."""
    from shardserve.workers.group import GroupExecutor

    if world is not None:
        worker = Worker(checkpoint, arch, config.model, config.cache, config.scheduler, max_len, world)
        return GroupExecutor(worker, world, config.parallel)
    engine = checkpoint.engine
    world_size = engine.world_size if engine is not None else 1
    if world_size == 1 and config.parallel.comm is CommBackend.AUTO:
        worker = Worker(checkpoint, arch, config.model, config.cache, config.scheduler, max_len)
        overlap = config.scheduler.async_scheduling
        if overlap is None:
            overlap = worker.device.type == "cuda"
        return LocalExecutor(worker, depth=2 if overlap else 1)
    backend = resolve_backend(config.parallel.comm, config.model.device)
    if backend == "mpi":
        raise ConfigError(
            f"parallel.comm: mpi needs an MPI world: run `mpiexec -n {world_size} shardserve worker "
            f"--engine-dir {checkpoint.path}`"
        )
    return _launch_local(checkpoint, arch, config, max_len, world_size, backend)


def _launch_local(
    checkpoint: Checkpoint, arch: ArchConfig, config: DeploymentConfig, max_len: int, world_size: int, backend: str
) -> Executor:
    from shardserve.comm.world import WorldSpec, init_world
    from shardserve.workers.group import GroupExecutor

    parallel = config.parallel
    port = parallel.master_port or free_port(parallel.master_addr)
    launcher = LocalLauncher(checkpoint.path, config, world_size, backend, port)
    world = None
    try:
        tp = checkpoint.engine.tp if checkpoint.engine is not None else 1
        spec = WorldSpec(backend, world_size, tp, 0, parallel.master_addr, port, parallel.timeout_s,
                         parallel.heartbeat_timeout_s)  # fmt: skip
        world = init_world(spec)
        worker = Worker(checkpoint, arch, config.model, config.cache, config.scheduler, max_len, world)
    except BaseException:
        if world is not None:
            world.close()
        launcher.stop(clean=False)
        raise
    return GroupExecutor(worker, world, parallel, launcher)
