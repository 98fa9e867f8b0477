"""WorldSpec validation and world set-up in this process (gloo): layout, join failures, close."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from shardserve.comm import CommError, Communicator, WorldSpec, init_world
from tests.comm.launch import free_port

pytestmark = pytest.mark.timeout(20)


def test_spec_validates_layout() -> None:
    with pytest.raises(ValueError, match="world_size 6 is not a multiple of tp 4"):
        WorldSpec("gloo", world_size=6, tp=4)
    with pytest.raises(ValueError, match="unknown communication backend 'nccl2'"):
        WorldSpec("nccl2", world_size=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        WorldSpec("gloo", world_size=2, rank=2)
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        WorldSpec("gloo", world_size=2, heartbeat_timeout_s=0.1, heartbeat_interval_s=0.2)
    assert WorldSpec("mpi", world_size=8, tp=2).pp == 4


def test_gloo_needs_rank_and_port() -> None:
    with pytest.raises(ValueError, match="needs WorldSpec.rank"):
        init_world(WorldSpec("gloo", world_size=2, master_port=free_port()))
    with pytest.raises(ValueError, match="needs WorldSpec.master_port"):
        init_world(WorldSpec("gloo", world_size=2, rank=0))


def test_a_world_of_one_runs_in_process() -> None:
    world = init_world(WorldSpec("gloo", world_size=1, rank=0, master_port=free_port(), timeout_s=10))
    try:
        assert (world.rank, world.world_size, world.tp_size, world.pp_size, world.stage, world.tp_rank) == (
            0,
            1,
            1,
            1,
            0,
            0,
        )
        for comm in (world.world, world.tp):
            assert isinstance(comm, Communicator) and comm.ranks == (0,) and comm.world_size == 1
        t = torch.arange(3, dtype=torch.bfloat16)
        assert world.tp.all_reduce(t) is t and torch.equal(t, torch.arange(3, dtype=torch.bfloat16))
        assert world.world.broadcast_object({"plan": 1}) == {"plan": 1}
        world.world.barrier()
        with pytest.raises(ValueError, match="this rank itself"):
            world.world.send(t, dst=0)
    finally:
        world.close()
        world.close()
    assert not dist.is_initialized()


def test_rank_0_names_the_ranks_that_did_not_join() -> None:
    started = time.monotonic()
    with pytest.raises(CommError) as info:
        init_world(WorldSpec("gloo", world_size=3, rank=0, master_port=free_port(), timeout_s=1.0))
    assert info.value.ranks == (1, 2)
    assert str(info.value).startswith("rank 0: rank 1, rank 2 did not join within 1 s")
    assert time.monotonic() - started < 4
    assert not dist.is_initialized()


def test_a_rank_without_rank_0_names_rank_0() -> None:
    started = time.monotonic()
    with pytest.raises(CommError) as info:
        init_world(WorldSpec("gloo", world_size=2, rank=1, master_port=free_port(), timeout_s=1.0))
    assert info.value.ranks == (0,)
    assert str(info.value).startswith("rank 1: could not reach the rank board at 127.0.0.1:")
    assert "within 1 s: rank 0 hosts it and did not answer" in str(info.value)
    assert time.monotonic() - started < 2
