"""Tensor-parallel building blocks shared by every model family.

Each parallel layer owns its shard of the weights and its collective:
- ColumnParallelLinear (and the merged / QKV variants): output dim split over tp ranks, no collective.
- RowParallelLinear: input dim split; all-reduce of the partial products in `forward`.
- VocabParallelEmbedding: vocab split; out-of-shard ids give zeros; all-reduce.
- ParallelLMHead: vocab split; all-gather of the logits.
Every parameter knows its rank's slice of a full checkpoint tensor (`shard_fn`), so the same code
loads a full HF checkpoint at run time and cuts rank files at build time (`load_weight`).
Products go through `cpu_matmul.linear` (oneDNN for float32 on a CPU, else `F.linear`) or, on a
quantized layer, `quantization.quantized_linear`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from shardserve.comm.base import Communicator, SingleRankCommunicator
from shardserve.models import cpu_matmul, fused
from shardserve.models.quantization import FP8_MAX, Fp8Input, quantized_linear

ShardFn = Callable[[torch.Tensor, str | int | None], torch.Tensor]
PlaceFn = Callable[[nn.Parameter, torch.Tensor, str | int | None], None]


def _replicate(loaded: torch.Tensor, shard: str | int | None) -> torch.Tensor:
    return loaded


def _copy_whole(param: nn.Parameter, part: torch.Tensor, shard: str | int | None) -> None:
    param.data.copy_(part)


def _param(*shape: int, shard: ShardFn = _replicate, place: PlaceFn = _copy_whole) -> nn.Parameter:
    """A parameter that knows its rank's slice of a full checkpoint tensor (`shard_fn`) and where
    a slice goes in it (`place_fn`); `load_weight` uses both, the builder only `shard_fn`."""
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.shard_fn = shard  # type: ignore[attr-defined]
    p.place_fn = place  # type: ignore[attr-defined]
    return p


def load_weight(param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None, presharded: bool = False) -> None:
    """Copy a checkpoint tensor (full, or this rank's slice when `presharded`) into `param`."""
    part = loaded if presharded else param.shard_fn(loaded, shard)  # type: ignore[attr-defined]
    param.place_fn(param, part, shard)  # type: ignore[attr-defined]


def _linear(layer: nn.Module, x: torch.Tensor | Fp8Input, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ (+ b), through the quantized matmul when the layer was quantized."""
    scale = getattr(layer, "weight_scale", None)
    if scale is None:
        assert not isinstance(x, Fp8Input), "an fp8 activation for a layer that was not quantized"
        return cpu_matmul.linear(x, layer.weight, bias)
    y = quantized_linear(x, layer.weight, scale)
    return y if bias is None else y + bias


def _split(size: int, world: int, what: str) -> int:
    if size % world:
        raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size ({world})")
    return size // world


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's rows (outputs) split over ranks; the output stays sharded.

    `out_sizes` lists the parts fused in this layer (e.g. gate and up); each is split on its own."""

    def __init__(self, in_features: int, out_sizes: Sequence[int], bias: bool, comm: Communicator | None = None):
        super().__init__()
        self.comm = comm or SingleRankCommunicator()
        world = self.comm.world_size
        self.local_sizes = [_split(s, world, "output size") for s in out_sizes]
        out = sum(self.local_sizes)
        self.weight = _param(out, in_features, shard=self.shard_rows, place=self.place_rows)
        self.bias = _param(out, shard=self.shard_rows, place=self.place_rows) if bias else None

    def part_index(self, shard: str | int | None) -> int:
        return int(shard or 0)

    def source_rank(self, part: int) -> int:
        """Which slice of the full part this rank holds."""
        return self.comm.rank

    def shard_rows(self, loaded: torch.Tensor, shard: str | int | None) -> torch.Tensor:
        part = self.part_index(shard)
        size = self.local_sizes[part]
        start = self.source_rank(part) * size
        return loaded[start : start + size]

    def place_rows(self, param: nn.Parameter, rows: torch.Tensor, shard: str | int | None) -> None:
        part = self.part_index(shard)
        offset = sum(self.local_sizes[:part])
        param.data[offset : offset + self.local_sizes[part]].copy_(rows)

    def forward(self, x: torch.Tensor | Fp8Input) -> torch.Tensor:
        return _linear(self, x, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection (shards "q", "k", "v"), split by heads; KV heads are replicated
    when tp > num_kv_heads (rank r then holds kv head r // (tp / num_kv_heads))."""

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        comm: Communicator | None = None,
    ):
        comm = comm or SingleRankCommunicator()
        world = comm.world_size
        self.num_heads = _split(num_heads, world, "num_attention_heads")
        if num_kv_heads >= world:
            self.num_kv_heads = _split(num_kv_heads, world, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _split(world, num_kv_heads, "tensor-parallel size over num_key_value_heads")
        self.head_dim = head_dim
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden, [q * world, kv * world, kv * world], bias, comm)

    def project(self, x: torch.Tensor | Fp8Input) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] → q [tokens, heads, head_dim], k and v [tokens, kv_heads, head_dim]."""
        q, k, v = self(x).split(self.local_sizes, dim=-1)
        d = self.head_dim
        return q.view(-1, self.num_heads, d), k.view(-1, self.num_kv_heads, d), v.view(-1, self.num_kv_heads, d)

    def part_index(self, shard: str | int | None) -> int:
        return {"q": 0, "k": 1, "v": 2}[str(shard)]

    def source_rank(self, part: int) -> int:
        return self.comm.rank if part == 0 else self.comm.rank // self.kv_replicas


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shardᵀ) + b with W's columns (inputs) split over ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, comm: Communicator | None = None):
        super().__init__()
        self.comm = comm or SingleRankCommunicator()
        self.in_local = _split(in_features, self.comm.world_size, "input size")
        self.weight = _param(out_features, self.in_local, shard=self.shard_columns)
        self.bias = _param(out_features) if bias else None

    def shard_columns(self, loaded: torch.Tensor, shard: str | int | None) -> torch.Tensor:
        start = self.comm.rank * self.in_local
        return loaded[:, start : start + self.in_local]

    def forward(self, x: torch.Tensor | Fp8Input) -> torch.Tensor:
        y = _linear(self, x, None)
        if self.comm.world_size > 1:
            y = self.comm.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows split in ceil(vocab / tp) blocks; the last rank's block is zero-padded."""

    def __init__(self, vocab_size: int, hidden: int, comm: Communicator | None = None):
        super().__init__()
        self.comm = comm or SingleRankCommunicator()
        self.vocab_size = vocab_size
        self.per_rank = math.ceil(vocab_size / self.comm.world_size)
        self.start = self.comm.rank * self.per_rank
        self.weight = _param(self.per_rank, hidden, shard=self.shard_vocab, place=self.place_vocab)

    def shard_vocab(self, loaded: torch.Tensor, shard: str | int | None) -> torch.Tensor:
        return loaded[self.start : self.start + self.per_rank]

    @staticmethod
    def place_vocab(param: nn.Parameter, rows: torch.Tensor, shard: str | int | None) -> None:
        param.data.zero_()
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.world_size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0.0)
        return self.comm.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocab shard of this rank, gathered to the full vocab."""

    def __init__(self, vocab_size: int, hidden: int, bias: bool = False, comm: Communicator | None = None):
        super().__init__(vocab_size, hidden, comm)
        self.bias = _param(self.per_rank, shard=self.shard_vocab, place=self.place_vocab) if bias else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = cpu_matmul.linear(hidden, self.weight, self.bias)
        if self.comm.world_size > 1:
            logits = self.comm.all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; `forward(x, residual)` also adds the residual first. With
    `fp8` (`quantization.takes_fp8` of the layer it feeds) the fused kernel quantizes its output:
    an `Fp8Input` in place of the normed tensor."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _param(hidden)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8: bool = False
    ) -> torch.Tensor | Fp8Input | tuple[torch.Tensor | Fp8Input, torch.Tensor]:
        if fused.enabled(x) and x.dim() == 2 and x.stride(-1) == 1:
            out: torch.Tensor | Fp8Input
            if fp8:
                q, scale, added = fused.rms_norm_fp8(x, self.weight, self.eps, residual, FP8_MAX)
                out = Fp8Input(q, scale, x.dtype)
            else:
                out, added = fused.rms_norm(x, self.weight, self.eps, residual)
            return out if added is None else (out, added)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


class LayerNorm(nn.Module):
    """LayerNorm (optional bias) with the same `forward(x, residual)` contract as RMSNorm."""

    def __init__(self, hidden: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = _param(hidden)
        self.bias = _param(hidden) if bias else None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        out = nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return out if residual is None else (out, residual)


class ReplicatedEmbedding(nn.Module):
    """A table every rank holds whole (learned absolute positions)."""

    def __init__(self, num: int, hidden: int):
        super().__init__()
        self.weight = _param(num, hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.): a geometric series, interleaved for non-powers of two."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def local_heads(values: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """This rank's slice of a per-head tensor."""
    n = values.shape[0] // comm.world_size
    return values[comm.rank * n : (comm.rank + 1) * n]
