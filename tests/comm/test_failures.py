"""A rank that dies (SIGKILL) or stops (SIGSTOP) is named by the ranks waiting on it, in bounded time.

World of 3: rank 2 signals itself right after a barrier; rank 0 then idles in
`world.recv_object(src=2, timeout=None)` (a follower waiting for the next plan) and rank 1 is in
`world.all_reduce(t, timeout=5)`. Both must fail naming rank 2. Stopping rank 0, which hosts the
rank board's store, must not hang the others either.
"""

from __future__ import annotations

import pytest

from tests.comm.conftest import Launch, needs_backend

TIMEOUT_S = 5.0
HEARTBEAT_TIMEOUT_S = 1.5
SLACK_S = 3.0
CASES = [(b, s) for b in ("mpi", "gloo") for s in ("SIGKILL", "SIGSTOP")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("backend", "sig"), CASES, ids=[f"{b}-{s}" for b, s in CASES])
def test_waiting_ranks_name_the_lost_rank(rank_jobs: Launch, backend: str, sig: str) -> None:
    needs_backend(backend)
    job = rank_jobs(
        backend,
        "failure",
        3,
        1,
        "--timeout",
        str(TIMEOUT_S),
        "--heartbeat-timeout",
        str(HEARTBEAT_TIMEOUT_S),
        "--signal",
        sig,
    )
    reports = job.reports([0, 1], timeout=45)
    bounds = {0: HEARTBEAT_TIMEOUT_S + SLACK_S, 1: TIMEOUT_S + SLACK_S}  # rank 0 waits with timeout=None
    for rank, report in reports.items():
        assert "error" in report, f"rank {rank}: {report}\n{job.logs()}"
        error = report["error"]
        assert error["type"] in ("RankFailedError", "CollectiveTimeoutError"), error
        # rank 0 may be blamed too when it already gave up (blaming rank 2) and left
        assert 2 in error["ranks"] and set(error["ranks"]) <= {0, 1, 2} - {rank}, error
        assert error["message"].startswith(f"rank {rank}: "), error["message"]
        assert "rank 2: no heartbeat" in error["message"], error["message"]
        assert error["elapsed"] < bounds[rank], error
    op = {0: "recv_object #", 1: "all_reduce #"}
    assert all(op[r] in reports[r]["error"]["message"] for r in (0, 1))


@pytest.mark.timeout(60)
def test_a_stopped_store_host_is_named(rank_jobs: Launch) -> None:
    """World of 2 (gloo): rank 0 stops itself; rank 1 idles in recv_object(src=0, timeout=None)."""
    job = rank_jobs(
        "gloo",
        "failure",
        2,
        1,
        "--timeout",
        str(TIMEOUT_S),
        "--heartbeat-timeout",
        str(HEARTBEAT_TIMEOUT_S),
        "--signal",
        "SIGSTOP",
        "--victim",
        "0",
    )
    error = job.reports([1], timeout=45)[1].get("error")
    assert error is not None, job.logs()
    assert error["type"] == "RankFailedError" and error["ranks"] == [0], error
    assert error["message"].startswith("rank 1: recv_object #") and "rank 0" in error["message"], error
    assert error["elapsed"] < HEARTBEAT_TIMEOUT_S + SLACK_S, error
