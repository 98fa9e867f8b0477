"""Shared set-up of the multi-rank tests: engines built per (family, tp, pp) once per session,
reference tokens (transformers, and our tp=1 engine), the JSON-lines requests of the MPI runs,
and process helpers (every process started is found and stopped by PID)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import LLAMA_RECIPES, Checkpoints, Made, hf_greedy, run_staggered, staggered_prompts
from tests.models.test_gpt2 import RECIPES as GPT2_RECIPES

BIN = Path(sys.executable).parent
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}
FAMILIES = {"llama": ("llama", LLAMA_RECIPES, "llama"), "gpt2": ("gpt2", GPT2_RECIPES, "tied")}
MAX_TOKENS = 12
# 16 blocks of 8 tokens cannot hold the 9 staggered requests at once: the scheduler preempts.
SECTIONS: dict[str, Any] = {
    "cache": {"block_size": 8, "num_blocks": 16},
    "scheduler": {"max_num_tokens": 48, "policy": "max_utilization"},
}


class Engines:
    """`engines(family, layout)` -> engine dir; `engines.source(family)` -> (checkpoint, reference)."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.built: dict[tuple[str, str], Path] = {}
        self.checkpoints = {name: Checkpoints(factory, fam, recipes) for name, (fam, recipes, _) in FAMILIES.items()}

    def source(self, family: str) -> Made:
        return self.checkpoints[family](FAMILIES[family][2])

    def __call__(self, family: str, layout: str) -> Path:
        from shardserve.builder.build import BuildOptions, build_engine

        key = (family, layout)
        if key not in self.built:
            tp, pp = LAYOUTS[layout]
            out = self.factory.mktemp(f"engine_{family}_{layout}")
            build_engine(self.source(family)[0], out, BuildOptions(tp=tp, pp=pp, progress=False))
            self.built[key] = out
        return self.built[key]


def params() -> Any:
    from shardserve.engine.request import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def reference_tokens(engines: Engines, family: str) -> dict[str, list[int]]:
    """Our tp=1 engine on the source checkpoint, same staggered arrivals; checked against transformers."""
    from shardserve.engine.engine import LLMEngine

    path, hf = engines.source(family)
    engine = LLMEngine.from_model(path, **SECTIONS)
    prompts = staggered_prompts(engine.arch.vocab_size)
    got = run_staggered(engine, prompts, params())
    for i, prompt in enumerate(prompts):
        assert got[str(i)] == hf_greedy(hf, prompt, MAX_TOKENS), f"tp=1 engine, prompt {i}"
    return got


def request_lines(vocab: int) -> list[str]:
    return [
        json.dumps(
            {"id": str(i), "prompt_token_ids": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        )
        for i, p in enumerate(staggered_prompts(vocab))
    ]


def write_config(path: Path, num_blocks: int = 16, **parallel: Any) -> Path:
    import yaml

    cache = {**SECTIONS["cache"], "num_blocks": num_blocks}
    path.write_text(yaml.safe_dump({**SECTIONS, "cache": cache, "parallel": parallel}))
    return path


# hydra kills every rank once one dies; each rank under a shell that outlives it keeps the others
# alive to report the failure themselves (see shardserve/comm/mpi.py).
KEEP_SURVIVORS = ["-disable-auto-cleanup", "-n", "{n}", "/bin/sh", "-c", 'trap "" USR1; "$0" "$@"; exit $?']


def mpiexec(n: int, *args: str, keep_survivors: bool = False) -> list[str]:
    launch = [a.format(n=n) for a in KEEP_SURVIVORS] if keep_survivors else ["-n", str(n)]
    return [str(BIN / "mpiexec"), *launch, str(BIN / "shardserve"), *args]


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def rank_pids(pid: int, command: str = "worker") -> dict[int, int]:
    """Global rank -> PID of the `shardserve <command>` processes below `pid` (MPI or launcher ranks)."""
    ranks: dict[int, int] = {}
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            env = dict(
                kv.split(b"=", 1) for kv in Path(f"/proc/{child}/environ").read_bytes().split(b"\0") if b"=" in kv
            )
        except OSError:
            continue
        if command.encode() not in cmdline or not any(b"shardserve" in part for part in cmdline):
            continue
        if b"PMI_RANK" in env:
            ranks[int(env[b"PMI_RANK"])] = child
        elif b"--rank" in cmdline:
            ranks[int(cmdline[cmdline.index(b"--rank") + 1])] = child
    return ranks


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Kill `proc` and everything below it (a test finaliser)."""
    kill_all(children(proc.pid))
    kill_all([proc.pid])
    proc.wait(timeout=10)
