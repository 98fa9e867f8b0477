"""`shardserve doctor` on a tp=2 × pp=2 engine: spawning its ranks (gloo) and in an MPI world, every
rank joins, the all-reduces check their sums and the pipeline ping comes back; a rank that never
starts is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.workers.ranks import BIN, Engines, mpiexec

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Engines:
    return Engines(tmp_path_factory)


def _rows(stdout: str) -> dict[int, list[str]]:
    return {int(line.split()[0]): line.split() for line in stdout.splitlines() if line.split()[0].isdigit()}


@pytest.mark.parametrize("launch", ["gloo", "mpi"])
def test_doctor_checks_every_rank(engines: Engines, launch: str) -> None:
    engine = str(engines("llama", "tp2pp2"))
    if launch == "gloo":
        cmd = [str(BIN / "shardserve"), "doctor", "--engine-dir", engine, "--comm", "gloo"]
    else:
        cmd = mpiexec(4, "doctor", "--engine-dir", engine)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=150, check=False)
    assert res.returncode == 0, res.stderr
    rows = _rows(res.stdout)
    assert sorted(rows) == [0, 1, 2, 3]
    assert "all 4 ranks joined and answered" in res.stdout
    assert float(rows[0][-1]) > 0  # stage 0 timed the pipeline ping round trip


def test_doctor_names_a_rank_that_never_joins(engines: Engines, tmp_path: Path) -> None:
    """Rank 0 of a tp=2 engine started by hand, its rank 1 never: it names rank 1 within the timeout."""
    from shardserve.workers.launch import free_port

    config = tmp_path / "c.yaml"
    config.write_text("parallel: {timeout_s: 5, heartbeat_timeout_s: 2}\n")
    cmd = [sys.executable, "-m", "shardserve.cli", "doctor", "--engine-dir", str(engines("llama", "tp2")),
           "--comm", "gloo", "--config", str(config), "--rank", "0", "--master-port", str(free_port("127.0.0.1"))]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "rank 1" in res.stderr.splitlines()[-1], res.stderr


def test_world_that_does_not_fit_the_engine_is_refused(engines: Engines) -> None:
    cmd = [sys.executable, "-m", "shardserve.cli", "doctor", "--engine-dir", str(engines("llama", "tp2")),
           "--comm", "gloo", "--world-size", "3"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2, res.stderr
    assert "world_size 3 is not a multiple of tp 2" in res.stderr


@pytest.mark.parametrize("launch", ["gloo", "mpi"])
def test_doctor_bandwidth_table(engines: Engines, launch: str) -> None:
    """Bus bandwidth per size; a gloo world also times torch.distributed on the same ranks (an MPI world has none)."""
    engine = str(engines("llama", "tp2"))
    flags = ["--bandwidth", "--max-mib", "4"]
    if launch == "gloo":
        cmd = [str(BIN / "shardserve"), "doctor", "--engine-dir", engine, "--comm", "gloo", *flags]
    else:
        cmd = mpiexec(2, "doctor", "--engine-dir", engine, *flags)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=150, check=False)
    assert res.returncode == 0, res.stderr
    assert "all-reduce bus bandwidth over 2 ranks" in res.stdout
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[1:2] == ["MiB"]]
    assert [r[0] for r in rows] == ["1", "4"], res.stdout
    for size, unit, calls, ours, torch_gb_s, ratio in rows:
        assert float(ours) > 0
        if launch == "gloo":
            assert float(torch_gb_s) > 0 and float(ratio) == pytest.approx(float(ours) / float(torch_gb_s), rel=0.05)  # 2-decimal rounding
        else:
            assert torch_gb_s == ratio == "-"
