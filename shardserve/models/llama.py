"""The Llama family: Llama 1/2/3 (incl. llama3 rope scaling), Mistral, Qwen2 (qkv bias).

In: flat token ids and positions of one step, a `ForwardContext` (paged KV cache) and, after the
first pipeline stage, the previous stage's hidden states.
Out: hidden states [tokens, hidden] (a stage's: models/base.py); `compute_logits` maps the sampled rows
to the vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from shardserve.comm.base import Communicator, SingleRankCommunicator
from shardserve.models import fused
from shardserve.models.arch import ArchConfig
from shardserve.models.base import CausalLM, Stage, stage_input, stage_output
from shardserve.models.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from shardserve.models.quantization import FP8_MAX, Fp8Input, takes_fp8
from shardserve.models.rotary import RotaryEmbedding
from shardserve.workers.attention import ForwardContext

ACTIVATIONS = {"silu": nn.functional.silu, "gelu": nn.functional.gelu, "relu": nn.functional.relu}

# HF name fragment -> (our fragment, shard id) for weights fused at load time.
STACKED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int, local_layer: int, comm: Communicator, rotary: RotaryEmbedding):
        super().__init__()
        self.layer = layer  # the global index (per-layer settings)
        self.local_layer = local_layer  # index into this rank's KV caches
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, arch.attention_bias, comm
        )
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, arch.o_proj_bias, comm)
        self.rotary = rotary
        self.heads, self.kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, arch.head_dim
        self.scale = arch.head_dim**-0.5
        self.window = arch.sliding_window(layer)

    def forward(self, positions: torch.Tensor, x: torch.Tensor | Fp8Input, ctx: ForwardContext) -> torch.Tensor:
        # x: [tokens, hidden]
        q, k, v = self.qkv_proj.project(x)  # q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]
        q, k = self.rotary(positions, q, k)
        out = ctx.backend.forward(q, k, v, ctx.kv_caches[self.local_layer], ctx.meta, self.scale, self.window)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ArchConfig, comm: Communicator):
        super().__init__()
        inter = arch.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, [inter, inter], arch.mlp_bias, comm)
        self.down_proj = RowParallelLinear(inter, arch.hidden_size, arch.mlp_bias, comm)
        self.act = ACTIVATIONS[arch.hidden_act]

    def forward(self, x: torch.Tensor | Fp8Input) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act is nn.functional.silu and fused.enabled(gate_up):
            if takes_fp8(self.down_proj, gate_up):
                return self.down_proj(Fp8Input(*fused.silu_and_mul_fp8(gate_up, FP8_MAX), gate_up.dtype))
            return self.down_proj(fused.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int, local_layer: int, comm: Communicator, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer, local_layer, comm, rotary)
        self.mlp = LlamaMLP(arch, comm)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fp8 = takes_fp8(self.self_attn.qkv_proj, x)  # the norms quantize for fp8 projections
        if residual is None:
            residual = x
            x = self.input_layernorm(x, fp8=fp8)
        else:
            x, residual = self.input_layernorm(x, residual, fp8=fp8)
        x = self.self_attn(positions, x, ctx)
        x, residual = self.post_attention_layernorm(x, residual, fp8=takes_fp8(self.mlp.gate_up_proj, x))
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ArchConfig, comm: Communicator, max_positions: int, stage: Stage):
        super().__init__()
        self.stage = stage
        if stage.is_first:
            self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, comm)
        rotary = RotaryEmbedding(arch.head_dim, arch.head_dim, max_positions, arch.rope)
        # Global layer indices as ModuleDict keys, so parameter names match the checkpoint's.
        self.layers = nn.ModuleDict(
            {str(i): LlamaDecoderLayer(arch, i, i - stage.start, comm, rotary) for i in range(stage.start, stage.end)}
        )
        self.norm = RMSNorm(arch.hidden_size, arch.norm_eps) if stage.is_last else None

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, hidden: torch.Tensor | None
    ) -> torch.Tensor:
        x = stage_input(self.stage, ids, hidden, lambda: self.embed_tokens(ids))  # [tokens, hidden]
        residual = None
        for layer in self.layers.values():
            x, residual = layer(positions, x, residual, ctx)
        return stage_output(self.stage, x, residual, self.norm)


class LlamaForCausalLM(CausalLM):
    STACKED = STACKED

    def __init__(
        self,
        arch: ArchConfig,
        comm: Communicator | None = None,
        max_positions: int | None = None,
        stage: Stage | None = None,
    ):
        super().__init__(arch, stage)
        comm = comm or SingleRankCommunicator()
        self.model = LlamaModel(arch, comm, max_positions or arch.max_position_embeddings, self.stage)
        if self.stage.is_last:
            self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, comm=comm)
            if arch.tie_word_embeddings and self.stage.is_first:
                self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        # ids, positions: [tokens]; hidden: [tokens, hidden] after the first stage -> [tokens, hidden]
        return self.model(ids, positions, ctx, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [rows, vocab]
