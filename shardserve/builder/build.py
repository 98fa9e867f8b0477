"""`shardserve build`: a checkpoint → an engine directory with one file per rank.

Each rank's model is instantiated on the meta device (no memory) with a shape-only communicator
for its (stage, tp rank); its parameters say which canonical tensors it holds and how to cut them
(`shard_fn`). Pass 1 runs the source's tensor shapes through that to lay out every rank file;
pass 2 streams the source one tensor at a time — convert, cast, quantize, cut, append to each
rank file that needs it — so peak memory is about the largest tensor, not the model.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shardserve import __version__
from shardserve.builder.checkpoint import Checkpoint, open_checkpoint
from shardserve.builder.engine_dir import EngineInfo, rank_file
from shardserve.builder.errors import CheckpointError
from shardserve.builder.plan import ShardPlan
from shardserve.builder.safetensors_io import StreamingWriter, TensorSpec
from shardserve.comm.base import ShapeOnlyCommunicator
from shardserve.models.arch import ArchConfig
from shardserve.models.base import CausalLM
from shardserve.models.quantization import QUANTIZATIONS, quantize_linears, quantize_weight
from shardserve.models.registry import model_class, parse_arch
from shardserve.workers.worker import DTYPES

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass(frozen=True, slots=True)
class BuildOptions:
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"  # auto = the checkpoint's dtype
    quantization: str = "none"
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    progress: bool = True
    weights: bool = True  # False: engine.json and tokenizer only (ranks use dummy weights)


def rank_model(arch: ArchConfig, plan: ShardPlan, rank: int, quantization: str) -> CausalLM:
    """Rank `rank`'s model on the meta device: its parameters, never its weights."""
    stage, tp_rank = plan.rank_coords(rank)
    with torch.device("meta"):
        model = model_class(arch)(arch, ShapeOnlyCommunicator(tp_rank, plan.tp), 2, plan.stages[stage])
        if quantization != "none":
            quantize_linears(model, quantization)
    return model


def rank_tensors(
    model: CausalLM, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The canonical tensors (cut for this rank) that `model` needs from one canonical source tensor."""
    target = model.weight_target(name)
    if target is None:
        return
    param_name, shard = target
    param = params[param_name]
    if getattr(param, "quantized", False):
        q, scale = quantize_weight(tensor, _method(param))
        yield name, param.shard_fn(q, shard).contiguous()
        scale_param = params[param_name + "_scale"]
        yield name + "_scale", scale_param.shard_fn(scale, shard).contiguous()
        return
    out_dtype = tensor.dtype if not tensor.is_floating_point() else dtype
    yield name, param.shard_fn(tensor.to(out_dtype), shard).contiguous()


def _method(param: nn.Parameter) -> str:
    return "fp8" if param.dtype == torch.float8_e4m3fn else "int8_weight_only"


class _Ranks:
    """The meta models of every rank and what each receives from a canonical tensor."""

    def __init__(self, arch: ArchConfig, plan: ShardPlan, options: BuildOptions, dtype: torch.dtype) -> None:
        self.models = [rank_model(arch, plan, r, options.quantization) for r in range(plan.world_size)]
        self.params = [dict(m.named_parameters(remove_duplicate=False)) for m in self.models]
        self.dtype = dtype

    def split(self, canonical: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[int, str, torch.Tensor]]:
        for name, tensor in canonical:
            for rank, (model, params) in enumerate(zip(self.models, self.params, strict=True)):
                for out_name, part in rank_tensors(model, params, name, tensor, self.dtype):
                    yield rank, out_name, part


def build_engine(model_dir: str | Path, output_dir: str | Path, options: BuildOptions | None = None) -> EngineInfo:
    options = options or BuildOptions()
    if options.quantization not in QUANTIZATIONS:
        raise CheckpointError(f"unknown quantization {options.quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    checkpoint = open_checkpoint(model_dir, require_weights=options.weights)
    arch = parse_arch(checkpoint.config)
    plan = ShardPlan.make(arch, options.tp, options.pp)
    tokenizer = checkpoint.load_tokenizer()  # a missing or broken tokenizer fails before the weights
    dtype = DTYPES[options.dtype] if options.dtype != "auto" else DTYPES.get(arch.torch_dtype, torch.float32)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs: list[list[TensorSpec]] = []
    if options.weights:
        ranks = _Ranks(arch, plan, options, dtype)
        specs = _plan_files(checkpoint, ranks, plan.world_size)
        _write_files(checkpoint, ranks, specs, out, options.progress)
    _copy_tokenizer(checkpoint, tokenizer, out)
    info = EngineInfo(
        architecture=arch.architecture,
        hf_config=checkpoint.config,
        dtype=str(dtype).removeprefix("torch."),
        quantization=options.quantization,
        tp=plan.tp,
        pp=plan.pp,
        stages=[[s.start, s.end] for s in plan.stages],
        source={"path": str(Path(model_dir).resolve()), "sha256": source_checksum(checkpoint)},
        builder_version=__version__,
        max_batch_size=options.max_batch_size,
        max_seq_len=options.max_seq_len,
        ranks=[
            {"file": rank_file(r), "tensors": len(s), "bytes": sum(t.nbytes for t in s)} for r, s in enumerate(specs)
        ],
        weights=options.weights,
    )
    info.write(out)
    return info


def _plan_files(checkpoint: Checkpoint, ranks: _Ranks, world: int) -> list[list[TensorSpec]]:
    """Pass 1: every rank file's tensors, in write order, from the source's shapes alone."""
    specs: list[list[TensorSpec]] = [[] for _ in range(world)]
    canonical = ranks.models[0].canonical_tensors(checkpoint.iter_tensor_specs())
    for rank, name, part in ranks.split(canonical):
        specs[rank].append(TensorSpec(name, part.dtype, tuple(part.shape)))
    return specs


def _write_files(
    checkpoint: Checkpoint, ranks: _Ranks, specs: list[list[TensorSpec]], out: Path, progress: bool
) -> None:
    """Pass 2: stream the source and append each rank's parts."""
    from tqdm import tqdm

    writers = [StreamingWriter(out / rank_file(r), s, {"rank": str(r)}) for r, s in enumerate(specs)]
    total = sum(len(s) for s in specs)
    with tqdm(total=total, desc="building rank files", unit="tensor", disable=not progress) as bar:
        canonical = ranks.models[0].canonical_tensors(checkpoint.iter_tensors())
        for rank, name, part in ranks.split(canonical):
            writers[rank].write(name, part)
            bar.update(1)
    for writer in writers:
        writer.close()


def _copy_tokenizer(checkpoint: Checkpoint, tokenizer: object, out: Path) -> None:
    if checkpoint.is_gguf or checkpoint.tokenizer_path is not None:
        tokenizer.save_pretrained(str(out))  # type: ignore[attr-defined]
        return
    for name in TOKENIZER_FILES:
        if (checkpoint.path / name).is_file():
            shutil.copy2(checkpoint.path / name, out / name)


def source_checksum(checkpoint: Checkpoint) -> str:
    digest = hashlib.sha256()
    files = list(checkpoint.weight_files)
    if not checkpoint.is_gguf:
        files.append(checkpoint.path / "config.json")
    for file in files:
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
