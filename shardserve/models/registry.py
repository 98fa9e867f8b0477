"""Architecture name (config.json `architectures[0]`) → model class, imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

from shardserve.builder.errors import CheckpointError
from shardserve.models.arch import ArchConfig
from shardserve.models.base import CausalLM

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama:LlamaForCausalLM",
    "MistralForCausalLM": "llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "llama:LlamaForCausalLM",
    "GPT2LMHeadModel": "gpt2:GPT2LMHeadModel",
    "GPTBigCodeForCausalLM": "gpt_bigcode:GPTBigCodeForCausalLM",
    "FalconForCausalLM": "falcon:FalconForCausalLM",
    "MptForCausalLM": "mpt:MptForCausalLM",
    "MPTForCausalLM": "mpt:MptForCausalLM",
    "GlmForCausalLM": "glm:GlmForCausalLM",
    "ChatGLMModel": "chatglm:ChatGLMForCausalLM",
    "ChatGLMForConditionalGeneration": "chatglm:ChatGLMForCausalLM",
    "BaichuanForCausalLM": "baichuan:BaichuanForCausalLM",
    "BaiChuanForCausalLM": "baichuan:BaichuanForCausalLM",
}


def _lookup(name: str) -> type[CausalLM]:
    target = ARCHITECTURES.get(name)
    if target is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise CheckpointError(f"unsupported architecture {name!r}; supported: {supported}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"shardserve.models.{module}"), cls)


def parse_arch(cfg: dict[str, Any]) -> ArchConfig:
    """Normalise a config.json dict with its family's parser (unsupported names fail here)."""
    name = (cfg.get("architectures") or [""])[0]
    return _lookup(name).config_from_hf(cfg)


def model_class(arch: ArchConfig) -> type[CausalLM]:
    return _lookup(arch.architecture)
