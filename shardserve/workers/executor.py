"""The `Executor` seam: runs `StepPlan`s on every rank of a replica and returns their results.

The scheduler never knows whether the executor is one process or many. `run(plan)` hands one
plan to the ranks and returns the plans that completed meanwhile, oldest first, with their
results: one executor runs each plan at once; a pipeline keeps up to one plan per stage in
flight and returns a plan's result once the pipeline is full (or nothing new was scheduled).
"""

from __future__ import annotations

from typing import Protocol

from shardserve.engine.step import StepPlan, StepResult
from shardserve.workers.worker import Worker

Completed = list[tuple[StepPlan, StepResult]]


class Executor(Protocol):
    @property
    def num_blocks(self) -> int:
        """KV-cache blocks every rank can hold (the leader's block pool size)."""
        ...

    @property
    def max_in_flight(self) -> int:
        """Plans the executor keeps in flight at once (the scheduler's micro-batches)."""
        ...

    def run(self, plan: StepPlan) -> Completed: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """One rank, in this process."""

    max_in_flight = 1

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    @property
    def num_blocks(self) -> int:
        return self.worker.num_blocks

    def run(self, plan: StepPlan) -> Completed:
        return [(plan, self.worker.runner.execute(plan))]

    def shutdown(self) -> None:
        return None
