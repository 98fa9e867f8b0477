"""The MPT family (MosaicML MPT-7B/30B and fine-tunes): `MptForCausalLM`.

Pre-LayerNorm decoder blocks (LayerNorm without bias, no linear biases: `no_bias=True`),
multi-head attention with ALiBi positions (slopes from `attn_config.alibi_bias_max`), optional
`attn_config.clip_qkv` (clamp of the fused q/k/v activations) and `attn_config.softmax_scale`,
a GELU MLP of `expansion_ratio` × d_model, and lm_head tied to `transformer.wte` (optionally
scaled by `logit_scale`). The checkpoint fuses q, k, v as [q; k; v] in `attn.Wqkv`;
`convert_checkpoint` cuts it into canonical `attn.{q,k,v}_proj` tensors, fused again per rank
(split by heads) in a `QKVParallelLinear`.

Refused with a `CheckpointError`: learned positions instead of ALiBi, rotary, grouped or
multi-query attention, QK LayerNorm, prefix-LM masks, biases and non-LayerNorm norms — none of
them in transformers' MPT either.

In: flat token ids and positions of one step, a `ForwardContext` (paged KV cache) and, after the
first pipeline stage, the previous stage's hidden states.
Out: hidden states [tokens, hidden] (a stage's: models/base.py); `compute_logits` maps the sampled rows
to the vocab.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from shardserve.builder.errors import CheckpointError
from shardserve.comm.base import Communicator, SingleRankCommunicator
from shardserve.models.arch import ArchConfig, _eos
from shardserve.models.base import CausalLM, Stage, stage_input, stage_output
from shardserve.models.layers import (
    ColumnParallelLinear,
    LayerNorm,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    local_heads,
)
from shardserve.workers.attention import ForwardContext

_FUSED_QKV = ".attn.Wqkv."
# Our invented names for the q/k/v parts of `attn.Wqkv`, fused again at load.
STACKED = {
    ".attn.q_proj.": (_FUSED_QKV, "q"),
    ".attn.k_proj.": (_FUSED_QKV, "k"),
    ".attn.v_proj.": (_FUSED_QKV, "v"),
}
_NORMS = ("layernorm", "low_precision_layernorm")


def mpt_alibi_slopes(num_heads: int, bias_max: float) -> torch.Tensor:
    """MPT's ALiBi slopes [heads]: 2^-(i · bias_max / n) for i = 1..n, n = num_heads rounded up to a
    power of two; for other head counts the odd-i slopes come first, then the even-i ones, cut to
    num_heads. (Equal to the BLOOM slopes only when bias_max = 8.)"""
    padded = 2 ** math.ceil(math.log2(num_heads))
    exponents = torch.arange(1, padded + 1, dtype=torch.int64).float() * (bias_max / padded)
    slopes = 1.0 / torch.pow(2, exponents)
    if padded != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def _refuse_unsupported(cfg: dict[str, Any], attn: dict[str, Any]) -> None:
    heads = cfg.get("n_heads")
    refusals = {
        "attn_config.alibi=False (learned positions)": not attn.get("alibi", True),
        "attn_config.rope": bool(attn.get("rope")),
        "attn_config.attn_type other than multihead_attention": attn.get("attn_type", "multihead_attention")
        != "multihead_attention",
        "attn_config.kv_n_heads != n_heads (grouped attention)": attn.get("kv_n_heads") not in (None, heads),
        "attn_config.qk_ln": bool(attn.get("qk_ln")),
        "attn_config.prefix_lm": bool(attn.get("prefix_lm")),
        "no_bias=False (linear and norm biases)": not cfg.get("no_bias", True),
        f"norm_type {cfg.get('norm_type')!r}": cfg.get("norm_type", "low_precision_layernorm") not in _NORMS,
        "ffn_config.ffn_type other than mptmlp": (cfg.get("ffn_config") or {}).get("ffn_type", "mptmlp") != "mptmlp",
    }
    found = [what for what, bad in refusals.items() if bad]
    if found:
        raise CheckpointError(f"MPT checkpoint uses unsupported features: {'; '.join(found)}")


def _logit_scale(cfg: dict[str, Any], hidden: int) -> float | None:
    scale = cfg.get("logit_scale")
    if scale == "inv_sqrt_d_model":
        return hidden**-0.5
    if isinstance(scale, str):
        raise CheckpointError(f"MPT logit_scale {scale!r} is not supported (a number or 'inv_sqrt_d_model')")
    return None if scale is None else float(scale)


def mpt_config(cfg: dict[str, Any]) -> ArchConfig:
    attn = cfg.get("attn_config") or {}
    _refuse_unsupported(cfg, attn)
    try:
        hidden, heads = int(cfg["d_model"]), int(cfg["n_heads"])
        layers, vocab = int(cfg["n_layers"]), int(cfg["vocab_size"])
    except KeyError as exc:
        raise CheckpointError(f"config.json lacks {exc.args[0]!r}") from None
    if hidden % heads:
        raise CheckpointError(f"d_model {hidden} is not divisible by {heads} attention heads")
    head_dim = hidden // heads
    return ArchConfig(
        architecture=(cfg.get("architectures") or ["MptForCausalLM"])[0],
        model_type=cfg.get("model_type", "mpt"),
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(cfg.get("expansion_ratio", 4) * hidden),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=int(cfg.get("max_seq_len") or 2048),
        norm_eps=float(cfg.get("layer_norm_epsilon") or 1e-5),
        rope={},  # ALiBi, no rotary
        hidden_act="gelu",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos(cfg.get("eos_token_id")),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        extra={
            "alibi_bias_max": float(attn.get("alibi_bias_max", 8)),
            "clip_qkv": float(attn["clip_qkv"]) if attn.get("clip_qkv") else None,
            "softmax_scale": float(attn.get("softmax_scale") or head_dim**-0.5),
            "logit_scale": _logit_scale(cfg, hidden),
        },
    )


class MptAttention(nn.Module):
    def __init__(self, arch: ArchConfig, local_layer: int, comm: Communicator, slopes: torch.Tensor):
        super().__init__()
        self.local_layer = local_layer  # index into this rank's KV caches
        self.Wqkv = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_heads, False, comm)
        self.out_proj = RowParallelLinear(arch.hidden_size, arch.hidden_size, False, comm)
        self.heads, self.head_dim = self.Wqkv.num_heads, arch.head_dim
        self.clip: float | None = arch.extra["clip_qkv"]
        self.scale: float = arch.extra["softmax_scale"]
        self.register_buffer("alibi_slopes", slopes, persistent=False)  # [local heads]

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # x: [tokens, hidden]
        qkv = self.Wqkv(x)
        if self.clip is not None:
            qkv = qkv.clamp(min=-self.clip, max=self.clip)
        q, k, v = qkv.view(-1, 3, self.heads, self.head_dim).unbind(1)  # each [tokens, heads, head_dim]
        kv_cache = ctx.kv_caches[self.local_layer]
        out = ctx.backend.forward(q, k, v, kv_cache, ctx.meta, self.scale, None, self.alibi_slopes)
        return self.out_proj(out.reshape(-1, self.heads * self.head_dim))  # [tokens, hidden]


class MptMLP(nn.Module):
    def __init__(self, arch: ArchConfig, comm: Communicator):
        super().__init__()
        self.up_proj = ColumnParallelLinear(arch.hidden_size, [arch.intermediate_size], False, comm)
        self.down_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size, False, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.gelu(self.up_proj(x)))


class MptBlock(nn.Module):
    def __init__(self, arch: ArchConfig, local_layer: int, comm: Communicator, slopes: torch.Tensor):
        super().__init__()
        self.norm_1 = LayerNorm(arch.hidden_size, arch.norm_eps, bias=False)
        self.attn = MptAttention(arch, local_layer, comm, slopes)
        self.norm_2 = LayerNorm(arch.hidden_size, arch.norm_eps, bias=False)
        self.ffn = MptMLP(arch, comm)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # x: [tokens, hidden] (the residual stream)
        x = x + self.attn(self.norm_1(x), ctx)
        return x + self.ffn(self.norm_2(x))


class MptModel(nn.Module):
    def __init__(self, arch: ArchConfig, comm: Communicator, stage: Stage):
        super().__init__()
        self.stage = stage
        if stage.is_first:
            self.wte = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, comm)
        slopes = local_heads(mpt_alibi_slopes(arch.num_heads, arch.extra["alibi_bias_max"]), comm)
        # Global layer indices as ModuleDict keys, so parameter names match the checkpoint's.
        self.blocks = nn.ModuleDict(
            {str(i): MptBlock(arch, i - stage.start, comm, slopes) for i in range(stage.start, stage.end)}
        )
        self.norm_f = LayerNorm(arch.hidden_size, arch.norm_eps, bias=False) if stage.is_last else None

    def forward(self, ids: torch.Tensor, ctx: ForwardContext, hidden: torch.Tensor | None) -> torch.Tensor:
        x = stage_input(self.stage, ids, hidden, lambda: self.wte(ids))  # [tokens, hidden]
        for block in self.blocks.values():
            x = block(x, ctx)
        return stage_output(self.stage, x, None, self.norm_f)


class MptForCausalLM(CausalLM):
    STACKED = STACKED
    FIRST_STAGE_PREFIXES = ("transformer.wte.",)
    LAST_STAGE_PREFIXES = ("transformer.norm_f.", "lm_head.")

    def __init__(
        self,
        arch: ArchConfig,
        comm: Communicator | None = None,
        max_positions: int | None = None,
        stage: Stage | None = None,
    ):
        super().__init__(arch, stage)
        comm = comm or SingleRankCommunicator()
        self.transformer = MptModel(arch, comm, self.stage)  # ALiBi: no position table to size
        self.logit_scale: float | None = arch.extra["logit_scale"]
        if self.stage.is_last:
            self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, comm=comm)
            if arch.tie_word_embeddings and self.stage.is_first:
                self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def config_from_hf(cfg: dict) -> ArchConfig:
        return mpt_config(cfg)

    def tied_head_source(self) -> str | None:
        return "transformer.wte.weight" if self.arch.tie_word_embeddings else None

    def convert_checkpoint(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if ".wpe." in name:
            raise CheckpointError(f"{name}: learned position embeddings are not supported (MPT runs with ALiBi)")
        if _FUSED_QKV not in name:
            yield name, tensor
            return
        # Wqkv: [3 · hidden, hidden] = [q; k; v]
        for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
            yield name.replace(_FUSED_QKV, f".attn.{part}."), piece

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        # ids, positions: [tokens]; hidden: [tokens, hidden] after the first stage -> [tokens, hidden]
        # (ALiBi needs no positions)
        return self.transformer(ids, ctx, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)  # [rows, vocab]
        return logits if self.logit_scale is None else logits * self.logit_scale
