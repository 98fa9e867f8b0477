"""GLM (transformers `glm`, `GlmForCausalLM`: the GLM-4 "-hf" checkpoints).

The Llama decoder (RMSNorm, SwiGLU, grouped-query attention with q/k/v bias, no o_proj bias) with
rotary embeddings on the first `partial_rotary_factor` (0.5) of each head, rotated in GPT-J's
interleaved pairs (0, 1), (2, 3), ... The checkpoint fuses the MLP's gate and up projections in
`mlp.gate_up_proj` ([2 * intermediate, hidden], gate rows first); `convert_checkpoint` cuts it into
canonical `mlp.gate_proj` / `mlp.up_proj` so each part is split over tensor-parallel ranks on its own.

In: flat token ids and positions of one step, a `ForwardContext` (paged KV cache) and, after the
first pipeline stage, the previous stage's hidden states.
Out: hidden states [tokens, hidden] (a stage's: models/base.py); `compute_logits` maps the sampled rows
to the vocab.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from shardserve.comm.base import Communicator
from shardserve.models.arch import ArchConfig
from shardserve.models.base import Stage
from shardserve.models.llama import LlamaForCausalLM
from shardserve.models.rotary import RotaryEmbedding

DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5  # GlmConfig's default when the config names none


def partial_rotary_dim(head_dim: int, cfg: dict[str, Any]) -> int:
    """Rotated dims per head: `partial_rotary_factor` from `rope_parameters` (transformers >= 5)
    or the top level (older configs), else GLM's 0.5."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY_FACTOR))
    return int(head_dim * float(factor))


def split_fused_gate_up(name: str, tensor: torch.Tensor, fused: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A fused [gate; up] tensor named `...{fused}...` → canonical `.mlp.gate_proj.` and `.mlp.up_proj.` halves."""
    gate, up = tensor.chunk(2, dim=0)  # each [intermediate, ...]
    yield name.replace(fused, ".mlp.gate_proj."), gate
    yield name.replace(fused, ".mlp.up_proj."), up


class GlmForCausalLM(LlamaForCausalLM):
    """Llama's modules with GLM's rotary: partial (`arch.extra["rotary_dim"]`) and interleaved."""

    def __init__(
        self,
        arch: ArchConfig,
        comm: Communicator | None = None,
        max_positions: int | None = None,
        stage: Stage | None = None,
    ):
        super().__init__(arch, comm, max_positions, stage)
        rotary = RotaryEmbedding(
            arch.head_dim,
            arch.extra["rotary_dim"],
            max_positions or arch.max_position_embeddings,
            arch.rope,
            interleaved=True,
        )
        for layer in self.model.layers.values():  # one shared table, replacing Llama's full rotate-half one
            layer.self_attn.rotary = rotary

    @staticmethod
    def config_from_hf(cfg: dict) -> ArchConfig:
        arch = ArchConfig.from_hf(cfg)
        return replace(
            arch,
            attention_bias=bool(cfg.get("attention_bias", True)),  # q/k/v only: GLM's o_proj has no bias
            o_proj_bias=False,
            extra={**arch.extra, "rotary_dim": partial_rotary_dim(arch.head_dim, cfg)},
        )

    def convert_checkpoint(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if ".mlp.gate_up_proj." in name:
            yield from split_fused_gate_up(name, tensor, ".mlp.gate_up_proj.")
        else:
            yield name, tensor
