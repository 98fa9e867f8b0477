"""ChatGLM2/3 checkpoints (remote code, not in transformers): a tiny transformers GLM checkpoint is
rewritten in the ChatGLM layout (renamed, q/k/v fused into `query_key_value`, config.json with
ChatGLM's keys); our ChatGLM on it must match transformers' GLM on the original: greedy tokens
identical, logits within 1e-4 relative. Variants: multi-query groups with `kv_channels` ≠ hidden /
heads and `rope_ratio` 2 (transformers' rope_theta 20000), and the per-head multi-head qkv layout."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardserve.builder.errors import CheckpointError
from shardserve.models.registry import parse_arch
from tests.checkpoints import (
    Checkpoints,
    Made,
    Recipe,
    make_model_checkpoint,
)
from tests.models.test_glm import GLM

pytestmark = pytest.mark.timeout(300)

VARIANTS: dict[str, dict[str, Any]] = {
    # GLM-4/ChatGLM3 style: 2 kv groups, head_dim 32 (projection 128 ≠ hidden 64), rope_ratio 2
    "multi_query": dict(GLM, head_dim=32, rope_parameters={"rope_theta": 20000.0, "partial_rotary_factor": 0.5}),
    "multi_head": dict(GLM, num_key_value_heads=4),
}
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.dense.weight",
    "mlp.gate_up_proj.weight": "mlp.dense_h_to_4h.weight",
    "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight",
}


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, multi_query: bool) -> torch.Tensor:
    """ChatGLM's `query_key_value` rows: [q; k; v] (multi-query) or per head [q_h; k_h; v_h]."""
    if multi_query:
        return torch.cat([q, k, v])
    return torch.stack([t.view(heads, -1, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(-1, *q.shape[1:])


def chatglm_tensors(glm: dict[str, torch.Tensor], cfg: dict[str, Any], multi_query: bool) -> dict[str, torch.Tensor]:
    out = {
        "transformer.embedding.word_embeddings.weight": glm["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": glm["model.norm.weight"],
        "transformer.output_layer.weight": glm["lm_head.weight"],
        "transformer.rotary_pos_emb.inv_freq": torch.rand(cfg["head_dim"] // 4),  # the remote code saves it
    }
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        out |= {dst + new: glm[src + old] for old, new in LAYER_RENAMES.items()}
        for kind in ("weight", "bias"):
            q, k, v = (glm[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv")
            heads = cfg["num_attention_heads"]
            out[f"{dst}self_attention.query_key_value.{kind}"] = fuse_qkv(q, k, v, heads, multi_query)
    return {name: t.contiguous() for name, t in out.items()}


def chatglm_config(cfg: dict[str, Any], multi_query: bool) -> dict[str, Any]:
    return {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "num_layers": cfg["num_hidden_layers"],
        "hidden_size": cfg["hidden_size"],
        "ffn_hidden_size": cfg["intermediate_size"],
        "kv_channels": cfg["head_dim"],
        "num_attention_heads": cfg["num_attention_heads"],
        "multi_query_attention": multi_query,
        "multi_query_group_num": cfg["num_key_value_heads"],
        "padded_vocab_size": cfg["vocab_size"],
        "seq_length": cfg["max_position_embeddings"],
        "layernorm_epsilon": cfg["rms_norm_eps"],
        "rmsnorm": True,
        "add_qkv_bias": True,
        "add_bias_linear": False,
        "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False,
        "rope_ratio": cfg["rope_parameters"]["rope_theta"] / 10000.0,
        "original_rope": True,
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"],
        "torch_dtype": "float32",
    }


def convert_to_chatglm(src: Path, dst: Path, multi_query: bool) -> Path:
    """Write the transformers GLM checkpoint `src` in the ChatGLM2/3 layout under `dst` (tokenizer copied)."""
    cfg = json.loads((src / "config.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    save_file(chatglm_tensors(load_file(src / "model.safetensors"), cfg, multi_query), dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(chatglm_config(cfg, multi_query), indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def make_chatglm(root: Path, variant: str) -> Made:
    """(ChatGLM-layout dir, transformers GLM on the original) under `root`."""
    src, hf = make_model_checkpoint(root / "glm", "glm", 3, **VARIANTS[variant])
    return convert_to_chatglm(src, root / "chatglm", variant == "multi_query"), hf


RECIPES: dict[str, Recipe] = {variant: partial(make_chatglm, variant=variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory, "chatglm", RECIPES)


def test_config_chatglm3_6b() -> None:
    """THUDM/chatglm3-6b's config.json keys."""
    cfg = {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "num_layers": 28,
        "padded_vocab_size": 65024,
        "hidden_size": 4096,
        "ffn_hidden_size": 13696,
        "kv_channels": 128,
        "num_attention_heads": 32,
        "seq_length": 8192,
        "layernorm_epsilon": 1e-05,
        "rmsnorm": True,
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "original_rope": True,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float16",
    }
    arch = parse_arch(cfg)
    assert (arch.vocab_size, arch.num_layers, arch.num_kv_heads, arch.head_dim) == (65024, 28, 2, 128)
    assert arch.extra["rotary_dim"] == 64 and arch.rope["rope_theta"] == 10000.0
    assert arch.attention_bias and not arch.o_proj_bias and not arch.mlp_bias
    assert arch.max_position_embeddings == 8192 and arch.intermediate_size == 13696
    assert parse_arch({**cfg, "rope_ratio": 500}).rope["rope_theta"] == 5_000_000.0  # glm-4-9b-chat


def test_unsupported_options_rejected() -> None:
    cfg = {"architectures": ["ChatGLMModel"], "rmsnorm": False}
    with pytest.raises(CheckpointError, match="rmsnorm"):
        parse_arch(cfg)
