"""What every model family shares: its pipeline stage, checkpoint-name mapping and weight loading.

A family subclasses `CausalLM` and provides:
- `config_from_hf(cfg) -> ArchConfig` (staticmethod): its config.json keys, normalised;
- `convert_checkpoint(name, tensor)`: its checkpoint layout → canonical tensors (default: as is);
- `STACKED`: canonical name fragment → (parameter fragment, shard id) for weights fused at load;
- `forward(ids, positions, ctx, hidden=None)` on this stage's layers, `compute_logits(hidden)` on the last stage.
Canonical names are the HF ones (`model.layers.{i}.…`, global layer index); a stage holds layers
`[stage.start, stage.end)` under their global indices, and only the first stage the embedding,
only the last the final norm and lm_head. Rank files written by the builder hold canonical
tensors already cut for their rank, loaded with `presharded=True`.

What a pipeline stage takes in and returns (`stage_input`, `stage_output`, used by every family):
- in: the step's `ids` and `positions` [tokens] on every stage; the first stage embeds the ids
  (`hidden=None`), a later one starts from `hidden` [tokens, hidden_size], the previous stage's output;
- out: on the last stage the final-normed hidden states [tokens, hidden_size]; on any other stage
  the residual stream [tokens, hidden_size], one tensor: where layers carry the residual apart from
  x (Llama, GPT-2), x + residual, and the next stage starts again with residual None. That is the
  whole model's arithmetic, since the next norm adds x + residual first anyway.
A stage's `ctx.kv_caches` holds one cache per layer it holds, layer `i` at `i - stage.start`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from shardserve.models.arch import ArchConfig
from shardserve.models.layers import load_weight

if TYPE_CHECKING:
    from shardserve.workers.attention import ForwardContext

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|encoder\.layers)\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class Stage:
    """The layers of one pipeline stage."""

    start: int
    end: int
    num_layers: int

    @classmethod
    def whole(cls, num_layers: int) -> Stage:
        return cls(0, num_layers, num_layers)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers

    def __contains__(self, layer: int) -> bool:
        return self.start <= layer < self.end

    def describe(self) -> str:
        return f"pipeline stage of layers [{self.start}, {self.end}) of {self.num_layers}"


def stage_input(
    stage: Stage, ids: torch.Tensor, hidden: torch.Tensor | None, embed: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """The residual stream entering `stage` [tokens, hidden_size]: `embed()` (of the ids [tokens]) on the
    first stage, else `hidden`, the previous stage's output."""
    if stage.is_first:
        if hidden is not None:
            raise ValueError(f"the first {stage.describe()} embeds the ids itself: it takes no hidden states")
        return embed()
    if hidden is None:
        raise ValueError(f"the {stage.describe()} needs the previous stage's hidden states (hidden=None)")
    if hidden.dim() != 2 or hidden.shape[0] != ids.shape[0]:
        raise ValueError(f"the {stage.describe()} got hidden states {tuple(hidden.shape)} for {ids.shape[0]} tokens")
    return hidden


def stage_output(
    stage: Stage, x: torch.Tensor, residual: torch.Tensor | None, final_norm: nn.Module | None
) -> torch.Tensor:
    """What `stage` returns after its last layer: `final_norm(x, residual)` [tokens, hidden_size] on the
    last stage, else the residual stream x (+ residual, when the layers carry it apart) for the next."""
    if not stage.is_last:
        return x if residual is None else x + residual
    if final_norm is None:
        raise ValueError(f"the last {stage.describe()} has no final norm")
    if residual is None:
        return final_norm(x)
    out, _ = final_norm(x, residual)
    return out


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a checkpoint tensor name (None for embeddings, final norm, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class CausalLM(nn.Module):
    STACKED: ClassVar[dict[str, tuple[str, str | int]]] = {}
    # Canonical names of tensors held by the first stage (embeddings) and the last (norm, head).
    FIRST_STAGE_PREFIXES: ClassVar[tuple[str, ...]] = ("model.embed_tokens.",)
    LAST_STAGE_PREFIXES: ClassVar[tuple[str, ...]] = ("model.norm.", "lm_head.")

    def __init__(self, arch: ArchConfig, stage: Stage | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.stage = stage or Stage.whole(arch.num_layers)

    @staticmethod
    def config_from_hf(cfg: dict) -> ArchConfig:
        return ArchConfig.from_hf(cfg)

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids, positions: [tokens]; hidden: the previous stage's output [tokens, hidden_size], None on the
        first stage → final-normed hidden states (last stage) or the residual stream (other stages),
        [tokens, hidden_size]: the rule in the module docstring, kept by `stage_input` / `stage_output`."""
        raise NotImplementedError

    def convert_checkpoint(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield name, tensor

    def uses(self, name: str) -> bool:
        """Whether this stage holds the canonical tensor `name`."""
        layer = layer_index(name)
        if layer is not None:
            return layer in self.stage
        if name.startswith(self.FIRST_STAGE_PREFIXES):
            return self.stage.is_first
        if name.startswith(self.LAST_STAGE_PREFIXES):
            return self.stage.is_last
        return True

    def tied_head_source(self) -> str | None:
        """With tied embeddings, the canonical tensor the last stage loads into lm_head."""
        return "model.embed_tokens.weight" if self.arch.tie_word_embeddings else None

    def weight_target(self, name: str) -> tuple[str, str | int | None] | None:
        """(parameter name, shard id) of a canonical tensor, or None when this stage skips it."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.arch.tie_word_embeddings:
            return None
        if not self.uses(name):
            if name == self.tied_head_source() and self.stage.is_last:
                return "lm_head.weight", None
            return None
        for part, (ours, shard_id) in self.STACKED.items():
            if part in name:
                return name.replace(part, ours), shard_id
        return name, None

    def canonical_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            yield from self.convert_checkpoint(name, tensor)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], presharded: bool = False) -> set[str]:
        """Copy checkpoint tensors into this rank's parameters; returns the parameter names loaded.

        `presharded`: tensors are canonical and already cut for this rank (an engine rank file)."""
        params = dict(self.named_parameters(remove_duplicate=False))
        shards: dict[str, set[str | int | None]] = {}
        stream = weights if presharded else self.canonical_tensors(weights)
        for name, tensor in stream:
            target = self.weight_target(name)
            if target is None:
                continue
            param_name, shard = target
            if param_name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {self.arch.architecture}")
            load_weight(params[param_name], tensor, shard, presharded)
            shards.setdefault(param_name, set()).add(shard)
        # A fused parameter counts as loaded only once every part arrived.
        return {name for name, got in shards.items() if self._stacked_parts(name) <= got}

    def _stacked_parts(self, param_name: str) -> set[str | int | None]:
        """The shard ids a fused parameter is loaded from ({None} for an unfused one)."""
        parts = {shard for ours, shard in self.STACKED.values() if ours in param_name}
        return parts or {None}
