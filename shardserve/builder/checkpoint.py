"""Reading checkpoints: a Hugging Face directory, a GGUF file, or an engine directory.

In: a path. Out: the HF-style config dict, a stream of (HF name, tensor) one tensor at a
time, and the tokenizer. Problems (missing files, truncated safetensors, no tokenizer) are
`CheckpointError`s that name the file, raised before any weight is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shardserve.builder.errors import CheckpointError
from shardserve.builder.engine_dir import EngineInfo, is_engine_dir, rank_file, read_engine_info
from shardserve.builder.safetensors_io import iter_tensors, map_tensors, read_header, tensor_specs

SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]  # safetensors / bin shards, the one GGUF file, or an engine's rank files
    tokenizer_path: Path | None = None
    engine: EngineInfo | None = None  # set for an engine directory built by `shardserve build`

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    def iter_rank_tensors(self, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
        """An engine's rank file: canonical tensors already cut for that rank (views of its memory
        map: the loader copies each one to its device)."""
        if self.engine is None:
            raise CheckpointError(f"{self.path}: not an engine directory")
        yield from map_tensors(self.path / rank_file(rank))

    def iter_tensor_specs(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The source tensors as meta tensors (shapes and dtypes, no data), in `iter_tensors` order."""
        if self.is_gguf or any(f.suffix != ".safetensors" for f in self.weight_files):
            for name, tensor in self.iter_tensors():
                yield name, torch.empty_like(tensor, device="meta")
            return
        for file in self.weight_files:
            for spec in tensor_specs(file):
                yield spec.name, torch.empty(spec.shape, dtype=spec.dtype, device="meta")

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.engine is not None:
            raise CheckpointError(f"{self.path}: an engine directory is read rank by rank")
        if self.is_gguf:
            from shardserve.builder.gguf import iter_gguf_tensors

            yield from iter_gguf_tensors(self.path)
            return
        for file in self.weight_files:
            yield from _iter_file(file)

    def load_tokenizer(self) -> Any:
        if self.tokenizer_path is not None and self.tokenizer_path != self.path:
            return _auto_tokenizer(self.tokenizer_path)
        if self.is_gguf:
            from shardserve.builder.gguf import load_gguf_tokenizer

            return load_gguf_tokenizer(self.path)
        return _auto_tokenizer(self.path)


def open_checkpoint(path: str | Path, tokenizer: str | Path | None = None, require_weights: bool = True) -> Checkpoint:
    """A HF directory, .gguf file or engine directory; `require_weights=False` accepts a HF
    directory with only config.json and a tokenizer, or an engine built with `--no-weights`
    (random weights: `model.load_format: dummy`)."""
    path = Path(path)
    tok = Path(tokenizer) if tokenizer is not None else None
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a model directory or a .gguf file")
        from shardserve.builder.gguf import read_gguf_config

        return Checkpoint(path, read_gguf_config(path), (path,), tok)
    if is_engine_dir(path):
        info = read_engine_info(path)
        if require_weights and not info.weights:
            raise CheckpointError(f"{path}: built with --no-weights: its ranks need model.load_format: dummy")
        files = tuple(path / rank_file(r) for r in range(info.world_size))
        if tok is None and not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise CheckpointError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        return Checkpoint(path, info.hf_config, files, tok, info)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    files = _weight_files(path) if require_weights or _has_weights(path) else ()
    for file in files:
        if file.suffix == ".safetensors":
            check_safetensors(file)
    if tok is None and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return Checkpoint(path, config, files, tok)


def _has_weights(path: Path) -> bool:
    return (
        (path / SAFETENSORS_INDEX).is_file() or any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    )


def _weight_files(path: Path) -> tuple[Path, ...]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = tuple(path / name for name in sorted(set(weight_map.values())))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: names missing shard files: {', '.join(missing)}")
        return files
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = tuple(sorted(path.glob(pattern)))
        if files:
            return files
    raise CheckpointError(f"{path}: no weights (*.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin)")


def check_safetensors(file: Path) -> None:
    """Validate the header and that the file is as long as the header says."""
    start, header = read_header(file)
    size = file.stat().st_size
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if start + end > size:
        raise CheckpointError(f"{file}: truncated safetensors file: needs {start + end} bytes, has {size}")


def _iter_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.suffix == ".safetensors":
        yield from iter_tensors(file)
        return
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for corrupt zip/pickle files
        raise CheckpointError(f"{file}: cannot read ({exc})") from None
    yield from state.items()


# tokenizer_config.json names of the class transformers' plain fast tokenizer loads as (v4, v5)
PLAIN_FAST_TOKENIZERS = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})


def _auto_tokenizer(path: Path) -> Any:
    """The tokenizer AutoTokenizer would give. Where tokenizer_config.json names the plain fast
    tokenizer (Llama 3, and any tokenizer saved as one) and no custom code, that class is loaded
    directly: importing AutoTokenizer pulls in torch.distributed's FSDP, scikit-learn and sympy
    (6.3–7.0 s of a cold start on the GPU image, against 1.2–1.6 s; benchmarks/README.md)."""
    try:
        if _plain_fast_tokenizer(path):
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({exc})") from None


def _plain_fast_tokenizer(path: Path) -> bool:
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    named = isinstance(config, dict) and config.get("tokenizer_class") in PLAIN_FAST_TOKENIZERS
    return named and "auto_map" not in config and (path / "tokenizer.json").is_file()
