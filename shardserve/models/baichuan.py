"""Baichuan (remote code `BaichuanForCausalLM` / `BaiChuanForCausalLM`): Baichuan-7B/13B, Baichuan2-7B/13B.

The Llama decoder (RMSNorm, SwiGLU, multi-head attention, no biases) with q, k, v packed in one
`self_attn.W_pack` ([3 · hidden, hidden], q rows first), which `convert_checkpoint` cuts into the
canonical `q_proj` / `k_proj` / `v_proj` so each is split by heads over tensor-parallel ranks.

Position encoding, `arch.extra["position"]`, from config.json:
- an explicit `"position_embedding": "rope" | "alibi"` wins (our override, not in published configs);
- else `"rope"` when the config has `max_position_embeddings` (Baichuan-7B, Baichuan2-7B, which
  derive from Llama's config), `"alibi"` when it has only `model_max_length` (Baichuan-13B and
  Baichuan2-13B: hidden 5120, 40 layers, 40 heads, ALiBi slopes with the usual interleave for head
  counts that are not powers of two).

NormHead, `arch.extra["norm_head"]`: Baichuan2 divides each `lm_head` row by its L2 norm before use
(the remote code does it once, at the first inference call). We do it at load in `convert_checkpoint`
(rank files written by the builder then hold the normalised rows). Rule: config key `"norm_head"`
if present (our override), else true exactly for the Baichuan2 vocabulary of 125696.

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
from torch import nn

from shardserve.builder.errors import CheckpointError
from shardserve.comm.base import Communicator, SingleRankCommunicator
from shardserve.models.arch import ArchConfig
from shardserve.models.base import Stage
from shardserve.models.layers import alibi_slopes, local_heads
from shardserve.models.llama import LlamaAttention, LlamaForCausalLM
from shardserve.workers.attention import ForwardContext

BAICHUAN2_VOCAB = 125696
POSITIONS = ("rope", "alibi")
W_PACK = ".self_attn.W_pack."


def position_encoding(cfg: dict[str, Any]) -> str:
    """The position encoding, `rope` or `alibi`, of a Baichuan config.json (rule: module docstring)."""
    explicit = cfg.get("position_embedding")
    if explicit is not None:
        if explicit not in POSITIONS:
            raise CheckpointError(f"position_embedding must be one of {POSITIONS}, not {explicit!r}")
        return explicit
    return "rope" if "max_position_embeddings" in cfg else "alibi"


class BaichuanAlibiAttention(LlamaAttention):
    """Llama's attention without rotary: each head adds slope · (key pos − query pos) to its scores."""

    def __init__(self, arch: ArchConfig, layer: int, local_layer: int, comm: Communicator):
        super().__init__(arch, layer, local_layer, comm, rotary=None)  # type: ignore[arg-type]
        # slopes: [local heads], this rank's slice of the model's heads
        self.register_buffer("alibi_slopes", local_heads(alibi_slopes(arch.num_heads), comm), persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # x: [tokens, hidden]
        q, k, v = self.qkv_proj.project(x)  # q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]
        out = ctx.backend.forward(
            q, k, v, ctx.kv_caches[self.local_layer], ctx.meta, self.scale, self.window, self.alibi_slopes
        )
        return self.o_proj(out.flatten(1))


class BaichuanForCausalLM(LlamaForCausalLM):
    """Llama's modules; with ALiBi, every layer's attention is a `BaichuanAlibiAttention`."""

    def __init__(
        self,
        arch: ArchConfig,
        comm: Communicator | None = None,
        max_positions: int | None = None,
        stage: Stage | None = None,
    ):
        comm = comm or SingleRankCommunicator()
        super().__init__(arch, comm, max_positions, stage)
        if arch.extra["position"] == "alibi":
            for layer in self.model.layers.values():
                old = layer.self_attn
                layer.self_attn = BaichuanAlibiAttention(arch, old.layer, old.local_layer, comm)

    @staticmethod
    def config_from_hf(cfg: dict) -> ArchConfig:
        position = position_encoding(cfg)
        max_len = cfg.get("max_position_embeddings") or cfg.get("model_max_length") or 4096
        arch = ArchConfig.from_hf({**cfg, "max_position_embeddings": max_len})
        norm_head = bool(cfg.get("norm_head", arch.vocab_size == BAICHUAN2_VOCAB))
        if position == "alibi":
            arch = replace(arch, rope={})  # no rotary parameters apply
        return replace(
            arch,
            attention_bias=False,
            o_proj_bias=False,
            extra={**arch.extra, "position": position, "norm_head": norm_head},
        )

    def convert_checkpoint(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if W_PACK in name:
            # tensor: [3 · hidden, hidden] = [q; k; v]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                yield name.replace(W_PACK, f".self_attn.{proj}."), part
        elif name == "lm_head.weight" and self.arch.extra["norm_head"]:
            yield name, nn.functional.normalize(tensor.float(), dim=-1).to(tensor.dtype)  # [vocab, hidden]
        else:
            yield name, tensor
