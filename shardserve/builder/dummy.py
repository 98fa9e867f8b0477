"""Random checkpoints for `model.load_format: dummy`: the tensors a checkpoint of a config.json
would hold, made on the device from one seed per tensor name (no weight file is read).

Every rank makes each full tensor and keeps its own cut through the model's loader, exactly as
it would from a real checkpoint, so every tp × pp layout computes the same model as a world of one:
what the multi-GPU benchmarks compare. The names and shapes come from the transformers model class
of the config, built on the meta device (no memory); a family transformers does not hold (the
remote-code ChatGLM and Baichuan) gives None, and the caller fills parameters directly instead.
Values: N(0, std²) for matrices, 1 for one-dimensional weights (norms), 0 for biases.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import torch

STD = 0.02


def checkpoint_specs(hf_config: dict[str, Any]) -> list[tuple[str, torch.Size]] | None:
    """(name, shape) of every tensor a transformers checkpoint of `hf_config` holds, or None."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**hf_config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, ImportError):  # an architecture transformers does not know
        return None
    return [(name, tensor.shape) for name, tensor in model.state_dict().items()]


def random_tensors(
    specs: list[tuple[str, torch.Size]], device: torch.device, dtype: torch.dtype, std: float = STD
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `specs`, one at a time, each from the generator seeded by its own name."""
    for name, shape in specs:
        if name.endswith("bias"):
            yield name, torch.zeros(shape, dtype=dtype, device=device)
        elif len(shape) == 1:
            yield name, torch.ones(shape, dtype=dtype, device=device)
        else:
            gen = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
            yield name, torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
