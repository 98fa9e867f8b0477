"""Shared fixtures: tiny checkpoints per family (built once per session)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():  # our Triton kernels run in Triton's interpreter (tests/triton_cpu.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from tests.checkpoints import LLAMA_RECIPES, Checkpoints  # noqa: E402 - imports shardserve, then triton


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Any]]:
    """`tiny_checkpoint("llama")` -> (dir, transformers model), made once per session (shared with
    tests/models/test_llama.py and tests/builder/test_build_families.py)."""
    return Checkpoints(tmp_path_factory, "llama", LLAMA_RECIPES)
