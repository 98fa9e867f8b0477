"""Baichuan (remote code, not in transformers).

- Rope variant (Baichuan-7B / Baichuan2-7B): a tiny transformers Llama checkpoint rewritten in the
  Baichuan layout (q/k/v packed in `W_pack`, Baichuan config.json); our Baichuan must match
  transformers' Llama on the original: greedy tokens identical, logits within 1e-4 relative.
- ALiBi variant (Baichuan-13B / Baichuan2-13B, with Baichuan2's NormHead): there is no transformers
  model with RMSNorm + SwiGLU + ALiBi, so `DenseAlibiReference` below is a test-local reference:
  plain torch, whole [seq, seq] score matrix with Baichuan's bias slope_h · key_position, causal
  mask, no cache, slopes written out from the ALiBi paper, lm_head rows L2-normalised. 6 heads, so
  the slopes take the non-power-of-two interleave.
"""

from __future__ import annotations

import json
import math
import shutil
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from shardserve.models.registry import parse_arch
from tests.checkpoints import (
    VOCAB,
    Checkpoints,
    Made,
    Recipe,
    make_model_checkpoint,
)

pytestmark = pytest.mark.timeout(300)

LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,  # Baichuan has no grouped-query attention
    vocab_size=VOCAB,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)
ALIBI = dict(LLAMA, hidden_size=96, num_attention_heads=6, num_key_value_heads=6)  # head_dim 16


def baichuan_tensors(llama: dict[str, torch.Tensor], layers: int, head_scale: torch.Tensor | None) -> dict:
    """Llama tensors in Baichuan's layout: q, k, v packed in `W_pack` (+ the saved rotary inv_freq);
    `head_scale` [vocab] rescales lm_head rows (NormHead must undo it)."""
    out = {n: t for n, t in llama.items() if not any(f".{p}_proj." in n for p in "qkv")}
    for i in range(layers):
        attn = f"model.layers.{i}.self_attn."
        out[attn + "W_pack.weight"] = torch.cat([llama[f"{attn}{p}_proj.weight"] for p in "qkv"])
        out[attn + "rotary_emb.inv_freq"] = torch.rand(8)
    if head_scale is not None:
        out["lm_head.weight"] = llama["lm_head.weight"] * head_scale[:, None]
    return out


def baichuan_config(cfg: dict[str, Any], alibi: bool) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    out = {k: cfg[k] for k in (*keys, "rms_norm_eps", "hidden_act", "bos_token_id", "eos_token_id")}
    out |= {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "torch_dtype": "float32"}
    out |= {"model_max_length": cfg["max_position_embeddings"], "tie_word_embeddings": False, "pad_token_id": 0}
    if alibi:
        return out | {"norm_head": True}  # 13B configs have no max_position_embeddings
    return out | {"max_position_embeddings": cfg["max_position_embeddings"]}


def convert_to_baichuan(src: Path, dst: Path, alibi: bool) -> Path:
    """Write the transformers Llama checkpoint `src` in the Baichuan layout under `dst`."""
    cfg = json.loads((src / "config.json").read_text())
    scale = torch.rand(cfg["vocab_size"], generator=torch.Generator().manual_seed(1)) * 1.5 + 0.5 if alibi else None
    dst.mkdir(parents=True, exist_ok=True)
    tensors = baichuan_tensors(load_file(src / "model.safetensors"), cfg["num_hidden_layers"], scale)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(baichuan_config(cfg, alibi), indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def paper_slopes(heads: int) -> torch.Tensor:
    """ALiBi slopes (Press et al.): 2^(-8i/n) for the closest power of two n ≤ heads, then every other
    slope of the series for 2n."""
    n = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * (i + 1) / n) for i in range(n)]
    slopes += [2 ** (-8 * (2 * i + 1) / (2 * n)) for i in range(heads - n)]
    return torch.tensor(slopes)


