"""What each rank process runs in tests/comm. Writes <outdir>/rank<r>.json and leaves with os._exit.

    mpiexec -n N python -m tests.comm.rank_script mpi <scenario> <outdir> <world_size> <tp> ...
    python -m tests.comm.rank_script gloo <scenario> <outdir> <world_size> <tp> --port P ...

gloo: one process forks the N ranks (usually itself forked by tests/comm/zygote.py, which imported
torch once: importing torch costs ~3 s of CPU per process); their PIDs go to <outdir>/children.json.
Each rank also writes <outdir>/pid<r> and sends its output to <outdir>/log<r>.
Scenarios: "collectives", "failure".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from shardserve.comm import CommError, World, WorldSpec, init_world
from tests.comm.cases import cases, key, make_input, plan_object

TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def as_json(t: torch.Tensor) -> dict[str, Any]:
    values = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "values": values.reshape(-1).tolist()}


def error_json(exc: BaseException, started: float) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "ranks": list(getattr(exc, "ranks", ())),
        "elapsed": time.monotonic() - started,
    }


def tensor_ops(w: World, dtype: str, shape: tuple[int, ...], out: dict[str, Any]) -> None:
    def mine(op: str, rank: int = w.rank) -> torch.Tensor:
        return torch.from_numpy(make_input(rank, op, dtype, shape)).to(TORCH[dtype])

    x = mine("all_reduce")
    out[key("all_reduce", dtype, shape)] = as_json(w.world.all_reduce(x))
    assert w.world.all_reduce(torch.zeros_like(x)) is not x and x.dtype == TORCH[dtype]
    out[key("tp_all_reduce", dtype, shape)] = as_json(w.tp.all_reduce(mine("tp_all_reduce")))
    for dim in (0, -1):
        out[key(f"all_gather{dim}", dtype, shape)] = as_json(w.world.all_gather(mine(f"all_gather{dim}"), dim=dim))
    out[key("tp_all_gather", dtype, shape)] = as_json(w.tp.all_gather(mine("tp_all_gather")))
    for src in (0, w.world_size - 1):
        x = mine(f"broadcast{src}") if w.rank == src else torch.zeros(shape, dtype=TORCH[dtype])
        out[key(f"broadcast{src}", dtype, shape)] = as_json(w.world.broadcast(x, src=src))
    nxt, prev = (w.rank + 1) % w.world_size, (w.rank - 1) % w.world_size
    got = torch.zeros(shape, dtype=TORCH[dtype])
    if w.rank % 2 == 0:
        w.world.send(mine("ring"), dst=nxt)
        w.world.recv(got, src=prev)
    else:
        w.world.recv(got, src=prev)
        w.world.send(mine("ring"), dst=nxt)
    out[key("ring", dtype, shape)] = as_json(got)
    sent = w.world.isend(mine("iring"), dst=nxt)  # posted: no ordering needed
    out[key("iring", dtype, shape)] = as_json(w.world.recv(torch.zeros(shape, dtype=TORCH[dtype]), src=prev))
    sent.wait()
    assert sent.done()


def in_place_checks(w: World) -> dict[str, bool]:
    x = torch.ones(3)
    y = torch.zeros(2, dtype=torch.bfloat16) + w.rank
    return {
        "all_reduce": w.tp.all_reduce(x) is x,
        "bf16_all_reduce": w.world.all_reduce(y) is y,
        "broadcast": w.world.broadcast(x) is x,
    }


def object_ops(w: World, out: dict[str, Any]) -> None:
    for src in (0, w.world_size - 1):
        out[f"broadcast_object{src}"] = w.world.broadcast_object(plan_object(src) if w.rank == src else None, src=src)
    nxt, prev = (w.rank + 1) % w.world_size, (w.rank - 1) % w.world_size
    if w.rank % 2 == 0:
        w.world.send_object(plan_object(w.rank), dst=nxt)
        out["ring_object"] = w.world.recv_object(src=prev)
    else:
        out["ring_object"] = w.world.recv_object(src=prev)
        w.world.send_object(plan_object(w.rank), dst=nxt)
    sent = w.world.isend_object(plan_object(w.rank), dst=nxt)
    out["iring_object"] = w.world.recv_object(src=prev)
    sent.wait(timeout=None)
    sent.wait()  # idempotent
    w.world.barrier()
    w.tp.barrier()


def timeout_check(w: World, out: dict[str, Any]) -> None:
    """Rank 0 times out in an all_reduce that rank 1 joins late (world of 2 only)."""
    x = torch.ones(2)
    if w.rank == 1:
        time.sleep(1.0)
        out["late_all_reduce"] = as_json(w.world.all_reduce(x, timeout=10.0))
        return
    started = time.monotonic()
    try:
        w.world.all_reduce(x, timeout=0.5)
    except CommError as exc:
        out["timeout_error"] = error_json(exc, started)
    try:
        w.world.barrier()
    except CommError as exc:
        out["after_failure"] = error_json(exc, started)
    # stay until rank 1 has closed: our all_reduce is still posted and completes its late one
    deadline = time.monotonic() + 20
    while not ((peer := w.board.peer(1)) and peer.closed) and time.monotonic() < deadline:
        time.sleep(0.05)


def collectives(w: World, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tp_ranks": list(w.tp.ranks),
        "world_ranks": list(w.world.ranks),
        "stage": w.stage,
        "tp_rank": w.tp_rank,
        "tensors": {},
    }
    started = time.monotonic()
    for dtype, shape in cases():
        tensor_ops(w, dtype, shape, out["tensors"])
    out["in_place"] = in_place_checks(w)
    object_ops(w, out)
    out["collectives_s"] = time.monotonic() - started
    if w.world_size == 2:
        timeout_check(w, out)
    return out


def failure(w: World, args: argparse.Namespace) -> dict[str, Any]:
    """Rank `--victim` kills or stops itself; the lowest other rank idles in
    recv_object(src=victim, timeout=None), the others are in an all_reduce with a timeout."""
    victim = args.victim
    idler = min(r for r in range(w.world_size) if r != victim)
    w.world.barrier()
    if w.rank == victim:
        os.kill(os.getpid(), getattr(signal, args.signal))
        time.sleep(60)  # SIGSTOP: the test kills this process
    started = time.monotonic()
    try:
        if w.rank == idler:
            return {"unexpected": repr(w.world.recv_object(src=victim, timeout=None))}
        return {"unexpected": as_json(w.world.all_reduce(torch.ones(4), timeout=args.timeout))}
    except CommError as exc:
        return {"error": error_json(exc, started)}


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=repr))
    tmp.rename(path)


def run_rank(args: argparse.Namespace, rank: int | None) -> int:
    outdir = Path(args.outdir)
    spec = WorldSpec(
        backend=args.backend,
        world_size=args.world_size,
        tp=args.tp,
        rank=rank,
        master_port=args.port,
        timeout_s=args.timeout,
        heartbeat_timeout_s=args.heartbeat_timeout,
        heartbeat_interval_s=min(0.2, args.heartbeat_timeout / 5),
    )
    rank = int(os.environ["PMI_RANK"]) if rank is None else rank  # hydra tells each MPI rank its rank
    (outdir / f"pid{rank}").write_text(str(os.getpid()))
    result: dict[str, Any] = {"pid": os.getpid()}
    started = time.monotonic()
    try:
        world = init_world(spec)
        result["init_s"] = time.monotonic() - started
        result.update({"collectives": collectives, "failure": failure}[args.scenario](world, args))
        if "error" in result:  # what a rank worker does after a CommError
            world.board.report_failure(result["error"]["message"], result["error"]["ranks"])
        world.close()
        world.close()  # idempotent
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result["crash"] = traceback.format_exc() + repr(exc)
    write_json(outdir / f"rank{rank}.json", result)
    return 0


def log_to_file(outdir: str, rank: int | str) -> None:
    """Send this process's stdout/stderr to <outdir>/log<rank>."""
    fd = os.open(Path(outdir) / f"log{rank}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def fork_ranks(args: argparse.Namespace) -> None:
    children = []
    for rank in range(args.world_size):
        pid = os.fork()
        if pid == 0:
            code = 1
            log_to_file(args.outdir, rank)
            try:
                code = run_rank(args, rank)
            except BaseException:  # noqa: BLE001 - the child must reach os._exit
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    write_json(Path(args.outdir) / "children.json", {"pids": children})
    for pid in children:
        os.waitpid(pid, 0)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend", choices=["mpi", "gloo"])
    parser.add_argument("scenario", choices=["collectives", "failure"])
    parser.add_argument("outdir")
    parser.add_argument("world_size", type=int)
    parser.add_argument("tp", type=int)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=3.0)
    parser.add_argument("--signal", default="SIGKILL")
    parser.add_argument("--victim", type=int, default=-1)
    args = parser.parse_args(argv)
    args.victim %= args.world_size
    return args


def main() -> None:
    args = parse()
    if args.backend == "gloo":
        fork_ranks(args)
        return
    code = 1
    log_to_file(args.outdir, os.environ["PMI_RANK"])
    try:
        code = run_rank(args, None)
    except BaseException:  # noqa: BLE001 - the rank must reach os._exit (MPI_Finalize may block)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
