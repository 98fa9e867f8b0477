"""Every collective of both CPU backends, against numpy on the same seeded inputs, in real processes."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from tests.comm.cases import NUMPY, expected, plan_object, tp_ranks
from tests.comm.conftest import Launch, needs_backend

WORLDS = [("mpi", 2, 1), ("gloo", 2, 2), ("mpi", 4, 2), ("gloo", 4, 2)]


def as_numpy(got: dict[str, Any]) -> np.ndarray:
    return np.array(got["values"], dtype=NUMPY[got["dtype"]]).reshape(got["shape"])


def check_tensors(rank: int, report: dict[str, Any], world_size: int, tp: int) -> None:
    want = expected(rank, world_size, tp)
    assert set(report["tensors"]) == set(want)
    for key, reference in want.items():
        got = report["tensors"][key]
        assert got["dtype"] == key.split("|")[1], key
        np.testing.assert_array_equal(as_numpy(got), reference, err_msg=f"rank {rank}: {key}")


def check_objects(rank: int, report: dict[str, Any], world_size: int) -> None:
    def roundtrip(obj: object) -> object:
        return json.loads(json.dumps(obj))

    for src in (0, world_size - 1):
        assert report[f"broadcast_object{src}"] == roundtrip(plan_object(src))
    assert report["ring_object"] == roundtrip(plan_object((rank - 1) % world_size))
    assert report["iring_object"] == roundtrip(plan_object((rank - 1) % world_size))


def check_timeout(reports: dict[int, dict[str, Any]]) -> None:
    error = reports[0]["timeout_error"]
    assert error["type"] == "CollectiveTimeoutError"
    assert error["ranks"] == [1]
    assert error["message"].startswith("rank 0: all_reduce #")
    assert "within 0.5 s" in error["message"] and "rank 1 did not arrive" in error["message"]
    assert 0.5 <= error["elapsed"] < 1.5
    after = reports[0]["after_failure"]
    assert after["type"] == "CommError" and "unusable after an earlier failure" in after["message"]
    assert reports[1]["late_all_reduce"]["values"] == [2.0, 2.0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("backend", "world_size", "tp"), WORLDS, ids=[f"{b}-w{w}-tp{t}" for b, w, t in WORLDS])
def test_collectives_match_numpy(rank_jobs: Launch, backend: str, world_size: int, tp: int) -> None:
    needs_backend(backend)
    job = rank_jobs(backend, "collectives", world_size, tp)
    reports = job.reports(list(range(world_size)), timeout=45)
    for rank, report in reports.items():
        assert "crash" not in report, f"rank {rank} crashed:\n{report['crash']}\n{job.logs()}"
        assert report["world_ranks"] == list(range(world_size))
        assert report["tp_ranks"] == tp_ranks(rank, tp)
        assert (report["stage"], report["tp_rank"]) == (rank // tp, rank % tp)
        assert all(report["in_place"].values()), report["in_place"]
        check_tensors(rank, report, world_size, tp)
        check_objects(rank, report, world_size)
    if world_size == 2:
        check_timeout(reports)
    assert job.wait(timeout=20) in (0, None), job.logs()
