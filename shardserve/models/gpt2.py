"""The GPT-2 family (OpenAI GPT-2, DistilGPT-2 and other `GPT2LMHeadModel` checkpoints).

Pre-LayerNorm decoder blocks (LayerNorm with bias), learned absolute position embeddings
(`transformer.wpe`) added to the token embeddings, multi-head attention scaled by 1/sqrt(head_dim)
(optionally also by 1/(layer + 1)), a gelu_new (tanh) MLP, and the lm_head tied to `transformer.wte`.
The checkpoint stores Conv1D weights as [in, out] with q, k, v fused in `attn.c_attn`;
`convert_checkpoint` transposes them and cuts `c_attn` into canonical `attn.{q,k,v}_proj` tensors,
fused again per rank in a `QKVParallelLinear`. GPT-BigCode (gpt_bigcode.py) reuses these modules.

In: flat token ids and positions of one step, a `ForwardContext` (paged KV cache) and, after the
first pipeline stage, the previous stage's hidden states.
Out: hidden states [tokens, hidden] (a stage's: models/base.py); `compute_logits` maps the sampled rows
to the vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import nn

from shardserve.builder.errors import CheckpointError
from shardserve.comm.base import Communicator, SingleRankCommunicator
from shardserve.models.arch import ArchConfig
from shardserve.models.base import CausalLM, Stage, layer_index, stage_input, stage_output
from shardserve.models.layers import (
    ColumnParallelLinear,
    LayerNorm,
    ParallelLMHead,
    QKVParallelLinear,
    ReplicatedEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from shardserve.workers.attention import ForwardContext

_gelu_tanh = partial(nn.functional.gelu, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# transformers' `activation_function` names; gelu_new / gelu_fast are the same tanh formula.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": nn.functional.gelu,
    "relu": nn.functional.relu,
    "silu": nn.functional.silu,
    "swish": nn.functional.silu,
    "quick_gelu": _quick_gelu,
}

# Config switches whose `True` changes the model in ways this file does not implement.
UNSUPPORTED = {"add_cross_attention": "cross-attention (encoder-decoder use)"}

# Our invented names for the q/k/v parts of `attn.c_attn`, fused again at load.
STACKED = {
    ".attn.q_proj.": (".attn.c_attn.", "q"),
    ".attn.k_proj.": (".attn.c_attn.", "k"),
    ".attn.v_proj.": (".attn.c_attn.", "v"),
}
# Causal-mask buffers that old GPT-2 checkpoints saved next to the weights.
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    """The value of the first of `keys` present (GPT-2 configs use n_embd, n_head, ... aliases)."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise CheckpointError(f"config.json lacks {keys[0]!r}")


