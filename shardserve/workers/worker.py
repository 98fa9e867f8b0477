"""One rank: resolve device and dtype, load the model shard, size and allocate the KV cache."""

from __future__ import annotations

import torch
from torch import nn

from shardserve.builder.checkpoint import Checkpoint
from shardserve.builder.errors import CheckpointError
from shardserve.comm.base import Communicator, SingleRankCommunicator
from shardserve.config import CacheConfig, ModelConfig
from shardserve.engine.sampler import Sampler
from shardserve.models.arch import ArchConfig
from shardserve.models.quantization import quantize_linears
from shardserve.models.registry import model_class
from shardserve.workers.attention import TorchAttentionBackend
from shardserve.workers.model_runner import ModelRunner

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is visible")
    return torch.device(name)


def resolve_dtype(name: str, arch: ArchConfig, device: torch.device, engine_dtype: str | None = None) -> torch.dtype:
    if engine_dtype is not None:  # an engine's weights are stored in their run dtype
        if name not in ("auto", engine_dtype):
            raise CheckpointError(f"the engine was built for {engine_dtype}; model.dtype asks for {name}")
        return DTYPES[engine_dtype]
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU default: exact and fast enough without bf16 kernels
    return DTYPES.get(arch.torch_dtype, torch.bfloat16) if arch.torch_dtype != "float32" else torch.float32


def load_model(
    checkpoint: Checkpoint, arch: ArchConfig, device: torch.device, dtype: torch.dtype, comm: Communicator, max_len: int
) -> nn.Module:
    """Build this rank's model and fill it: from the full checkpoint, or from its engine rank file."""
    cls = model_class(arch)
    engine = checkpoint.engine
    if engine is not None and engine.world_size != comm.world_size:
        raise CheckpointError(
            f"{checkpoint.path}: engine built for tp={engine.tp} × pp={engine.pp} = {engine.world_size} ranks; "
            f"this run has {comm.world_size}"
        )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(arch, comm, max_len)
            if engine is not None and engine.quantization != "none":
                quantize_linears(model, engine.quantization)
    finally:
        torch.set_default_dtype(previous)
    if engine is not None:
        loaded = model.load_weights(checkpoint.iter_rank_tensors(comm.rank), presharded=True)
    else:
        loaded = model.load_weights(checkpoint.iter_tensors())
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    if missing:
        raise CheckpointError(f"{checkpoint.path}: missing tensors: {', '.join(missing[:5])}")
    return model.eval()


def kv_bytes_per_block(arch: ArchConfig, block_size: int, dtype: torch.dtype, tp: int = 1) -> int:
    kv_heads = max(1, arch.num_kv_heads // tp)
    return 2 * arch.num_layers * block_size * kv_heads * arch.head_dim * dtype.itemsize


def num_kv_blocks(cache: CacheConfig, arch: ArchConfig, device: torch.device, dtype: torch.dtype) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = kv_bytes_per_block(arch, cache.block_size, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * cache.kv_cache_free_gpu_mem_fraction)
    else:
        budget = cache.kv_cache_bytes
    blocks = budget // per_block
    if blocks < 1:
        raise RuntimeError(f"the KV cache budget ({budget} bytes) holds no block of {per_block} bytes")
    return blocks


class Worker:
    """The model, its KV cache and runner for one rank (world of one here)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        arch: ArchConfig,
        model_config: ModelConfig,
        cache: CacheConfig,
        max_len: int,
        comm: Communicator | None = None,
    ) -> None:
        self.device = resolve_device(model_config.device)
        engine_dtype = checkpoint.engine.dtype if checkpoint.engine is not None else None
        self.dtype = resolve_dtype(model_config.dtype, arch, self.device, engine_dtype)
        comm = comm or SingleRankCommunicator()
        model = load_model(checkpoint, arch, self.device, self.dtype, comm, max_len)
        self.num_blocks = num_kv_blocks(cache, arch, self.device, self.dtype)
        shape = (2, self.num_blocks, cache.block_size, max(1, arch.num_kv_heads // comm.world_size), arch.head_dim)
        # Zeroed: padded block-table entries are read (and masked) by the reference backend.
        kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(arch.num_layers)]
        sampler = Sampler(seed=model_config.seed)
        self.runner = ModelRunner(model, kv_caches, cache.block_size, TorchAttentionBackend(), sampler, self.device)
