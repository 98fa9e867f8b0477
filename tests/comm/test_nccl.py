"""The nccl backend (CuPy) in a world of one on the GPU: collectives against torch on the same
values, objects over the gloo control channel, a world-of-one engine giving the CPU path's tokens,
and `shardserve doctor --comm nccl` (≥ 2 GPUs are the multi-GPU issue's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(300)]


@pytest.fixture
def world() -> Any:
    from shardserve.comm.world import WorldSpec, init_world
    from shardserve.workers.launch import free_port

    w = init_world(WorldSpec("nccl", 1, 1, rank=0, master_port=free_port("127.0.0.1"), timeout_s=30.0))
    yield w
    w.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32])
def test_collectives_in_a_world_of_one(world: Any, dtype: torch.dtype) -> None:
    x = (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) - 7).to(dtype).cuda()
    for comm in (world.world, world.tp):
        assert torch.equal(comm.all_reduce(x.clone()), x)
        assert torch.equal(comm.all_gather(x, dim=-1), x)
        assert torch.equal(comm.all_gather(x, dim=0), x)
        assert torch.equal(comm.broadcast(x.clone(), src=0), x)
        comm.synchronize()
        comm.barrier()
    assert world.world.broadcast_object({"plan": [1, 2]}) == {"plan": [1, 2]}


def test_world_of_one_engine_gives_the_cpu_tokens(tiny_checkpoint: Any, tmp_path: Path) -> None:
    from shardserve.builder.build import BuildOptions, build_engine
    from shardserve.engine.engine import LLMEngine
    from shardserve.engine.request import SamplingParams
    from tests.checkpoints import run_staggered, staggered_prompts

    src, _ = tiny_checkpoint("llama")
    build_engine(src, tmp_path / "e", BuildOptions(progress=False))
    cache = {"block_size": 8, "num_blocks": 48}
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = staggered_prompts(320)
    cpu = LLMEngine.from_model(tmp_path / "e", model={"device": "cpu"}, cache=cache)
    gpu = LLMEngine.from_model(tmp_path / "e", model={"device": "cuda"}, cache=cache, parallel={"comm": "nccl"})
    try:
        assert type(gpu.executor).__name__ == "GroupExecutor"
        assert run_staggered(gpu, prompts, params) == run_staggered(cpu, prompts, params)
    finally:
        gpu.shutdown()


def test_doctor_over_nccl(tiny_checkpoint: Any, tmp_path: Path) -> None:
    from shardserve.builder.build import BuildOptions, build_engine

    src, _ = tiny_checkpoint("llama")
    build_engine(src, tmp_path / "e", BuildOptions(progress=False))
    cmd = [sys.executable, "-m", "shardserve.cli", "doctor", "--engine-dir", str(tmp_path / "e"), "--comm", "nccl"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=200, check=False)
    assert res.returncode == 0, res.stderr
    assert "all 1 ranks joined and answered" in res.stdout
    print(res.stdout)