def _activation(cfg: dict[str, Any], default: str) -> str:
    """The MLP activation, after refusing config switches this file does not implement."""
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise CheckpointError(f"{key}=True ({what}) is not supported for {cfg.get('model_type')!r}")
    act = cfg.get("activation_function") or default
    if act not in ACTIVATIONS:
        raise CheckpointError(f"activation_function {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return act


def gpt2_config(cfg: dict[str, Any], default_act: str, num_kv_heads: int | None = None) -> ArchConfig:
    """ArchConfig of a GPT-2-shaped config.json (also GPT-BigCode's, with its kv heads and activation):
    its n_* keys renamed to the standard ones for `ArchConfig.from_hf`, then the GPT-2 specifics."""
    hidden = int(_first(cfg, "n_embd", "hidden_size"))
    heads = int(_first(cfg, "n_head", "num_attention_heads"))
    if hidden % heads:
        raise CheckpointError(f"hidden size {hidden} is not divisible by {heads} attention heads")
    standard = {
        **cfg,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": num_kv_heads or heads,
        "head_dim": hidden // heads,
        "num_hidden_layers": int(_first(cfg, "n_layer", "num_hidden_layers")),
        "intermediate_size": int(cfg.get("n_inner") or 4 * hidden),
        "max_position_embeddings": int(_first(cfg, "n_positions", "max_position_embeddings")),
        "rms_norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5)),  # LayerNorm eps here
        "hidden_act": _activation(cfg, default_act),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "attention_bias": True,  # c_attn and c_proj
        "mlp_bias": True,
    }
    extra = {
        "scale_attn_weights": bool(cfg.get("scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx": bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
    }
    # Learned absolute positions: no rotary, no sliding window.
    return replace(ArchConfig.from_hf(standard), rope={}, sliding_windows=(), extra=extra)


def attention_scale(arch: ArchConfig, layer: int) -> float:
    """1/sqrt(head_dim) (unless scale_attn_weights=False), over (layer + 1) when scaled by layer."""
    scale = arch.head_dim**-0.5 if arch.extra.get("scale_attn_weights", True) else 1.0
    if arch.extra.get("scale_attn_by_inverse_layer_idx", False):
        scale /= layer + 1
    return scale


class GPT2Attention(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int, local_layer: int, comm: Communicator):
        super().__init__()
        self.local_layer = local_layer  # index into this rank's KV caches
        self.c_attn = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, True, comm)
        self.c_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, True, comm)
        self.heads, self.kv_heads, self.head_dim = self.c_attn.num_heads, self.c_attn.num_kv_heads, arch.head_dim
        self.scale = attention_scale(arch, layer)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # x: [tokens, hidden]
        q, k, v = self.c_attn.project(x)  # q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]
        out = ctx.backend.forward(q, k, v, ctx.kv_caches[self.local_layer], ctx.meta, self.scale)
        return self.c_proj(out.flatten(1))  # [tokens, hidden]


class GPT2MLP(nn.Module):
    def __init__(self, arch: ArchConfig, comm: Communicator):
        super().__init__()
        self.c_fc = ColumnParallelLinear(arch.hidden_size, [arch.intermediate_size], True, comm)
        self.c_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size, True, comm)
        self.act = ACTIVATIONS[arch.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(·)); the residual add is fused into the next LayerNorm."""

    def __init__(self, arch: ArchConfig, layer: int, local_layer: int, comm: Communicator):
        super().__init__()
        self.ln_1 = LayerNorm(arch.hidden_size, arch.norm_eps)
        self.attn = GPT2Attention(arch, layer, local_layer, comm)
        self.ln_2 = LayerNorm(arch.hidden_size, arch.norm_eps)
        self.mlp = GPT2MLP(arch, comm)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.ln_1(x)
        else:
            x, residual = self.ln_1(x, residual)
        x = self.attn(x, ctx)
        x, residual = self.ln_2(x, residual)
        return self.mlp(x), residual


class GPT2Model(nn.Module):
    def __init__(self, arch: ArchConfig, comm: Communicator, stage: Stage):
        super().__init__()
        self.stage = stage
        if stage.is_first:
            self.wte = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, comm)
            self.wpe = ReplicatedEmbedding(arch.max_position_embeddings, arch.hidden_size)
        # Global layer indices as ModuleDict keys, so parameter names match the checkpoint's.
        self.h = nn.ModuleDict(
            {str(i): GPT2Block(arch, i, i - stage.start, comm) for i in range(stage.start, stage.end)}
        )
        self.ln_f = LayerNorm(arch.hidden_size, arch.norm_eps) if stage.is_last else None

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, hidden: torch.Tensor | None
    ) -> torch.Tensor:
        x = stage_input(self.stage, ids, hidden, lambda: self.wte(ids) + self.wpe(positions))  # [tokens, hidden]
        residual = None
        for block in self.h.values():
            x, residual = block(x, residual, ctx)
        return stage_output(self.stage, x, residual, self.ln_f)


class GPT2LMHeadModel(CausalLM):
    STACKED = STACKED
    FIRST_STAGE_PREFIXES = ("transformer.wte.", "transformer.wpe.")
    LAST_STAGE_PREFIXES = ("transformer.ln_f.", "lm_head.")
    # Conv1D keeps weights as [in, out]; nn.Linear (GPT-BigCode) as [out, in].
    TRANSPOSED_WEIGHTS = True

    def __init__(
        self,
        arch: ArchConfig,
        comm: Communicator | None = None,
        max_positions: int | None = None,  # unused: the position table is the checkpoint's (n_positions)
        stage: Stage | None = None,
    ):
        super().__init__(arch, stage)
        comm = comm or SingleRankCommunicator()
        self.transformer = GPT2Model(arch, comm, self.stage)
        if self.stage.is_last:
            self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, comm=comm)
            if arch.tie_word_embeddings and self.stage.is_first:
                self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def config_from_hf(cfg: dict) -> ArchConfig:
        # reorder_and_upcast_attn only reorders/upcasts the eager score computation: same math in fp32.
        return gpt2_config(cfg, default_act="gelu_new")

    def tied_head_source(self) -> str | None:
        return "transformer.wte.weight" if self.arch.tie_word_embeddings else None

    def split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v of a `c_attn` weight [3 * hidden, in] or bias [3 * hidden], outputs first."""
        return fused.split(self.arch.hidden_size, dim=0)

    def convert_checkpoint(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name.endswith(_BUFFERS):
            return
        if not name.startswith(("transformer.", "lm_head.")):
            name = f"transformer.{name}"  # the original OpenAI checkpoints have no prefix
        if self.TRANSPOSED_WEIGHTS and tensor.dim() == 2 and layer_index(name) is not None:
            tensor = tensor.t()  # Conv1D [in, out] -> [out, in]
        if ".attn.c_attn." not in name:
            yield name, tensor.contiguous()
            return
        for part, piece in zip(("q_proj", "k_proj", "v_proj"), self.split_qkv(tensor), strict=True):
            yield name.replace(".c_attn.", f".{part}."), piece.contiguous()

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        # ids, positions: [tokens]; hidden: [tokens, hidden] after the first stage -> [tokens, hidden]
        return self.transformer(ids, positions, ctx, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [rows, vocab]
