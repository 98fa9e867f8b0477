"""The Falcon family (tiiuae Falcon-7B/40B/180B/11B, Falcon-RW): `FalconForCausalLM`.

LayerNorm (with bias) decoder blocks whose attention and GELU MLP either run in parallel on the
same input (`parallel_attn`, always with `new_decoder_architecture`) — one shared `input_layernorm`
or separate `ln_attn` / `ln_mlp` (`num_ln_in_parallel_attn=2`) — or one after the other
(`input_layernorm`, `post_attention_layernorm`). Attention is multi-head, multi-query
(`multi_query`: one kv head) or grouped (`new_decoder_architecture`: `num_kv_heads` groups), with
rotary positions or ALiBi (`alibi`). Linear biases follow `bias`; lm_head is tied to
`transformer.word_embeddings` unless `tie_word_embeddings=False`.

The checkpoint fuses q, k and v in `self_attention.query_key_value`, laid out per kv group as
[q heads of the group..., k, v] × head_dim (multi-head: one q per group; multi-query: one group).
`convert_checkpoint` cuts it into canonical `self_attention.{q,k,v}_proj` tensors, fused again
per rank (split by heads) in a `QKVParallelLinear`.

In: flat token ids and positions of one step, a `ForwardContext` (paged KV cache) and, after the
first pipeline stage, the previous stage's hidden states.
Out: hidden states [tokens, hidden] (a stage's: models/base.py); `compute_logits` maps the sampled rows
to the vocab.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from shardserve.builder.errors import CheckpointError
from shardserve.comm.base import Communicator, SingleRankCommunicator
from shardserve.models.arch import ArchConfig, _eos, _rope
from shardserve.models.base import CausalLM, Stage, stage_input, stage_output
from shardserve.models.layers import (
    ColumnParallelLinear,
    LayerNorm,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    alibi_slopes,
    local_heads,
)
from shardserve.models.llama import ACTIVATIONS
from shardserve.models.rotary import RotaryEmbedding
from shardserve.workers.attention import ForwardContext

_FUSED_QKV = ".self_attention.query_key_value."
# Our invented names for the q/k/v parts of the fused projection, fused again at load.
STACKED = {
    ".self_attention.q_proj.": (_FUSED_QKV, "q"),
    ".self_attention.k_proj.": (_FUSED_QKV, "k"),
    ".self_attention.v_proj.": (_FUSED_QKV, "v"),
}


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of `keys` set in `cfg` (old RefinedWeb configs say n_head, n_layer, n_embed...)."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if default is None:
        raise CheckpointError(f"config.json lacks {keys[0]!r}")
    return default


def _kv_heads(cfg: dict[str, Any], heads: int) -> int:
    """kv heads: `num_kv_heads` groups (new architecture), one (multi-query) or one per head."""
    if cfg.get("new_decoder_architecture"):
        return int(_first(cfg, "num_kv_heads", "n_head_kv", default=heads))
    return 1 if cfg.get("multi_query", True) else heads


def falcon_config(cfg: dict[str, Any]) -> ArchConfig:
    hidden = int(_first(cfg, "hidden_size", "n_embed"))
    heads = int(_first(cfg, "num_attention_heads", "n_head"))
    if hidden % heads:
        raise CheckpointError(f"hidden size {hidden} is not divisible by {heads} attention heads")
    act = cfg.get("activation") or "gelu"
    if act not in ACTIVATIONS:
        raise CheckpointError(f"Falcon activation {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    new_arch = bool(cfg.get("new_decoder_architecture", False))
    parallel = new_arch or bool(cfg.get("parallel_attn", True))
    num_ln = int(cfg.get("num_ln_in_parallel_attn") or (2 if new_arch else 1))
    bias = bool(cfg.get("bias", False))
    return ArchConfig(
        architecture=(cfg.get("architectures") or ["FalconForCausalLM"])[0],
        model_type=cfg.get("model_type", "falcon"),
        vocab_size=int(_first(cfg, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(cfg.get("ffn_hidden_size") or 4 * hidden),
        num_layers=int(_first(cfg, "num_hidden_layers", "n_layer")),
        num_heads=heads,
        num_kv_heads=_kv_heads(cfg, heads),
        head_dim=hidden // heads,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        norm_eps=float(cfg.get("layer_norm_epsilon") or 1e-5),
        rope=_rope(cfg),
        hidden_act=act,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=bias,
        o_proj_bias=bias,
        mlp_bias=bias,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos(cfg.get("eos_token_id")),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        extra={"parallel_attn": parallel, "two_layernorms": parallel and num_ln == 2, "alibi": bool(cfg.get("alibi"))},
    )


def falcon_alibi_slopes(arch: ArchConfig, comm: Communicator) -> torch.Tensor:
    """This rank's ALiBi slopes [local heads], as transformers' Falcon applies them: the BLOOM
    slopes rounded to bfloat16, and (unlike BLOOM) also scaled by 1/sqrt(head_dim). transformers
    also rounds slope × key position to bfloat16; that is exact (powers of two times small
    integers) below 16 heads, and a rounding difference from our float32 bias above."""
    slopes = alibi_slopes(arch.num_heads).to(torch.bfloat16).float() * arch.head_dim**-0.5
    return local_heads(slopes, comm)


class FalconAttention(nn.Module):
    def __init__(
        self,
        arch: ArchConfig,
        local_layer: int,
        comm: Communicator,
        rotary: RotaryEmbedding | None,
        slopes: torch.Tensor | None,
    ):
        super().__init__()
        self.local_layer = local_layer  # index into this rank's KV caches
        bias = arch.attention_bias
        self.query_key_value = QKVParallelLinear(
            arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, bias, comm
        )
        self.dense = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, bias, comm)
        self.heads, self.kv_heads = self.query_key_value.num_heads, self.query_key_value.num_kv_heads
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim**-0.5
        self.rotary = rotary
        self.register_buffer("alibi_slopes", slopes, persistent=False)  # [local heads] with ALiBi, else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # x: [tokens, hidden]
        q, k, v = self.query_key_value.project(x)  # q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        kv_cache = ctx.kv_caches[self.local_layer]
        out = ctx.backend.forward(q, k, v, kv_cache, ctx.meta, self.scale, None, self.alibi_slopes)
        return self.dense(out.flatten(1))  # [tokens, hidden]


class FalconMLP(nn.Module):
    def __init__(self, arch: ArchConfig, comm: Communicator):
        super().__init__()
        inter = arch.intermediate_size
        self.dense_h_to_4h = ColumnParallelLinear(arch.hidden_size, [inter], arch.mlp_bias, comm)
        self.dense_4h_to_h = RowParallelLinear(inter, arch.hidden_size, arch.mlp_bias, comm)
        self.act = ACTIVATIONS[arch.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, attention: FalconAttention, comm: Communicator):
        super().__init__()
        self.self_attention = attention
        self.mlp = FalconMLP(arch, comm)
        self.parallel = bool(arch.extra["parallel_attn"])
        self.two_layernorms = bool(arch.extra["two_layernorms"])
        size, eps = arch.hidden_size, arch.norm_eps
        if self.two_layernorms:
            self.ln_attn, self.ln_mlp = LayerNorm(size, eps), LayerNorm(size, eps)
        else:
            self.input_layernorm = LayerNorm(size, eps)
        if not self.parallel:
            self.post_attention_layernorm = LayerNorm(size, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # x: [tokens, hidden] (the residual stream)
        if not self.parallel:
            x = x + self.self_attention(positions, self.input_layernorm(x), ctx)
            return x + self.mlp(self.post_attention_layernorm(x))
        if self.two_layernorms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        return x + self.self_attention(positions, attn_in, ctx) + self.mlp(mlp_in)


class FalconModel(nn.Module):
    def __init__(self, arch: ArchConfig, comm: Communicator, max_positions: int, stage: Stage):
        super().__init__()
        self.stage = stage
        if stage.is_first:
            self.word_embeddings = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, comm)
        rotary, slopes = None, None
        if arch.extra["alibi"]:
            slopes = falcon_alibi_slopes(arch, comm)
        else:
            rotary = RotaryEmbedding(arch.head_dim, arch.head_dim, max_positions, arch.rope)

        def layer(i: int) -> FalconDecoderLayer:
            return FalconDecoderLayer(arch, FalconAttention(arch, i - stage.start, comm, rotary, slopes), comm)

        # Global layer indices as ModuleDict keys, so parameter names match the checkpoint's.
        self.h = nn.ModuleDict({str(i): layer(i) for i in range(stage.start, stage.end)})
        self.ln_f = LayerNorm(arch.hidden_size, arch.norm_eps) if stage.is_last else None

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, hidden: torch.Tensor | None
    ) -> torch.Tensor:
        x = stage_input(self.stage, ids, hidden, lambda: self.word_embeddings(ids))  # [tokens, hidden]
        for layer in self.h.values():
            x = layer(positions, x, ctx)
        return stage_output(self.stage, x, None, self.ln_f)


class FalconForCausalLM(CausalLM):
    STACKED = STACKED
    FIRST_STAGE_PREFIXES = ("transformer.word_embeddings.",)
    LAST_STAGE_PREFIXES = ("transformer.ln_f.", "lm_head.")

    def __init__(
        self,
        arch: ArchConfig,
        comm: Communicator | None = None,
        max_positions: int | None = None,
        stage: Stage | None = None,
    ):
        super().__init__(arch, stage)
        comm = comm or SingleRankCommunicator()
        self.transformer = FalconModel(arch, comm, max_positions or arch.max_position_embeddings, self.stage)
        if self.stage.is_last:
            self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, comm=comm)
            if arch.tie_word_embeddings and self.stage.is_first:
                self.lm_head.weight = self.transformer.word_embeddings.weight

    @staticmethod
    def config_from_hf(cfg: dict) -> ArchConfig:
        return falcon_config(cfg)

    def tied_head_source(self) -> str | None:
        return "transformer.word_embeddings.weight" if self.arch.tie_word_embeddings else None

    def convert_checkpoint(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if _FUSED_QKV not in name:
            yield name, tensor
            return
        for part, piece in zip(("q_proj", "k_proj", "v_proj"), self.split_qkv(tensor), strict=True):
            yield name.replace(_FUSED_QKV, f".self_attention.{part}."), piece

    def split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused [(kv groups · (q per group + 2)) · head_dim, (hidden)] → q, k, v (shape ops only)."""
        heads, kv, dim = self.arch.num_heads, self.arch.num_kv_heads, self.arch.head_dim
        rest = fused.shape[1:]  # (hidden,) for a weight, () for a bias
        groups = fused.view(kv, heads // kv + 2, dim, *rest)  # [kv, q per group + k + v, head_dim, (hidden)]
        q = groups[:, :-2].reshape(heads * dim, *rest)
        k = groups[:, -2].reshape(kv * dim, *rest)
        v = groups[:, -1].reshape(kv * dim, *rest)
        return q, k, v

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        # ids, positions: [tokens]; hidden: [tokens, hidden] after the first stage -> [tokens, hidden]
        return self.transformer(ids, positions, ctx, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [rows, vocab]
