"""Architecture name (config.json `architectures[0]`) → model class."""

from __future__ import annotations

from torch import nn

from shardserve.builder.errors import CheckpointError
from shardserve.models.arch import ArchConfig
from shardserve.models.llama import LlamaForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class(arch: ArchConfig) -> type[nn.Module]:
    cls = ARCHITECTURES.get(arch.architecture)
    if cls is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise CheckpointError(f"unsupported architecture {arch.architecture!r}; supported: {supported}")
    return cls
