"""tp=2, pp=2 and tp=2 × pp=2 engines over gloo (this process is rank 0; the local launcher spawns
the rest) and over MPI (`mpiexec -n N shardserve worker`, requests as JSON lines): greedy tokens of
staggered requests, with preemption, equal the tp=1 engine's and transformers', for a Llama and
GPT-2 (tied head: the last stage holds the embedding too)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import run_staggered, staggered_prompts
from tests.workers.ranks import (
    FAMILIES,
    LAYOUTS,
    SECTIONS,
    Engines,
    mpiexec,
    params,
    reference_tokens,
    request_lines,
    stop_process,
    write_config,
)

pytestmark = pytest.mark.timeout(300)
CASES = [(family, layout) for family in FAMILIES for layout in LAYOUTS]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Engines:
    return Engines(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(engines: Engines) -> dict[str, dict[str, list[int]]]:
    return {family: reference_tokens(engines, family) for family in FAMILIES}


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{f}-{lay}" for f, lay in CASES])
def test_gloo_ranks_give_the_tp1_tokens(engines: Engines, reference: dict, family: str, layout: str) -> None:
    from shardserve.engine.engine import LLMEngine

    engine = LLMEngine.from_model(engines(family, layout), **SECTIONS, parallel={"comm": "gloo"})
    try:
        got = run_staggered(engine, staggered_prompts(engine.arch.vocab_size), params())
        preemptions = engine.scheduler.stats.num_preemptions
        assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    finally:
        engine.shutdown()
    assert got == reference[family]
    assert preemptions >= 1
    stats = engine.executor.rank_stats  # type: ignore[attr-defined]
    tp, pp = LAYOUTS[layout]
    assert [s.rank for s in stats] == list(range(tp * pp))
    assert all(s.steps > 0 and 0.0 <= s.bubble < 1.0 for s in stats)


def run_mpi(engine_dir: Path, n: int, config: Path, lines: list[str]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Three requests first; the rest once the first result is out (they join a running batch)."""
    cmd = mpiexec(n, "worker", "--engine-dir", str(engine_dir), "--config", str(config))
    with tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_file, text=True)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("".join(line + "\n" for line in lines[:3]))
            proc.stdin.flush()
            first = proc.stdout.readline()
            proc.stdin.write("".join(line + "\n" for line in lines[3:]))
            proc.stdin.close()
            rest = proc.stdout.read()  # to the end: the leader closes stdout when it exits
            proc.wait(timeout=60)
        finally:
            stop_process(proc)
        err_file.seek(0)
        err = err_file.read()
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in [first, *rest.splitlines()]]
    done = records.pop()
    assert done.get("done"), records
    return {r["id"]: r for r in records}, done, err


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{f}-{lay}" for f, lay in CASES])
def test_mpi_ranks_give_the_tp1_tokens(
    engines: Engines, reference: dict, family: str, layout: str, tmp_path: Path
) -> None:
    tp, pp = LAYOUTS[layout]
    engine_dir = engines(family, layout)
    lines = request_lines(320)
    results, done, err = run_mpi(engine_dir, tp * pp, write_config(tmp_path / "c.yaml"), lines)
    assert {i: r["token_ids"] for i, r in results.items()} == reference[family]
    assert done["stats"]["num_preemptions"] >= 1
    if pp > 1:  # the leader reports each rank's busy time and pipeline bubble
        assert "bubble" in err


def test_jsonl_bad_lines_get_errors_and_the_rest_is_served(engines: Engines, tmp_path: Path) -> None:
    lines = request_lines(320)[:2] + [
        "not json",
        json.dumps({"id": "x", "prompt_token_ids": [1, 2], "max_tokens": 0}),
        json.dumps({"id": "y", "prompt_token_ids": [1, 2], "bogus": 1}),
        json.dumps({"id": "z", "prompt": "hi", "prompt_token_ids": [1]}),
    ]
    results, _, _ = run_mpi(engines("llama", "tp2"), 2, write_config(tmp_path / "c.yaml"), lines)
    assert results["0"]["finish_reason"] == "length" and results["1"]["finish_reason"] == "length"
    assert "not a JSON object" in results[None]["error"]
    assert "max_tokens must be an integer >= 1" in results["x"]["error"]
    assert "unknown fields: bogus" in results["y"]["error"]
    assert "exactly one of 'prompt' and 'prompt_token_ids'" in results["z"]["error"]
