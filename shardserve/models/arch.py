"""Model hyper-parameters, normalised from a Hugging Face `config.json` dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardserve.builder.errors import CheckpointError


@dataclass(frozen=True, slots=True)
class ArchConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k, v (and o for Llama) projections
    o_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer; empty = none
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific settings

    def sliding_window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ArchConfig:
        arch = (cfg.get("architectures") or [""])[0]
        model_type = cfg.get("model_type", "")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            layers = int(cfg["num_hidden_layers"])
            return cls(
                architecture=arch,
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope=_rope(cfg),
                hidden_act=cfg.get("hidden_act", "silu"),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                o_proj_bias=bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_windows=_sliding_windows(cfg, layers),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=_eos(cfg.get("eos_token_id")),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks {exc.args[0]!r}") from None


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", float(cfg.get("rope_theta", 10000.0)))
    return params


def _sliding_windows(cfg: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if not window:
        return ()
    types = cfg.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    if cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window", False):
        return ()
    return (int(window),) * layers


def _eos(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)