class DenseAlibiReference:
    """Test-local reference for Baichuan-13B-style models (see the module docstring): no paging, no cache."""

    def __init__(self, path: Path):
        self.w = load_file(path / "model.safetensors")
        self.cfg = json.loads((path / "config.json").read_text())
        self.config = SimpleNamespace(vocab_size=self.cfg["vocab_size"])  # what the shared helpers read
        self.heads = self.cfg["num_attention_heads"]
        self.slopes = paper_slopes(self.heads)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"]) * self.w[name]

    def _attention(self, h: torch.Tensor, prefix: str) -> torch.Tensor:
        n = h.shape[0]
        q, k, v = (h @ self.w[prefix + "W_pack.weight"].T).view(n, 3, self.heads, -1).unbind(1)  # [n, heads, d]
        keys = torch.arange(n, dtype=torch.float32)
        bias = self.slopes[:, None, None] * keys[None, None, :]  # [heads, 1, n]: slope · key position
        bias = bias.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))  # [heads, n, n]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1]) + bias
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)
        return out @ self.w[prefix + "o_proj.weight"].T

    def _mlp(self, h: torch.Tensor, prefix: str) -> torch.Tensor:
        gate, up = h @ self.w[prefix + "gate_proj.weight"].T, h @ self.w[prefix + "up_proj.weight"].T
        return (F.silu(gate) * up) @ self.w[prefix + "down_proj.weight"].T

    def logits(self, ids: list[int]) -> torch.Tensor:
        x = self.w["model.embed_tokens.weight"][ids]  # [n, hidden]
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = x + self._attention(self._norm(x, p + "input_layernorm.weight"), p + "self_attn.")
            x = x + self._mlp(self._norm(x, p + "post_attention_layernorm.weight"), p + "mlp.")
        return self._norm(x, "model.norm.weight") @ F.normalize(self.w["lm_head.weight"], dim=-1).T

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:  # ids [1, n], like a transformers model
        return SimpleNamespace(logits=self.logits(ids[0].tolist())[None])

    def generate(self, ids: torch.Tensor, max_new_tokens: int, **_: Any) -> torch.Tensor:
        tokens = ids[0].tolist()
        for _ in range(max_new_tokens):
            tokens.append(int(self.logits(tokens)[-1].argmax()))
        return torch.tensor([tokens])


def make_baichuan(root: Path, variant: str) -> Made:
    """(Baichuan-layout dir, transformers Llama on the original or the dense ALiBi reference) under `root`."""
    alibi = variant == "alibi"
    src, hf = make_model_checkpoint(root / "llama", "llama", 5, **(ALIBI if alibi else LLAMA))
    dst = convert_to_baichuan(src, root / "baichuan", alibi)
    return dst, DenseAlibiReference(dst) if alibi else hf


RECIPES: dict[str, Recipe] = {variant: partial(make_baichuan, variant=variant) for variant in ("rope", "alibi")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory, "baichuan", RECIPES)


def test_reference_slopes_for_six_heads() -> None:
    """The reference's slopes for 6 heads: 2^-2, 2^-4, 2^-6, 2^-8 (n = 4), then 2^-1, 2^-3 (from n = 8)."""
    assert torch.equal(paper_slopes(6), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]))


# config.json keys of the published checkpoints that decide the variant -> (position, norm_head)
REAL: dict[str, tuple[dict[str, Any], str, bool]] = {
    "Baichuan-7B": ({"vocab_size": 64000, "max_position_embeddings": 4096}, "rope", False),
    "Baichuan2-7B": ({"vocab_size": 125696, "max_position_embeddings": 4096, "model_max_length": 4096}, "rope", True),
    "Baichuan-13B": ({"vocab_size": 64000, "model_max_length": 4096}, "alibi", False),
    "Baichuan2-13B": ({"vocab_size": 125696, "model_max_length": 4096}, "alibi", True),
}


@pytest.mark.parametrize("model", list(REAL))
def test_config_rules(model: str) -> None:
    keys, position, norm_head = REAL[model]
    sizes = {"hidden_size": 5120, "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 40}
    cfg = {"architectures": ["BaichuanForCausalLM"], **sizes, **keys}
    arch = parse_arch(cfg)
    assert (arch.extra["position"], arch.extra["norm_head"]) == (position, norm_head)
    assert arch.max_position_embeddings == 4096 and arch.num_kv_heads == 40
