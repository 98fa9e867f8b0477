"""ChatGLM2 / ChatGLM3 / GLM-4 remote-code checkpoints (`ChatGLMModel`, `ChatGLMForConditionalGeneration`).

The same decoder as transformers' GLM (glm.py): RMSNorm, SwiGLU, multi-query-group attention with
q/k/v bias, rotary on the first half of each head (`kv_channels`) in interleaved pairs, with base
10000 · `rope_ratio`. Only the checkpoint layout differs; `convert_checkpoint` renames it onto GLM's
canonical (Llama) names and cuts the fused tensors:

    transformer.embedding.word_embeddings          → model.embed_tokens
    transformer.encoder.layers.{i}.input_layernorm → model.layers.{i}.input_layernorm
    ….self_attention.query_key_value               → ….self_attn.{q,k,v}_proj   (cut)
    ….self_attention.dense                         → ….self_attn.o_proj
    ….post_attention_layernorm                     → ….post_attention_layernorm
    ….mlp.dense_h_to_4h  ([gate; up])              → ….mlp.{gate,up}_proj        (cut)
    ….mlp.dense_4h_to_h                            → ….mlp.down_proj
    transformer.encoder.final_layernorm            → model.norm
    transformer.output_layer                       → lm_head
    transformer.rotary_pos_emb.inv_freq            → dropped (recomputed)

`query_key_value` is [q (heads · kv_channels); k (groups · kv_channels); v (same)] with
`multi_query_attention`, else per head [q_h; k_h; v_h] (original multi-head layout).
`original_rope` only picks an implementation of the same math in the remote code; it is ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from shardserve.builder.errors import CheckpointError
from shardserve.models.arch import ArchConfig
from shardserve.models.glm import GlmForCausalLM, split_fused_gate_up

RENAMES = (
    ("transformer.embedding.word_embeddings.", "model.embed_tokens."),
    ("transformer.encoder.final_layernorm.", "model.norm."),
    ("transformer.output_layer.", "lm_head."),
    ("transformer.encoder.layers.", "model.layers."),
    (".self_attention.dense.", ".self_attn.o_proj."),
    (".mlp.dense_4h_to_h.", ".mlp.down_proj."),
)
QKV = ".self_attention.query_key_value."
GATE_UP = ".mlp.dense_h_to_4h."
# Remote-code options whose non-default value changes the math; none of the published checkpoints sets them.
UNSUPPORTED = {"rmsnorm": True, "post_layer_norm": True, "apply_residual_connection_post_layernorm": False}


def _require(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg:
        raise CheckpointError(f"config.json lacks {key!r}")
    return cfg[key]


def _as_glm_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """ChatGLM config keys → the HF (GLM) keys `ArchConfig.from_hf` reads."""
    heads = int(_require(cfg, "num_attention_heads"))
    hidden = int(_require(cfg, "hidden_size"))
    groups = int(cfg.get("multi_query_group_num", heads)) if cfg.get("multi_query_attention", False) else heads
    return {
        "architectures": cfg.get("architectures"),
        "model_type": cfg.get("model_type", "chatglm"),
        "vocab_size": _require(cfg, "padded_vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": _require(cfg, "ffn_hidden_size"),
        "num_hidden_layers": _require(cfg, "num_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": cfg.get("kv_channels") or hidden // heads,
        "max_position_embeddings": cfg.get("seq_length", 2048),
        "rms_norm_eps": cfg.get("layernorm_epsilon", 1e-5),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0 * float(cfg.get("rope_ratio", 1.0))},
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "torch_dtype": cfg.get("torch_dtype"),
    }


class ChatGLMForCausalLM(GlmForCausalLM):
    """GLM's modules (half-head interleaved rotary) under the ChatGLM checkpoint layout."""

    @staticmethod
    def config_from_hf(cfg: dict) -> ArchConfig:
        for key, default in UNSUPPORTED.items():
            if bool(cfg.get(key, default)) != default:
                raise CheckpointError(f"ChatGLM with {key}={cfg[key]!r} is not supported (only {default!r})")
        arch = ArchConfig.from_hf(_as_glm_config(cfg))
        linear_bias = bool(cfg.get("add_bias_linear", False))
        return replace(
            arch,
            attention_bias=bool(cfg.get("add_qkv_bias", False)),
            o_proj_bias=linear_bias,
            mlp_bias=linear_bias,
            extra={
                **arch.extra,
                "rotary_dim": arch.head_dim // 2,
                "multi_query_attention": bool(cfg.get("multi_query_attention", False)),
            },
        )

    def convert_checkpoint(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name.endswith("rotary_pos_emb.inv_freq"):
            return
        for old, new in RENAMES:
            name = name.replace(old, new)
        if QKV in name:
            yield from self._split_qkv(name, tensor)
        elif GATE_UP in name:
            yield from split_fused_gate_up(name, tensor, GATE_UP)
        else:
            yield name, tensor

    def _split_qkv(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        # tensor: [(heads + 2 · kv_heads) · head_dim, hidden] (or the bias, without hidden)
        arch = self.arch
        d, rest = arch.head_dim, tensor.shape[1:]
        if arch.extra["multi_query_attention"]:
            sizes = [arch.num_heads * d, arch.num_kv_heads * d, arch.num_kv_heads * d]
            parts = tensor.split(sizes, dim=0)
        else:  # per head [q_h; k_h; v_h]
            per_head = tensor.view(arch.num_heads, 3, d, *rest)
            parts = tuple(per_head[:, i].reshape(arch.num_heads * d, *rest) for i in range(3))
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
            yield name.replace(QKV, f".self_attn.{proj}."), part
