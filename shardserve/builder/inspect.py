"""`shardserve inspect`: an engine's configuration and each rank's tensor inventory."""

from __future__ import annotations

from pathlib import Path

from shardserve.builder.engine_dir import rank_file, read_engine_info
from shardserve.builder.safetensors_io import tensor_specs


def describe_engine(engine_dir: Path, list_tensors: bool = False) -> str:
    info = read_engine_info(engine_dir)
    cfg = info.hf_config
    lines = [
        f"engine: {engine_dir}",
        f"  architecture: {info.architecture} ({cfg.get('num_hidden_layers', '?')} layers, "
        f"hidden {cfg.get('hidden_size', '?')}, vocab {cfg.get('vocab_size', '?')})",
        f"  dtype: {info.dtype}   quantization: {info.quantization}",
        f"  parallel: tp={info.tp} × pp={info.pp} = {info.world_size} ranks; "
        f"stages (layers): {', '.join(f'[{a}, {b})' for a, b in info.stages)}",
        f"  limits: max_batch_size={info.max_batch_size} max_seq_len={info.max_seq_len}",
        f"  format v{info.format_version}, built by shardserve {info.builder_version}",
        f"  source: {info.source.get('path')} (sha256 {info.source.get('sha256', '')[:16]}…)",
    ]
    if not info.weights:
        lines.append("  weights: none (built with --no-weights; run with model.load_format: dummy)")
        return "\n".join(lines)
    total = 0
    for rank in range(info.world_size):
        specs = tensor_specs(engine_dir / rank_file(rank))
        size = sum(s.nbytes for s in specs)
        total += size
        stage, tp_rank = divmod(rank, info.tp)
        lines.append(f"  rank {rank} (stage {stage}, tp rank {tp_rank}): {len(specs)} tensors, {size / 2**20:.2f} MiB")
        if list_tensors:
            for s in specs:
                dtype = str(s.dtype).removeprefix("torch.")
                lines.append(f"    {s.name:<60} {dtype:<14} {list(s.shape)}  {s.nbytes} B")
    lines.append(f"  total: {total / 2**20:.2f} MiB")
    return "\n".join(lines)
