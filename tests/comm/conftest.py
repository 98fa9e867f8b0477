"""Fixtures for tests/comm: rank jobs that are always stopped, by PID, with nothing left running."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.comm.launch import MPIEXEC, RankJob, Zygote

Launch = Callable[..., RankJob]


@pytest.fixture(scope="session")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """One process that imported torch, forking every gloo job of the session."""
    z = Zygote(tmp_path_factory.mktemp("zygote") / "zygote.log")
    yield z
    leftovers = z.stop()
    assert not leftovers, f"zygote processes still alive after SIGKILL: {leftovers}"


@pytest.fixture
def rank_jobs(tmp_path: Path, zygote: Zygote) -> Iterator[Launch]:
    """`rank_jobs(backend, scenario, world_size, tp, *extra)` starts ranks; the finaliser stops them all
    and fails the test if any process of theirs is still alive."""
    jobs: list[RankJob] = []

    def launch(backend: str, scenario: str, world_size: int, tp: int, *extra: str) -> RankJob:
        outdir = tmp_path / f"job{len(jobs)}"
        outdir.mkdir()
        job = RankJob(zygote, backend, scenario, outdir, world_size, tp, *extra)
        jobs.append(job)
        return job

    yield launch
    leftovers = {pid for job in jobs for pid in job.stop()}
    assert not leftovers, f"processes still alive after SIGKILL: {sorted(leftovers)}"


def needs_backend(backend: str) -> None:
    if backend == "mpi":
        pytest.importorskip("mpi4py")
        if not MPIEXEC.exists() and shutil.which("mpiexec") is None:
            pytest.skip("no mpiexec next to the Python interpreter")
