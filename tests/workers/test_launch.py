"""Rank failures: a rank killed mid-run (SIGKILL) or hung (SIGSTOP). Every other rank exits with an
error naming it within the timeout (no hang), the launcher exits non-zero, nothing is left running.
Over gloo with the local launcher (this process as rank 0, and `shardserve generate` as a separate
launcher process) and over MPI (`mpiexec -n 4 shardserve worker`)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from shardserve.comm.base import CommError
from tests.checkpoints import staggered_prompts
from tests.workers.ranks import (
    BIN,
    SECTIONS,
    Engines,
    alive,
    kill_all,
    mpiexec,
    params,
    rank_pids,
    request_lines,
    stop_process,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(180)
TIMEOUTS = {"timeout_s": 15.0, "heartbeat_timeout_s": 2.0}
DEADLINE_S = TIMEOUTS["timeout_s"] + 10.0  # the error must come within the timeout (plus start-up slack)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Engines:
    return Engines(tmp_path_factory)


@pytest.mark.parametrize(("sig", "victim"), [(signal.SIGKILL, 3), (signal.SIGSTOP, 1)], ids=["sigkill", "sigstop"])
def test_gloo_rank_failure_mid_run_is_named_by_every_rank(
    engines: Engines, capfd: pytest.CaptureFixture[str], sig: signal.Signals, victim: int
) -> None:
    from shardserve.engine.engine import LLMEngine

    engine = LLMEngine.from_model(engines("llama", "tp2pp2"), **SECTIONS, parallel={"comm": "gloo", **TIMEOUTS})
    launcher = engine.executor.launcher  # type: ignore[attr-defined]
    pids = launcher.pids
    try:
        for i, prompt in enumerate(staggered_prompts(320)):
            engine.add_request(prompt, params(), request_id=str(i))
        for _ in range(3):
            engine.step()
        os.kill(pids[victim], sig)
        start = time.monotonic()
        with pytest.raises(CommError, match=f"rank {victim}\\b"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < DEADLINE_S
        engine.shutdown()
        codes = {rank: launcher.procs[rank].returncode for rank in pids}
    finally:
        kill_all(list(pids.values()))
    assert not any(alive(pid) for pid in pids.values())
    err = capfd.readouterr().err
    for rank in set(pids) - {victim}:  # they ended on their own error, naming the victim
        assert codes[rank] == 1, (rank, codes, err)
        assert any(line.startswith("shardserve worker: error: rank") and f"rank {victim}" in line
                   and f"rank {rank}:" in line for line in err.splitlines()), (rank, err)  # fmt: skip


def test_generate_exits_non_zero_when_a_rank_hangs(engines: Engines, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["the quick brown fox"] * 6) + "\n")
    config = write_config(tmp_path / "c.yaml", num_blocks=256, comm="gloo", **TIMEOUTS)
    cmd = [str(BIN / "shardserve"), "generate", "--model-dir", str(engines("llama", "tp2")), "--config", str(config),
           "--batch-file", str(prompts), "--max-output-len", "200", "--ignore-eos"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ranks = wait_for(lambda: rank_pids(proc.pid), 60, "rank 1 to start")
        time.sleep(0.5)
        os.kill(ranks[1], signal.SIGSTOP)
        _, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        stop_process(proc)
    assert proc.returncode == 1, err
    assert "rank 1" in err.splitlines()[-1], err
    assert not alive(ranks[1])


@pytest.mark.parametrize(("sig", "victim"), [(signal.SIGKILL, 2), (signal.SIGSTOP, 3)], ids=["sigkill", "sigstop"])
def test_mpi_rank_failure_mid_run(engines: Engines, tmp_path: Path, sig: signal.Signals, victim: int) -> None:
    config = write_config(tmp_path / "c.yaml", num_blocks=256, **TIMEOUTS)
    cmd = mpiexec(4, "worker", "--engine-dir", str(engines("llama", "tp2pp2")), "--config", str(config),
                  keep_survivors=True)  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: dict[int, int] = {}
    try:
        assert proc.stdin is not None and proc.stdout is not None
        lines = request_lines(320)
        proc.stdin.write("".join(line.replace('"max_tokens": 12', '"max_tokens": 150') + "\n" for line in lines))
        proc.stdin.flush()
        pids = wait_for(lambda: all_ranks(proc.pid, 4), 60, "4 MPI ranks")
        assert proc.stdout.readline()  # a first result: mid-run
        os.kill(pids[victim], sig)
        start = time.monotonic()
        _, err = proc.communicate(timeout=DEADLINE_S)
        assert time.monotonic() - start < DEADLINE_S
    finally:
        stop_process(proc)
        kill_all(list(pids.values()))
    assert proc.returncode != 0
    assert f"rank {victim}" in err, err
    assert not any(alive(pid) for pid in pids.values())


def all_ranks(pid: int, n: int) -> dict[int, int] | None:
    ranks = rank_pids(pid)
    return ranks if len(ranks) == n else None
