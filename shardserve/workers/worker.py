"""One rank: resolve device and dtype, load the model shard, size and allocate the KV cache.

A rank of a tp × pp engine loads only its `rank{r}.safetensors` (its stage's layers, its tp
shard) and holds the KV cache of its layers and KV heads; all ranks agree on one block count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from shardserve.builder.checkpoint import Checkpoint
from shardserve.builder.dummy import STD as DUMMY_STD
from shardserve.builder.dummy import checkpoint_specs, random_tensors
from shardserve.builder.errors import CheckpointError
from shardserve.builder.plan import ShardPlan
from shardserve.comm.base import Communicator, SingleRankCommunicator
from shardserve.config import CacheConfig, ConfigError, ModelConfig, SchedulerConfig
from shardserve.engine.sampler import Sampler
from shardserve.models.arch import ArchConfig
from shardserve.models.base import CausalLM, Stage
from shardserve.models.quantization import quantize_linears, quantize_loaded
from shardserve.models.registry import model_class
from shardserve.workers.attention import AttentionBackend, TorchAttentionBackend, kv_cache_shape
from shardserve.workers.memory import profile_plan, step_peak_bytes
from shardserve.workers.model_runner import ModelRunner, StageLinks

if TYPE_CHECKING:
    from shardserve.comm.world import World

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of a rank; on CUDA, rank `local_rank` of this host takes GPU `local_rank` (mod count)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("model.device is 'cuda' but no CUDA device is visible")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
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
    checkpoint: Checkpoint,
    arch: ArchConfig,
    device: torch.device,
    dtype: torch.dtype,
    layout: RankLayout,
    max_len: int,
    load_format: str = "auto",
    quantization: str = "none",
) -> nn.Module:
    """Build this rank's model (its stage, its tp shard) and fill it: from the full checkpoint
    (a world of one), from its engine rank file, or with random weights (`load_format="dummy"`).
    `quantization` quantizes a checkpoint's float linears after loading (engines are built so)."""
    cls = model_class(arch)
    engine = checkpoint.engine
    world_size = engine.world_size if engine is not None else 1
    if world_size != layout.world_size:
        raise CheckpointError(
            f"{checkpoint.path}: engine built for tp={engine.tp} × pp={engine.pp} = {world_size} ranks; "  # type: ignore[union-attr]
            f"this run has {layout.world_size}"
        )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(arch, layout.tp_comm, max_len, stage=layout.stage)
            if engine is not None and engine.quantization != "none":
                quantize_linears(model, engine.quantization)
    finally:
        torch.set_default_dtype(previous)
    if quantization != "none" and engine is not None and engine.quantization != quantization:
        raise CheckpointError(
            f"{checkpoint.path}: the engine was built with quantization {engine.quantization}; "
            f"model.quantization asks for {quantization}"
        )
    if load_format == "dummy":
        loaded = dummy_weights(model, checkpoint, dtype, layout.rank)
    elif engine is not None:
        loaded = model.load_weights(checkpoint.iter_rank_tensors(layout.rank), presharded=True)
    else:
        loaded = model.load_weights(checkpoint.iter_tensors())
    missing = sorted({name for name, _ in model.named_parameters()} - loaded) if loaded is not None else []
    if missing:
        raise CheckpointError(f"{checkpoint.path}: rank {layout.rank}: missing tensors: {', '.join(missing[:5])}")
    if quantization != "none" and (engine is None or engine.quantization == "none"):
        quantize_loaded(model, quantization)
    return model.eval()


@torch.no_grad()
def dummy_weights(model: CausalLM, checkpoint: Checkpoint, dtype: torch.dtype, rank: int) -> set[str] | None:
    """`load_format: dummy`: a random checkpoint made on the device, cut as a real one would be, so
    every tp × pp layout holds the same model (`builder/dummy.py`); returns the parameters loaded.
    A family transformers does not know, or an engine built quantized, gets each parameter filled
    directly (seeded by the rank; returns None)."""
    quantized = checkpoint.engine is not None and checkpoint.engine.quantization != "none"
    specs = None if quantized else checkpoint_specs(checkpoint.config)
    if specs is None:
        random_weights(model, seed=rank)
        return None
    return model.load_weights(random_tensors(specs, next(model.parameters()).device, dtype))


