"""Rotary position embeddings with the HF `rope_parameters` scalings.

Two layouts of the rotated pairs inside a head's first `rotary_dim` dims:
- rotate-half (GPT-NeoX / Llama, the default): dim i pairs with dim i + rotary_dim / 2;
- interleaved (GPT-J / GLM / ChatGLM, `interleaved=True`): dims (0, 1), (2, 3), ... are the pairs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from shardserve.models import fused

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(rotary_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """inv_freq [rotary_dim / 2] for `params` = {"rope_type", "rope_theta", scaling keys...}."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = float(params.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        return _llama3(inv_freq, params)
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to the first `rotary_dim` dims of each q/k head (the rest pass through)."""

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_positions: int,
        params: dict[str, Any],
        interleaved: bool = False,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        inv_freq = inverse_frequencies(rotary_dim, params)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        # [positions, rotary_dim]: pair j's angle at dims (2j, 2j+1) or (j, j + rotary_dim / 2)
        emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [tokens]; q: [tokens, heads, head_dim]; k: [tokens, kv_heads, head_dim]
        if not self.interleaved and self.rotary_dim == self.head_dim and fused.enabled(q):
            fused.rotary_(positions, q, k, self.cos, self.sin)  # in place: q, k are this step's own
            return q, k
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        turn = _rotate_pairs if self.interleaved else _rotate_half
        if self.rotary_dim == self.head_dim:
            return x * cos + turn(x) * sin
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((rot * cos + turn(rot) * sin, rest), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
