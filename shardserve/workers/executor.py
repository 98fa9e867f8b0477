"""The `Executor` seam: runs one `StepPlan` on every rank of a replica and returns its result.

The scheduler never knows whether the executor is one process or many.
"""

from __future__ import annotations

from typing import Protocol

from shardserve.engine.step import StepPlan, StepResult
from shardserve.workers.worker import Worker


class Executor(Protocol):
    @property
    def num_blocks(self) -> int:
        """KV-cache blocks every rank can hold (the leader's block pool size)."""
        ...

    def run(self, plan: StepPlan) -> StepResult: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """One rank, in this process."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    @property
    def num_blocks(self) -> int:
        return self.worker.num_blocks

    def run(self, plan: StepPlan) -> StepResult:
        return self.worker.runner.execute(plan)

    def shutdown(self) -> None:
        return None