@torch.no_grad()
def random_weights(model: nn.Module, seed: int = 0, std: float = DUMMY_STD) -> None:
    """Fill every parameter on its device: matrices N(0, std²), norms 1, biases 0, and an engine's
    quantized weights small-dtype noise with scales that keep activations in range."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.fill_(0.0 if name.endswith("bias") else std / 4 if name.endswith("weight_scale") else 1.0)
        elif param.dtype.is_floating_point and param.dtype.itemsize > 1:
            param.normal_(0.0, std, generator=gen)
        else:  # an engine's quantized weights: random values of the small dtype
            param.copy_(torch.randn(param.shape, generator=gen, device=param.device).clamp(-4, 4).to(param.dtype))


def kv_bytes_per_block(arch: ArchConfig, block_size: int, dtype: torch.dtype, tp: int = 1, layers: int = 0) -> int:
    """Bytes of one KV block on one rank: its `layers` (default all), its share of the KV heads."""
    kv_heads = max(1, arch.num_kv_heads // tp)
    return 2 * (layers or arch.num_layers) * block_size * kv_heads * arch.head_dim * dtype.itemsize


def free_gpu_bytes(device: torch.device) -> int:
    """Memory free on a CUDA device, counting what torch's allocator holds but no tensor uses (the
    float weights an fp8 model was quantized from: 8.8 GiB for Llama-8B, 24 preemptions in fp8
    1000/1000 while the cache left it out)."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def num_kv_blocks(cache: CacheConfig, device: torch.device, per_block: int, free: int, step_bytes: int = 0) -> int:
    """Blocks this rank can hold: `cache.num_blocks`, else its memory budget over `per_block`; on
    CUDA the budget is `kv_cache_free_gpu_mem_fraction` of `free` (`free_gpu_bytes`) less
    `step_bytes`, the largest step's activations (`workers/memory.py`)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.type == "cuda":
        budget = int(max(0, free - step_bytes) * cache.kv_cache_free_gpu_mem_fraction)
        what = f"{cache.kv_cache_free_gpu_mem_fraction} of {free} bytes free less a step's {step_bytes}"
    else:
        budget = cache.kv_cache_bytes
        what = "cache.kv_cache_bytes"
    blocks = budget // per_block
    if blocks < 1:
        raise RuntimeError(f"the KV cache budget ({budget} bytes: {what}) holds no block of {per_block} bytes")
    return blocks


@dataclass(frozen=True, slots=True)
class RankLayout:
    """This rank's place in its engine: global rank, its pipeline stage, its communicators."""

    rank: int
    world_size: int
    stage: Stage
    tp_comm: Communicator  # the tp ranks of this stage
    links: StageLinks | None  # pipeline neighbours over the world communicator (None: a world of one)
    world: Communicator  # every rank of the engine

    @classmethod
    def single(cls, arch: ArchConfig) -> RankLayout:
        one = SingleRankCommunicator()
        return cls(0, 1, Stage.whole(arch.num_layers), one, None, one)


