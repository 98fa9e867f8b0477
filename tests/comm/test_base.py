"""The protocol, the world-of-one communicators, the errors and the tensor plumbing (no processes)."""

from __future__ import annotations

import pytest
import torch

from shardserve.comm import (
    DEFAULT,
    CollectiveTimeoutError,
    CommError,
    Communicator,
    RankFailedError,
    ShapeOnlyCommunicator,
    SingleRankCommunicator,
)
from shardserve.comm.base import resolve_timeout
from shardserve.comm.tensors import byte_view, check_gather, check_tensor, unpack_gathered

pytestmark = pytest.mark.timeout(10)


def test_single_rank_is_a_communicator_of_one() -> None:
    comm = SingleRankCommunicator()
    assert isinstance(comm, Communicator)
    assert (comm.rank, comm.world_size, comm.ranks) == (0, 1, (0,))
    t = torch.arange(4.0)
    assert comm.all_reduce(t) is t and comm.broadcast(t) is t and comm.all_gather(t) is t
    assert comm.broadcast_object({"a": 1}) == {"a": 1}
    comm.barrier(timeout=None)
    for call in (
        lambda: comm.send(t, 0),
        lambda: comm.recv(t, 0),
        lambda: comm.send_object(1, 0),
        lambda: comm.recv_object(0),
        lambda: comm.isend(t, 0),
        lambda: comm.isend_object(1, 0),
    ):
        with pytest.raises(RuntimeError, match="no peer"):
            call()


def test_shape_only_knows_its_place_but_cannot_run() -> None:
    comm = ShapeOnlyCommunicator(rank=1, world_size=4)
    assert (comm.rank, comm.world_size, comm.ranks) == (1, 4, (0, 1, 2, 3))
    with pytest.raises(RuntimeError, match="shape-only"):
        comm.all_reduce(torch.ones(1))


def test_error_hierarchy_and_blamed_ranks() -> None:
    timeout = CollectiveTimeoutError("rank 0: all_reduce #1 on tp[0,1] did not complete", (1,))
    assert isinstance(timeout, CommError) and isinstance(timeout, TimeoutError)
    assert isinstance(timeout, RuntimeError) and timeout.ranks == (1,)
    failed = RankFailedError("rank 0: rank 3 died", [3])
    assert isinstance(failed, CommError) and not isinstance(failed, TimeoutError)
    assert failed.ranks == (3,) and CommError("x").ranks == ()


def test_timeouts_resolve() -> None:
    assert resolve_timeout(DEFAULT, 7.0) == 7.0
    assert resolve_timeout(None, 7.0) is None
    assert resolve_timeout(0.5, 7.0) == 0.5
    with pytest.raises(ValueError, match=">= 0"):
        resolve_timeout(-1.0, 7.0)


def test_tensor_checks_name_the_problem() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        check_tensor(torch.ones(3, 4).t(), "all_reduce")
    with pytest.raises(TypeError, match="float64 is not supported"):
        check_tensor(torch.ones(2, dtype=torch.float64), "broadcast")
    with pytest.raises(ValueError, match="0-dim"):
        check_gather(torch.tensor(1.0), 0)
    with pytest.raises(ValueError, match="out of range"):
        check_gather(torch.ones(2, 3), 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.bool, torch.int64, torch.float16])
def test_byte_views_share_memory_and_gathers_unpack(dtype: torch.dtype) -> None:
    t = torch.zeros(2, 3, dtype=dtype)
    source = torch.ones(2, 3, dtype=dtype)
    byte_view(t).copy_(byte_view(source))
    assert torch.equal(t, source)
    parts = [torch.full((2, 3), i, dtype=dtype) for i in range(3)]
    gathered = torch.cat([byte_view(p) for p in parts])
    for dim in (0, -1):
        assert torch.equal(unpack_gathered(gathered, parts[0], 3, dim), torch.cat(parts, dim=dim))
