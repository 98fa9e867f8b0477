"""The engine directory: `engine.json`, `rank{r}.safetensors` for every rank, tokenizer files.

`engine.json` records the architecture (the source config.json), dtype, quantization, tp, pp,
each stage's layer range, limits, the format version and a checksum of the source. Reading it
checks the format version and that every rank file is present, before any weight is read.
An engine built with `--no-weights` has no rank files (`weights: false`): its ranks make random
weights (`model.load_format: dummy`), for benchmarks of shapes nobody has weights for here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shardserve.builder.errors import CheckpointError

FORMAT_VERSION = 1
ENGINE_FILE = "engine.json"


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


@dataclass(frozen=True, slots=True)
class EngineInfo:
    architecture: str
    hf_config: dict[str, Any]
    dtype: str
    quantization: str
    tp: int
    pp: int
    stages: list[list[int]]  # [first layer, end layer) of each pipeline stage
    source: dict[str, str]  # path, sha256
    builder_version: str
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    ranks: list[dict[str, Any]] = field(default_factory=list)  # file, tensors, bytes
    weights: bool = True  # False: built with --no-weights, no rank files
    format_version: int = FORMAT_VERSION

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def write(self, engine_dir: Path) -> None:
        (engine_dir / ENGINE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


def is_engine_dir(path: Path) -> bool:
    return path.is_dir() and (path / ENGINE_FILE).is_file()


def read_engine_info(engine_dir: Path) -> EngineInfo:
    file = engine_dir / ENGINE_FILE
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: engine format version {version}, this shardserve reads version {FORMAT_VERSION}: rebuild the engine"
        )
    try:
        info = EngineInfo(**data)
    except TypeError as exc:
        raise CheckpointError(f"{file}: unexpected fields ({exc})") from None
    missing = [rank_file(r) for r in range(info.world_size) if info.weights and not (engine_dir / rank_file(r)).is_file()]
    if missing:
        raise CheckpointError(f"{engine_dir}: missing rank files: {', '.join(missing)}")
    return info