class Worker:
    """The model, its KV cache and runner for one rank."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        arch: ArchConfig,
        model_config: ModelConfig,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        max_len: int,
        world: World | None = None,
    ) -> None:
        self.device = resolve_device(model_config.device, world.rank if world is not None else 0)
        self.threads_before = torch.get_num_threads()  # restored by the executor's shutdown
        if world is not None and self.device.type == "cpu":  # ranks of one host share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.world_size))
        engine_dtype = checkpoint.engine.dtype if checkpoint.engine is not None else None
        self.dtype = resolve_dtype(model_config.dtype, arch, self.device, engine_dtype)
        layout = rank_layout(checkpoint, arch, world, self.dtype)
        kv_dtype = kv_cache_dtype(cache, self.device, self.dtype)  # config errors before any weight is read
        backend = attention_backend(model_config, arch, self.device, layout.tp_comm.world_size)
        if kv_dtype != self.dtype and isinstance(backend, TorchAttentionBackend):
            raise ConfigError(
                "cache.kv_cache_dtype fp8 is read only by the Triton attention; set model.attention: auto"
            )
        model = load_model(
            checkpoint,
            arch,
            self.device,
            self.dtype,
            layout,
            max_len,
            model_config.load_format,
            model_config.quantization,
        )
        layers = layout.stage.end - layout.stage.start
        per_block = kv_bytes_per_block(arch, cache.block_size, kv_dtype, layout.tp_comm.world_size, layers)
        heads = max(1, arch.num_kv_heads // layout.tp_comm.world_size)

        def kv_caches_of(blocks: int) -> list[torch.Tensor]:
            # Zeroed: padded block-table entries are read (and masked) by the reference backend.
            shape = kv_cache_shape(blocks, cache.block_size, heads, arch.head_dim)
            return [torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(layers)]

        free = step_bytes = 0  # the largest step's activations are set aside before the cache is sized
        if self.device.type == "cuda" and cache.num_blocks is None:  # the largest step, over a one-block cache
            free = free_gpu_bytes(self.device)  # before the step, whose own memory `step_bytes` counts
            layout.world.barrier(timeout=None)  # a rank slower to load is waited for (its step is a collective)
            probe = ModelRunner(model, kv_caches_of(1), cache.block_size, backend, Sampler(), self.device, layout.links)
            plan = profile_plan(scheduler.max_num_tokens, scheduler.max_num_sequences, max_len, cache.block_size)
            step_bytes = step_peak_bytes(probe, plan)
            del probe
        blocks = num_kv_blocks(cache, self.device, per_block, free, step_bytes)
        self.num_blocks = agree_on_blocks(blocks, layout.world, self.device)
        self.step_bytes = step_bytes
        kv_caches = kv_caches_of(self.num_blocks)
        sampler = Sampler(seed=model_config.seed)
        self.layout = layout
        graphs = None
        # Graphs hold the tp all-reduces (NCCL kernels on the capturing stream); pipeline send/recv stay eager.
        if model_config.cuda_graphs and self.device.type == "cuda" and layout.world_size == layout.tp_comm.world_size:
            from shardserve.workers.cuda_graphs import DecodeGraphs
            from shardserve.workers.triton_attention import TritonAttentionBackend

            if isinstance(backend, TritonAttentionBackend):
                graphs = DecodeGraphs(
                    model, kv_caches, backend, cache.block_size, max_len, model_config.cuda_graph_max_batch, self.device
                )
        self.runner = ModelRunner(
            model, kv_caches, cache.block_size, backend, sampler, self.device, layout.links, graphs
        )


def kv_cache_dtype(cache: CacheConfig, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """`cache.kv_cache_dtype`: the model's dtype, or fp8 e4m3 (read by the Triton kernels, CUDA only)."""
    if cache.kv_cache_dtype == "auto":
        return dtype
    if device.type != "cuda":
        raise ConfigError(
            f"cache.kv_cache_dtype {cache.kv_cache_dtype} needs a CUDA device; this rank runs on {device}"
        )
    return torch.float8_e4m3fn


def attention_backend(config: ModelConfig, arch: ArchConfig, device: torch.device, tp: int) -> AttentionBackend:
    """`model.attention`: the Triton kernels on CUDA (auto), the torch reference elsewhere."""
    name = config.attention
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    from shardserve.workers.triton_attention import TritonAttentionBackend

    return TritonAttentionBackend(arch.num_heads // tp, max(1, arch.num_kv_heads // tp))


def rank_layout(checkpoint: Checkpoint, arch: ArchConfig, world: World | None, dtype: torch.dtype) -> RankLayout:
    if world is None:
        return RankLayout.single(arch)
    engine = checkpoint.engine
    if engine is None:
        raise CheckpointError(
            f"{checkpoint.path}: several ranks run an engine directory; build one with `shardserve build`"
        )
    plan = ShardPlan.make(arch, engine.tp, engine.pp)
    if (world.tp_size, world.pp_size) != (engine.tp, engine.pp):
        raise CheckpointError(
            f"{checkpoint.path}: engine built for tp={engine.tp} × pp={engine.pp}; "
            f"this world is tp={world.tp_size} × pp={world.pp_size}"
        )
    tp, last = engine.tp, engine.pp - 1
    links = StageLinks(
        comm=world.world,
        prev=world.rank - tp if world.stage > 0 else None,
        next=world.rank + tp if world.stage < last else None,
        samples=world.stage == last and world.tp_rank == 0,
        hidden_size=arch.hidden_size,
        dtype=dtype,
    )
    return RankLayout(world.rank, world.world_size, plan.stage_of(world.rank), world.tp, links, world.world)


def agree_on_blocks(mine: int, world: Communicator, device: torch.device) -> int:
    """The block count every rank can hold (the leader's pool size): the smallest over the world."""
    if world.world_size == 1:
        return mine
    counts = world.all_gather(torch.tensor([mine], dtype=torch.int64, device=device), dim=0, timeout=None)
    return int(counts.min())
