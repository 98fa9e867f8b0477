"""Tensor-parallel building blocks shared by every model family.

Each parallel layer owns its shard of the weights and its collective:
- ColumnParallelLinear (and the merged / QKV variants): output dim split over tp ranks, no collective.
- RowParallelLinear: input dim split; all-reduce of the partial products in `forward`.
- VocabParallelEmbedding: vocab split; out-of-shard ids give zeros; all-reduce.
- ParallelLMHead: vocab split; all-gather of the logits.
Weights are loaded from full (unsplit) checkpoint tensors by `weight_loader(param, tensor, shard)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from shardserve.comm.base import Communicator, SingleRankCommunicator

WeightLoader = Callable[[nn.Parameter, torch.Tensor, str | int | None], None]


def _param(*shape: int, loader: WeightLoader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


def _split(size: int, world: int, what: str) -> int:
    if size % world:
        raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size ({world})")
    return size // world


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's rows (outputs) split over ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_sizes: Sequence[int], bias: bool, comm: Communicator | None = None):
        super().__init__()
        self.comm = comm or SingleRankCommunicator()
        world = self.comm.world_size
        self.full_sizes = list(out_sizes)
        self.local_sizes = [_split(s, world, "output size") for s in out_sizes]
        self.weight = _param(sum(self.local_sizes), in_features, loader=self.weight_loader)
        self.bias = _param(sum(self.local_sizes), loader=self.weight_loader) if bias else None

    def shard_range(self, shard: int) -> tuple[int, int, int]:
        """(offset in this rank's param, start in the full tensor, length) of output part `shard`."""
        offset = sum(self.local_sizes[:shard])
        size = self.local_sizes[shard]
        return offset, self.comm.rank * size, size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None) -> None:
        offset, start, size = self.shard_range(int(shard or 0))
        param.data[offset : offset + size].copy_(loaded[start : start + size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection, split by heads; KV heads are replicated when tp > num_kv_heads."""

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

    def shard_range(self, shard: int) -> tuple[int, int, int]:
        offset = sum(self.local_sizes[:shard])
        size = self.local_sizes[shard]
        rank = self.comm.rank if shard == 0 else self.comm.rank // self.kv_replicas
        return offset, rank * size, size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None) -> None:
        index = {"q": 0, "k": 1, "v": 2}[str(shard)]
        offset, start, size = self.shard_range(index)
        param.data[offset : offset + size].copy_(loaded[start : start + size])


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shardᵀ) + b with W's columns (inputs) split over ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, comm: Communicator | None = None):
        super().__init__()
        self.comm = comm or SingleRankCommunicator()
        self.in_local = _split(in_features, self.comm.world_size, "input size")
        self.weight = _param(out_features, self.in_local, loader=self.weight_loader)
        self.bias = _param(out_features, loader=self._bias_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None) -> None:
        start = self.comm.rank * self.in_local
        param.data.copy_(loaded[:, start : start + self.in_local])

    @staticmethod
    def _bias_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight)
        if self.comm.world_size > 1:
            y = self.comm.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, comm: Communicator | None = None):
        super().__init__()
        self.comm = comm or SingleRankCommunicator()
        self.vocab_size = vocab_size
        self.per_rank = math.ceil(vocab_size / self.comm.world_size)
        self.start = self.comm.rank * self.per_rank
        self.weight = _param(self.per_rank, hidden, loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None) -> None:
        part = loaded[self.start : self.start + self.per_rank]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

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
        self.bias = _param(self.per_rank, loader=self.weight_loader) if bias else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = nn.functional.linear(hidden, self.weight, self.bias)
        if self.comm.world_size > 1:
            logits = self.comm.all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; `forward(x, residual)` also adds the residual first."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _param(hidden, loader=_copy_loader)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


def _copy_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None) -> None:
    param.data.copy_(loaded)


def default_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None = None) -> None:
    """The loader of a parameter, or a plain copy for parameters without one."""
    getattr(param, "weight_loader", _copy_loader)(param, loaded, shard)
