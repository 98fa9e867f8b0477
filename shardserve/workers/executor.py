"""The `Executor` seam: runs `StepPlan`s on every rank of a replica and returns their results.

The scheduler never knows whether the executor is one process or many. `run(plan)` hands one
plan to the ranks and returns the plans that completed meanwhile, oldest first, with their
results: one executor runs each plan at once; a pipeline keeps up to one plan per stage in
flight and returns a plan's result once the pipeline is full (or nothing new was scheduled).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from shardserve.engine.step import StepPlan, StepResult
from shardserve.workers.model_runner import Launched
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

    @property
    def min_micro_batch(self) -> int:
        """The fewest running requests worth a plan of their own (fewer: one plan takes them all)."""
        ...

    def run(self, plan: StepPlan) -> Completed: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """One rank, in this process. With `depth` 2 (a GPU with `scheduler.async_scheduling`) two
    plans are in flight: `run` starts a plan and returns the previous one's result, so the
    leader schedules and prepares the next plan while the GPU computes this one. The two plans
    hold different requests (halves of the batch), unless a half would have fewer than
    `min_micro_batch`: a decode step reads every weight, so one plan then takes them all."""

    def __init__(self, worker: Worker, depth: int = 1, min_micro_batch: int = 1) -> None:
        self.worker = worker
        self.max_in_flight = depth
        self.min_micro_batch = min_micro_batch
        self.in_flight: deque[tuple[StepPlan, Launched]] = deque()

    @property
    def num_blocks(self) -> int:
        return self.worker.num_blocks

    def run(self, plan: StepPlan) -> Completed:
        runner = self.worker.runner
        if not plan.is_empty or plan.finished_request_ids:
            self.in_flight.append((plan, runner.launch(plan)))
        if self.in_flight and (len(self.in_flight) >= self.max_in_flight or plan.is_empty):
            done, launched = self.in_flight.popleft()
            return [(done, runner.finish(launched))]
        return []

    def shutdown(self) -> None:
        self.in_flight.clear()
