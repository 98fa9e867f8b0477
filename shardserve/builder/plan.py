"""The shard plan: which layers each pipeline stage holds and the rank → (stage, tp rank) map.

Rank r of a tp × pp engine is stage r // tp, tensor-parallel rank r % tp (tp ranks of a stage
are neighbours, so they share a node). Layers are split as evenly as possible, earlier stages
taking the remainder. Every divisibility rule is checked here, before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardserve.builder.errors import CheckpointError
from shardserve.models.arch import ArchConfig
from shardserve.models.base import Stage


class ShardPlanError(CheckpointError):
    """tp / pp that this model cannot be split into; the message states the rule."""


@dataclass(frozen=True, slots=True)
class ShardPlan:
    tp: int
    pp: int
    stages: tuple[Stage, ...]

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank_coords(self, rank: int) -> tuple[int, int]:
        """(pipeline stage, tensor-parallel rank) of a global rank."""
        return rank // self.tp, rank % self.tp

    def stage_of(self, rank: int) -> Stage:
        return self.stages[rank // self.tp]

    @classmethod
    def make(cls, arch: ArchConfig, tp: int = 1, pp: int = 1) -> ShardPlan:
        check_divisible(arch, tp, pp)
        base, extra = divmod(arch.num_layers, pp)
        stages, start = [], 0
        for s in range(pp):
            end = start + base + (1 if s < extra else 0)
            stages.append(Stage(start, end, arch.num_layers))
            start = end
        return cls(tp, pp, tuple(stages))


def check_divisible(arch: ArchConfig, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ShardPlanError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
    if pp > arch.num_layers:
        raise ShardPlanError(f"pp={pp} is more than the model's {arch.num_layers} layers (each stage needs one)")
    if arch.num_heads % tp:
        raise ShardPlanError(
            f"tp={tp} does not divide num_attention_heads={arch.num_heads} (each rank takes whole attention heads)"
        )
    kv = arch.num_kv_heads
    if kv % tp and tp % kv:
        raise ShardPlanError(
            f"tp={tp} and num_key_value_heads={kv}: one must divide the other "
            "(KV heads are split over ranks, or each is replicated on tp / num_key_value_heads ranks)"
        )
    if arch.intermediate_size % tp:
        raise ShardPlanError(f"tp={tp} does not divide the MLP size {arch.intermediate_size}")
