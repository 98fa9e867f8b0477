"""The deployment schema: one YAML file, validated once, frozen, split into sections.

Each component receives only its own section (`model`, `cache`, `scheduler`, `parallel`). Every knob
lives here; nothing is read from environment variables.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A deployment config that does not validate; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SchedulerPolicy(str, enum.Enum):
    """Names as in Triton's TensorRT-LLM backend (`batch_scheduler_policy`)."""

    GUARANTEED_COMPLETION = "guaranteed_completion"  # reserve prompt + max_tokens at admission; never preempt
    MAX_UTILIZATION = "max_utilization"  # admit greedily; preempt the newest when blocks run out


class ModelConfig(_Section):
    path: str | None = Field(None, description="HF checkpoint dir or .gguf file; None = the bundled demo model")
    tokenizer: str | None = Field(None, description="tokenizer dir if not beside the model")
    dtype: str = Field("auto", pattern="^(auto|float32|float16|bfloat16)$")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    max_model_len: int | None = Field(None, ge=1, description="cap on prompt + output tokens")
    seed: int = Field(0, description="seed of requests that set none")
    load_format: str = Field("auto", pattern="^(auto|dummy)$", description="dummy: random weights (benchmarks)")
    quantization: str = Field(
        "none", pattern="^(none|fp8|int8_weight_only)$", description="quantize a HF checkpoint's linears at load"
    )
    attention: str = Field("auto", pattern="^(auto|torch|triton)$", description="auto: triton on CUDA, torch on CPU")
    cuda_graphs: bool = Field(True, description="replay decode steps from CUDA graphs (a CUDA rank of a world of one)")
    cuda_graph_max_batch: int = Field(256, ge=1, description="largest decode batch captured")


class CacheConfig(_Section):
    block_size: int = Field(
        64, ge=1, le=1024, description="tokens a cache block holds (64: CUDA decode reads one block of a head by TMA)"
    )
    kv_cache_bytes: int = Field(1 << 30, ge=1, description="KV cache size on CPU")
    kv_cache_free_gpu_mem_fraction: float = Field(
        0.9, gt=0.0, le=1.0, description="share of the GPU memory free after the weights and the largest step"
    )
    num_blocks: int | None = Field(None, ge=1, description="exact block count (overrides the memory budget)")
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = Field("auto", pattern="^(auto|fp8)$", description="fp8 (e4m3, CUDA): half the bytes")


class SchedulerConfig(_Section):
    policy: SchedulerPolicy = SchedulerPolicy.MAX_UTILIZATION
    max_num_tokens: int = Field(2048, ge=1, description="tokens computed per step (decode + prefill chunks)")
    max_num_sequences: int = Field(256, ge=1, description="requests in the running batch")
    async_scheduling: bool | None = Field(
        None,
        description="a single rank keeps two plans in flight (the next prepared while this one runs, its decodes "
        "one token ahead, their ids taken on the device); None: on GPUs",
    )
    gc_gen0_threshold: int | None = Field(
        50_000,
        ge=1,
        description="Python's generation-0 GC threshold in an engine's process (TensorRT-LLM's "
        "garbage_collection_gen0_threshold): each step's plan objects otherwise set off collections; None: Python's",
    )


class CommBackend(str, enum.Enum):
    AUTO = "auto"  # nccl on CUDA, gloo on CPU
    GLOO = "gloo"
    MPI = "mpi"  # only in an MPI world (`mpiexec -n N shardserve worker`)
    NCCL = "nccl"


class ParallelConfig(_Section):
    """How the ranks of one engine (tp × pp, fixed when it was built) talk and wait."""

    comm: CommBackend = CommBackend.AUTO
    max_in_flight_batches: int | None = Field(
        None, ge=1, description="micro-batches in the pipeline at once (default: one per stage)"
    )
    timeout_s: float = Field(60.0, gt=0, description="longest wait for a rank in a collective or a step")
    heartbeat_timeout_s: float = Field(3.0, gt=0, description="a rank silent this long is dead or stopped")
    master_addr: str = Field("127.0.0.1", description="where rank 0 hosts the rank board (TCP store)")
    master_port: int = Field(0, ge=0, le=65535, description="its port; 0 = pick a free one")


class DeploymentConfig(_Section):
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="after")
    def _check_lengths(self) -> DeploymentConfig:
        if self.model.max_model_len is not None and self.model.max_model_len < 2:
            raise ValueError("model.max_model_len must leave room for a prompt token and an output token")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeploymentConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{path}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{where}: {err['msg']}")
    return "invalid deployment config: " + "; ".join(parts)
