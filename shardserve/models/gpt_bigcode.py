"""The GPT-BigCode family (SantaCoder, StarCoder, StarCoderBase, WizardCoder: `GPTBigCodeForCausalLM`).

GPT-2's block (gpt2.py: LayerNorm with bias, learned positions, tied lm_head) with two differences:
weights are nn.Linear [out, in] (no transpose), and with `multi_query=True` (the default) one key
head and one value head serve every query head (`c_attn` outputs q [hidden], then k and v
[head_dim] each). Without multi-query, `c_attn` interleaves per head: [q_h, k_h, v_h] for each h.
Both layouts are cut into canonical `attn.{q,k,v}_proj` tensors and fused per rank again.

In: flat token ids and positions of one step, a `ForwardContext` (paged KV cache) and, after the
first pipeline stage, the previous stage's hidden states.
Out: hidden states [tokens, hidden] (a stage's: models/base.py); `compute_logits` maps the sampled rows
to the vocab.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from shardserve.models.arch import ArchConfig
from shardserve.models.gpt2 import GPT2LMHeadModel, gpt2_config


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    TRANSPOSED_WEIGHTS = False

    @staticmethod
    def config_from_hf(cfg: dict) -> ArchConfig:
        # attention_softmax_in_fp32 / scale_attention_softmax_in_fp32 change only the rounding of the
        # softmax in half precision, not the math.
        multi_query = bool(cfg.get("multi_query", True))
        arch = gpt2_config(cfg, default_act="gelu_pytorch_tanh", num_kv_heads=1 if multi_query else None)
        return replace(arch, extra={**arch.extra, "multi_query": multi_query})

    def split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v of a `c_attn` weight [out, in] or bias [out] (see the module docstring for the layouts)."""
        hidden, heads, head_dim = self.arch.hidden_size, self.arch.num_heads, self.arch.head_dim
        if self.arch.extra.get("multi_query", self.arch.num_kv_heads == 1):
            return fused.split([hidden, head_dim, head_dim], dim=0)
        per_head = fused.view(heads, 3, head_dim, *fused.shape[1:])  # [heads, q|k|v, head_dim, (in)]
        return tuple(per_head[:, i].reshape(hidden, *fused.shape[1:]) for i in range(3))
