"""Seeded inputs and numpy reference results for the collective tests (no torch here).

Values are small integers (bool: random bits), so every sum is exact in float16 and bfloat16
too and results can be compared for equality.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool")
SHAPES = ((1,), (3, 5), (2, 3, 4))
# numpy stand-in for each dtype (bfloat16 has none: float32 holds its values exactly here)
NUMPY = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.float32,
    "int64": np.int64,
    "int32": np.int32,
    "uint8": np.uint8,
    "bool": np.bool_,
}


def make_input(rank: int, op: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor rank `rank` contributes to `op` (deterministic across processes)."""
    seed = zlib.crc32(f"{rank}|{op}|{dtype}|{shape}".encode())
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    low = 0 if dtype == "uint8" else -8
    return rng.integers(low, 9, size=shape).astype(NUMPY[dtype])


def cases() -> Iterator[tuple[str, tuple[int, ...]]]:
    for dtype in DTYPES:
        for shape in SHAPES:
            yield dtype, shape


def key(op: str, dtype: str, shape: tuple[int, ...]) -> str:
    return f"{op}|{dtype}|{'x'.join(map(str, shape))}"


def tp_ranks(rank: int, tp: int) -> list[int]:
    stage = rank // tp
    return list(range(stage * tp, (stage + 1) * tp))


def _sum(arrays: list[np.ndarray], dtype: str) -> np.ndarray:
    if dtype == "bool":
        return np.logical_or.reduce(arrays)
    return np.sum(np.stack(arrays), axis=0, dtype=NUMPY[dtype])


def expected(rank: int, world_size: int, tp: int) -> dict[str, np.ndarray]:
    """What rank `rank` must end up with for every key the rank script records."""
    out: dict[str, np.ndarray] = {}
    world = list(range(world_size))
    stage = tp_ranks(rank, tp)
    for dtype, shape in cases():

        def inputs(op: str, ranks: list[int], dtype: str = dtype, shape: tuple[int, ...] = shape) -> list[np.ndarray]:
            return [make_input(r, op, dtype, shape) for r in ranks]

        out[key("all_reduce", dtype, shape)] = _sum(inputs("all_reduce", world), dtype)
        out[key("tp_all_reduce", dtype, shape)] = _sum(inputs("tp_all_reduce", stage), dtype)
        for dim in (0, -1):
            out[key(f"all_gather{dim}", dtype, shape)] = np.concatenate(inputs(f"all_gather{dim}", world), axis=dim)
        out[key("tp_all_gather", dtype, shape)] = np.concatenate(inputs("tp_all_gather", stage), axis=-1)
        for src in (0, world_size - 1):
            out[key(f"broadcast{src}", dtype, shape)] = make_input(src, f"broadcast{src}", dtype, shape)
        for ring in ("ring", "iring"):
            out[key(ring, dtype, shape)] = make_input((rank - 1) % world_size, ring, dtype, shape)
    return out


def plan_object(src: int) -> dict[str, object]:
    """A picklable stand-in for a step plan."""
    return {"from": src, "ids": list(range(src, src + 5)), "nested": {"text": "é" * src, "t": (1.5, None)}}
