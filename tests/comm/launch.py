"""Starting rank processes for tests/comm and stopping every one of them, by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
# hydra SIGKILLs every rank once it reaps one killed by a signal (see shardserve/comm/mpi.py): each rank
# runs under a shell that outlives it (so hydra reaps a plain exit, status 137) and ignores SIGUSR1
KEEP_SURVIVORS = ["/bin/sh", "-c", 'trap "" USR1; "$0" "$@"; status=$?; exit $status']
# one thread per rank: several ranks share two cores
RANK_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, deepest first."""
    out: list[int] = []
    for child in _children(pid):
        out += descendants(child) + [child]
    return out


def alive(pid: int) -> bool:
    """Running or stopped; a zombie counts as gone (its parent or init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rank_env() -> dict[str, str]:
    return {**os.environ, **RANK_ENV, "PYTHONPATH": str(REPO)}


class Zygote:
    """`python -m tests.comm.zygote`: imports torch once and forks gloo jobs (saves ~3 s a job)."""

    def __init__(self, log: Path) -> None:
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.comm.zygote"],
            cwd=REPO,
            env=rank_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready", log.read_text()

    def spawn(self, argv: list[str]) -> int:
        """Fork a job leader running rank_script with `argv`; its PID."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self) -> list[int]:
        """SIGKILL the zygote and anything left under it; return those still alive after 5 s."""
        pids = [*descendants(self.proc.pid), self.proc.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.log.close()
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        return [p for p in pids if alive(p)]


class RankJob:
    """One launch of ranks writing into `outdir`: `mpiexec -n N`, or gloo ranks forked by the zygote."""

    def __init__(
        self, zygote: Zygote | None, backend: str, scenario: str, outdir: Path, world_size: int, tp: int, *extra: str
    ) -> None:
        self.outdir = outdir
        self.world_size = world_size
        argv = [backend, scenario, str(outdir), str(world_size), str(tp), *extra]
        if backend == "gloo":
            argv += ["--port", str(free_port())]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = open(outdir / "launcher.log", "wb")  # noqa: SIM115 - closed in stop()
        if backend == "gloo" and zygote is not None:
            self.leader = zygote.spawn(argv)
        else:
            args = [sys.executable, "-m", "tests.comm.rank_script", *argv]
            if backend == "mpi":
                args = [str(MPIEXEC), "-disable-auto-cleanup", "-n", str(world_size), *KEEP_SURVIVORS, *args]
            self.proc = subprocess.Popen(args, cwd=REPO, env=rank_env(), stdout=self.log, stderr=subprocess.STDOUT)
            self.leader = self.proc.pid
        self.seen: set[int] = {self.leader}

    def _rank_pids(self) -> set[int]:
        pids = set()
        for path in self.outdir.glob("pid*"):
            try:
                pids.add(int(path.read_text()))
            except ValueError:
                continue
        return pids

    def _track(self) -> list[int]:
        tree = descendants(self.leader)
        self.seen |= set(tree) | self._rank_pids()
        return tree

    def reports(self, ranks: list[int], timeout: float) -> dict[int, dict[str, Any]]:
        """Wait for <outdir>/rank<r>.json of `ranks`; fail with the logs if they do not come."""
        deadline = time.monotonic() + timeout
        paths = {r: self.outdir / f"rank{r}.json" for r in ranks}
        while not all(p.exists() for p in paths.values()):
            self._track()
            if time.monotonic() > deadline:
                missing = [r for r, p in paths.items() if not p.exists()]
                raise AssertionError(f"ranks {missing} wrote no report within {timeout} s\n{self.logs()}")
            time.sleep(0.05)
        return {r: json.loads(p.read_text()) for r, p in paths.items()}

    def wait(self, timeout: float) -> int | None:
        """The launcher's exit status (None for a zygote job, whose leader the zygote reaps)."""
        if self.proc is not None:
            return self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while alive(self.leader):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job leader {self.leader} still running after {timeout} s")
            time.sleep(0.05)
        return None

    def logs(self) -> str:
        parts = []
        for path in sorted(self.outdir.glob("*log*")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name}\n{text[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> list[int]:
        """SIGCONT + SIGKILL every process of this job, deepest first; return those still alive after 5 s."""
        for pid in [*self._track(), *sorted(self._rank_pids()), self.leader]:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
        if self.proc is not None:
            self.proc.wait(timeout=10)
        self.log.close()
        deadline = time.monotonic() + 5
        while any(alive(p) for p in self.seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        return [p for p in self.seen if alive(p)]
