"""A replica of several ranks: the leader's `GroupExecutor` and every other rank's `follow` loop.

Rank r of a tp × pp engine is pipeline stage r // tp, tp rank r % tp. The leader (global rank 0)
hosts the scheduler and also runs stage 0's tp rank 0. Each plan travels with the activations:
the leader broadcasts it over stage 0's tp group; every rank of stage s < pp - 1 forwards it to
its tp peer in stage s + 1, then runs its stage and sends its residual stream the same way (sends
are posted, not awaited, so no stage waits for a busy successor). The last stage's tp rank 0
samples and sends the `StepResult` to the leader. With pp > 1 up to `max_in_flight_batches`
plans (default pp) are in the pipeline at once: stage 0 computes the next micro-batch while later
stages finish earlier ones. A `None` plan ends the followers, which then report `RankStats`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shardserve.comm.base import CommError, PendingSend
from shardserve.config import ParallelConfig
from shardserve.engine.step import StepPlan, StepResult
from shardserve.workers.executor import Completed
from shardserve.workers.model_runner import StageLinks
from shardserve.workers.worker import Worker

if TYPE_CHECKING:
    from shardserve.comm.world import World
    from shardserve.workers.launch import Launcher


@dataclass(frozen=True, slots=True)
class RankStats:
    rank: int
    steps: int
    busy_s: float  # running its stage
    recv_wait_s: float  # waiting for the previous stage
    wall_s: float  # from its first step's start to its last step's end
    bubble: float  # 1 - busy / wall

    @classmethod
    def of(cls, worker: Worker) -> RankStats:
        t = worker.runner.times
        return cls(worker.layout.rank, t.steps, t.busy_s, t.recv_wait_s, t.wall_s, t.bubble)


class GroupExecutor:
    """The leader's side: an `Executor` over every rank of a tp × pp world."""

    def __init__(
        self,
        worker: Worker,
        world: World,
        parallel: ParallelConfig,
        launcher: Launcher | None = None,
    ) -> None:
        if world.rank != 0:
            raise ValueError("the GroupExecutor runs on global rank 0")
        self.worker = worker
        self.world = world
        self.depth = parallel.max_in_flight_batches or world.pp_size
        self.timeout = parallel.timeout_s
        self.sampler_rank = (world.pp_size - 1) * world.tp_size
        self.channel = PlanChannel(world, _links(worker), self.timeout)
        self.in_flight: deque[tuple[StepPlan, StepResult | None]] = deque()
        self.rank_stats: list[RankStats] = []
        self.failed: BaseException | None = None
        self.launcher = launcher  # None when something else started the ranks (mpiexec)
        self._closed = False

    @property
    def num_blocks(self) -> int:
        return self.worker.num_blocks

    @property
    def max_in_flight(self) -> int:
        return self.depth

    @property
    def run_ahead(self) -> bool:
        return False  # only the sampling rank holds the sampled tokens

    def run(self, plan: StepPlan) -> Completed:
        try:
            if not plan.is_empty or plan.finished_request_ids:
                self._submit(plan)
            if self.in_flight and (len(self.in_flight) >= self.depth or plan.is_empty):
                return [self._collect()]
            return []
        except BaseException as exc:
            self.failed = exc
            raise

    def _submit(self, plan: StepPlan) -> None:
        self.channel.pass_on(plan)
        result = self.worker.runner.execute(plan)  # stage 0's part; on a single stage the whole step
        self.in_flight.append((plan, result if self.sampler_rank == 0 else None))

    def _collect(self) -> tuple[StepPlan, StepResult]:
        plan, result = self.in_flight.popleft()
        if result is None:
            result = self.world.world.recv_object(src=self.sampler_rank, timeout=self.timeout)
            if not isinstance(result, StepResult) or result.step_id != plan.step_id:
                raise CommError(
                    f"rank 0: expected the result of step {plan.step_id} from rank "
                    f"{self.sampler_rank}, got {result!r:.80}"
                )
        return plan, result

    def shutdown(self) -> None:
        """End the followers (collecting their stats) and release the world; after a failure,
        only release (the launcher stops whatever is left)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.failed is None:
                self._stop_followers()
        except BaseException as exc:
            self.failed = exc
            raise
        finally:
            if self.failed is not None:
                self.world.board.report_failure(self.failed)
            self.world.close()
            torch.set_num_threads(self.worker.threads_before)
            if self.launcher is not None:
                self.launcher.stop(clean=self.failed is None)

    def _stop_followers(self) -> None:
        while self.in_flight:
            self._collect()
        self.channel.pass_on(None)
        self.channel.flush()
        self.worker.runner.flush()
        comm = self.world.world
        stats = [RankStats.of(self.worker)]
        stats += [comm.recv_object(src=r, timeout=self.timeout) for r in range(1, comm.world_size)]
        self.rank_stats = stats


class PlanChannel:
    """How plans reach a rank and move on: stage 0 by broadcast over its tp group (root: the
    leader), later stages from their tp peer in the previous stage; each forwards to the next."""

    def __init__(self, world: World, links: StageLinks, timeout: float) -> None:
        self.world = world
        self.timeout = timeout
        self.prev, self.next = links.prev, links.next  # the same neighbours as the hidden states
        self._sent: PendingSend | None = None

    def receive(self) -> StepPlan | None:
        """The next plan (a follower); waits without deadline while the leader is alive."""
        if self.prev is None:
            plan = self.world.tp.broadcast_object(None, src=0, timeout=None)
        else:
            plan = self.world.world.recv_object(src=self.prev, timeout=None)
        self.pass_on(plan, broadcast=False)
        return plan

    def pass_on(self, plan: StepPlan | None, broadcast: bool = True) -> None:
        """The leader: broadcast to stage 0's tp group. Every rank: post the plan to the next stage."""
        if broadcast and self.world.tp_size > 1:
            self.world.tp.broadcast_object(plan, src=0, timeout=self.timeout)
        if self.next is not None:
            self.flush()
            self._sent = self.world.world.isend_object(plan, dst=self.next)

    def flush(self) -> None:
        if self._sent is not None:
            self._sent.wait(self.timeout)
            self._sent = None


def follow(worker: Worker, world: World) -> RankStats:
    """A follower rank's loop: run every plan that reaches it until the `None` plan.

    Idle waits have no deadline but end with an error naming the leader if it dies or stops."""
    timeout = world.spec.timeout_s
    links = _links(worker)
    channel = PlanChannel(world, links, timeout)
    comm = world.world
    sent: PendingSend | None = None
    while (plan := channel.receive()) is not None:
        result = worker.runner.execute(plan)
        if links.samples:  # the last stage's tp rank 0 (never the leader here)
            if sent is not None:
                sent.wait(timeout)
            sent = comm.isend_object(result, dst=0)
    if sent is not None:
        sent.wait(timeout)
    channel.flush()
    worker.runner.flush()
    stats = RankStats.of(worker)
    comm.send_object(stats, dst=0)
    return stats


def _links(worker: Worker) -> StageLinks:
    links = worker.layout.links
    if links is None:
        raise ValueError("a rank of a world needs its pipeline links (Worker built with a World)")
    return links


def describe_stats(stats: list[RankStats]) -> str:
    """One line per rank: steps, busy and bubble (pipeline idle share)."""
    lines = ["rank  steps  busy_s  recv_wait_s  wall_s  bubble"]
    for s in stats:
        lines.append(
            f"{s.rank:>4}  {s.steps:>5}  {s.busy_s:>6.2f}  {s.recv_wait_s:>11.2f}  {s.wall_s:>6.2f}  {s.bubble:>6.1%}"
        )
    return "\n".join(lines)
