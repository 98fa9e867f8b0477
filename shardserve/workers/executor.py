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
    def run_ahead(self) -> bool:
        """Whether a plan may schedule a request whose last token is still in flight (its ranks
        take that token from the previous step's output on the device)."""
        ...

    def run(self, plan: StepPlan) -> Completed: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """One rank, in this process. With `depth` 2 (a GPU with `scheduler.async_scheduling`) two
    plans are in flight: `run` starts a plan and returns the previous one's result, so the
    leader schedules and prepares the next plan while the GPU computes this one. Each plan takes
    the whole batch: a request in the plan in flight runs one token ahead (`run_ahead`), its input
    id taken on the device from the token that plan samples."""

    def __init__(self, worker: Worker, depth: int = 1) -> None:
        self.worker = worker
        self.max_in_flight = depth
        self.in_flight: deque[tuple[StepPlan, Launched]] = deque()

    @property
    def num_blocks(self) -> int:
        return self.worker.num_blocks

    @property
    def run_ahead(self) -> bool:
        return self.max_in_flight > 1

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
