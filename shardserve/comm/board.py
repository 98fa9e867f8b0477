"""`RankBoard`: liveness and progress of every rank, on the world's TCPStore (hosted by global rank 0).

Each rank runs one daemon thread that every `interval` seconds
  1. writes `hb/<rank>` = {"n": counter, "in": op it is in, "last": op it last finished}, and
  2. reads every other rank's `hb/<r>` and notes, on this rank's own monotonic clock, when each
     value last CHANGED.
The main thread only sets an attribute (`enter` / `leave`) and reads that snapshot: it never does
store I/O, so a stopped store host cannot hang it. A peer is stale when its counter has not changed
across this thread's reads for `heartbeat_timeout` seconds (robust to clock skew and to this thread
being starved for a while); a peer whose key never appeared is stale `heartbeat_timeout` after the
board started. If the store itself stops answering for `heartbeat_timeout` (rank 0 dead or stopped),
rank 0 is blamed: it hosts the board. A rank that closes its board writes `"closed": true`, and
one that gave up writes `"failed": <its error>` (`report_failure`), so waiters blame it at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from shardserve.comm.base import CollectiveTimeoutError, CommError, RankFailedError, rank_names

STORE_HOST_RANK = 0
_HOST = socket.gethostname()


class BoardStore(Protocol):
    """The part of `torch.distributed.Store` the board uses (a dedicated client connection)."""

    def set(self, key: str, value: str | bytes) -> None: ...

    def multi_get(self, keys: list[str]) -> list[bytes]: ...

    def check(self, keys: list[str]) -> bool: ...


def heartbeat_key(rank: int) -> str:
    return f"hb/{rank}"


@dataclass(frozen=True, slots=True)
class PeerState:
    raw: bytes  # the last value read
    changed_at: float  # this rank's monotonic time at which `raw` was first read
    op: str | None  # the op the peer is in
    last: str | None  # the op it last finished
    closed: bool  # it closed its board (exited or called World.close)
    failed: str | None  # the error it reported (report_failure)
    blamed: tuple[int, ...]  # ... and the ranks that error blamed
    host: str | None = None  # where the rank runs, and its process id (for `RankBoard.fence`)
    pid: int | None = None


def _parse(raw: bytes, changed_at: float) -> PeerState:
    try:
        info = json.loads(raw)
    except ValueError:
        info = {}
    failed = info.get("failed")
    blamed = tuple(int(r) for r in info.get("blamed", ()))
    failed_text = None if failed is None else str(failed)
    pid = info.get("pid")
    return PeerState(raw, changed_at, info.get("in"), info.get("last"), bool(info.get("closed")), failed_text, blamed,
                     info.get("host"), int(pid) if pid is not None else None)  # fmt: skip


class RankBoard:
    """Heartbeats and progress of `world_size` ranks; `rank` is this process's global rank."""

    def __init__(
        self,
        store: BoardStore,
        rank: int,
        world_size: int,
        *,
        interval: float = 0.2,
        heartbeat_timeout: float = 3.0,
    ) -> None:
        if heartbeat_timeout <= interval:
            raise ValueError(f"heartbeat_timeout ({heartbeat_timeout} s) must exceed interval ({interval} s)")
        self.rank = rank
        self.world_size = world_size
        self.interval = interval
        self.heartbeat_timeout = heartbeat_timeout
        self._store = store
        self._others = [r for r in range(world_size) if r != rank]
        self._current: str | None = None  # set by the main thread, read by the heartbeat thread
        self._last: str | None = None
        self._failed: str | None = None
        self._blamed: tuple[int, ...] = ()
        self._counter = 0
        self._peers: dict[int, PeerState] = {}  # replaced whole by the heartbeat thread
        self._started_at = time.monotonic()
        self._last_read_at: float | None = None
        self._op_since: float | None = None  # when the store op in flight began
        self._failing_since: float | None = None
        self._store_error: str | None = None
        self._linger = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rank-board-{rank}", daemon=True)

    # -- main thread -------------------------------------------------------------------------
    def start(self) -> RankBoard:
        self._started_at = time.monotonic()
        self._thread.start()
        return self

    def enter(self, label: str) -> None:
        """This rank is now in `label` (e.g. "all_reduce #12 on tp[0,1]"); no store I/O."""
        self._current = label

    def leave(self) -> None:
        self._last, self._current = self._current, None

    def report_failure(self, error: str | BaseException, ranks: Iterable[int] | None = None) -> None:
        """Tell every rank that this one gave up (e.g. after a CommError): peers waiting on it fail at
        once, quoting `error` and also blaming `ranks` (default: a CommError's own `ranks`).
        Published by the heartbeat thread (next beat, or the last one at close)."""
        if ranks is None:
            ranks = getattr(error, "ranks", ())
        self._blamed = tuple(int(r) for r in ranks)
        self._failed = str(error)

    @property
    def current(self) -> str | None:
        return self._current

    def fence(self, ranks: Iterable[int]) -> list[int]:
        """SIGKILL those of `ranks` whose heartbeat went stale (dead or stopped: a stopped rank never
        exits, and an MPI launcher waits for every rank) where they run on this host; ranks that
        reported a failure or closed are left to exit. Returns the ranks killed. After a failure only."""
        killed = []
        for r in ranks:
            peer = self._peers.get(r)
            if r == self.rank or peer is None or peer.host != _HOST or peer.pid is None:
                continue
            if peer.failed is not None or peer.closed or not (self.failure(r) or "").startswith("no heartbeat"):
                continue
            try:
                os.kill(peer.pid, signal.SIGKILL)
                killed.append(r)
            except (ProcessLookupError, PermissionError):
                pass
        return killed

    def present(self) -> frozenset[int]:
        """Ranks whose heartbeat key has been seen (this rank included once started)."""
        return frozenset(self._peers) | {self.rank}

    def watch(self, ranks: Iterable[int]) -> BoardWatcher:
        """A watcher over the given GLOBAL ranks (this rank is left out)."""
        return BoardWatcher(self, tuple(r for r in ranks if r != self.rank))

    def close(self, linger: float = 0.0) -> None:
        """Stop the heartbeat thread (it writes a last `"closed": true` beat). Idempotent. With `linger`
        (the store host), first wait up to `linger` s until every peer has closed or gone stale, so
        that they read this last beat before the store goes away with this process."""
        if self._stop.is_set():
            return
        self._linger = linger
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=linger + self.interval + 1.0)

    # -- judgements (main thread, from the snapshot) -------------------------------------------
    def store_silence(self, now: float | None = None) -> float | None:
        """Seconds the store has not answered, once that exceeds `heartbeat_timeout`; else None."""
        now = time.monotonic() if now is None else now
        since = self._op_since if self._failing_since is None else self._failing_since
        if since is not None and now - since > self.heartbeat_timeout:
            return now - since
        return None

    def failure(self, rank: int, now: float | None = None) -> str | None:
        """Why `rank` counts as failed ("no heartbeat for 3.2 s (dead or stopped)"), or None if alive."""
        now = time.monotonic() if now is None else now
        peer = self._peers.get(rank)
        read_at = self._last_read_at
        if peer is not None and peer.failed is not None:
            return f"gave up: {peer.failed}"
        if peer is not None and peer.closed:
            return "closed its world (exited or called close)"
        if read_at is None:
            return None
        if peer is None:
            if read_at - self._started_at > self.heartbeat_timeout:
                return f"no heartbeat ever seen in {now - self._started_at:.1f} s (not started, dead or stopped)"
            return None
        if read_at - peer.changed_at > self.heartbeat_timeout:
            return f"no heartbeat for {now - peer.changed_at:.1f} s (dead or stopped)"
        return None

    def store_failure_message(self, silence: float) -> str:
        error = f"; last error: {self._store_error}" if self._store_error else ""
        return (
            f"rank {STORE_HOST_RANK} hosts the rank board and did not answer for {silence:.1f} s "
            f"(dead or stopped){error}"
        )

    def peer(self, rank: int) -> PeerState | None:
        return self._peers.get(rank)

    # -- heartbeat thread ----------------------------------------------------------------------
    def _run(self) -> None:
        # A store client that failed once is out of step with its server (and torch logs every
        # further failure with a stack trace): stop using it and let `store_silence` judge.
        while not self._stop.is_set() and self._failing_since is None:
            self._beat()
            self._stop.wait(self.interval)
        if self._failing_since is None:
            self._beat(closed=True)
            self._wait_peers_gone(time.monotonic() + self._linger)

    def _wait_peers_gone(self, deadline: float) -> None:
        while time.monotonic() < deadline and any(self.failure(r) is None for r in self._others):
            time.sleep(self.interval)
            try:
                self._read_peers()
            except Exception:  # noqa: BLE001 - the store is going away anyway
                return

    def _beat(self, closed: bool = False) -> None:
        self._counter += 1
        beat: dict[str, object] = {"n": self._counter, "in": self._current, "last": self._last, "host": _HOST,
                                   "pid": os.getpid()}  # fmt: skip
        if self._failed is not None:
            beat["failed"] = self._failed
            beat["blamed"] = list(self._blamed)
        if closed:
            beat["closed"] = True
        self._op_since = time.monotonic()
        try:
            self._store.set(heartbeat_key(self.rank), json.dumps(beat))
            if not closed:
                self._read_peers()
        except Exception as exc:  # noqa: BLE001 - any store failure counts as "did not answer"
            self._store_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self._failing_since = self._op_since
        finally:
            self._op_since = None

    def _read_peers(self) -> None:
        seen = [r for r in self._others if r in self._peers]
        for r in self._others:
            if r not in self._peers and self._store.check([heartbeat_key(r)]):
                seen.append(r)
        values = self._store.multi_get([heartbeat_key(r) for r in seen]) if seen else []
        now = time.monotonic()
        peers = dict(self._peers)
        for r, raw in zip(seen, values, strict=True):
            old = peers.get(r)
            if old is None or old.raw != raw:
                peers[r] = _parse(bytes(raw), now)
        self._peers = peers
        self._last_read_at = now


class BoardWatcher:
    """The board's view of the peers one call waits on; used by `waiting.wait_until`."""

    def __init__(self, board: RankBoard, ranks: tuple[int, ...]) -> None:
        self.board = board
        self.ranks = ranks  # GLOBAL ranks of the peers, this rank excluded
        self.me = board.rank
        self.heartbeat_timeout = board.heartbeat_timeout

    def failed(self) -> dict[int, str]:
        """{global rank: "rank r: why"} for watched peers seen dead, stopped or closed (rank 0 if the store is silent)."""
        now = time.monotonic()
        silence = self.board.store_silence(now)
        if silence is not None:
            return {STORE_HOST_RANK: self.board.store_failure_message(silence)}
        reasons = {r: self.board.failure(r, now) for r in self.ranks}
        return {r: f"rank {r}: {why}" for r, why in reasons.items() if why is not None}

    def check(self, what: str) -> None:
        """Raise RankFailedError naming the failed peers, if any."""
        failed = self.failed()
        if failed:
            raise RankFailedError(f"rank {self.me}: {what} failed: {_join_reasons(failed)}", self.blamed(failed))

    def blamed(self, failed: dict[int, str]) -> tuple[int, ...]:
        """The failed peers, plus the ranks that peers which gave up blamed (the root cause)."""
        ranks = set(failed)
        for r in failed:
            peer = self.board.peer(r)
            if peer is not None:
                ranks.update(b for b in peer.blamed if b != self.me)
        return tuple(sorted(ranks))

    def describe(self, ranks: Iterable[int] | None = None) -> tuple[str, tuple[int, ...]]:
        """What each peer is doing, relative to this rank's current op, and which peers did not arrive."""
        mine = self.board.current
        lines: list[str] = []
        missing: list[int] = []
        for r in self.ranks if ranks is None else ranks:
            line, arrived = self._describe_peer(r, mine)
            lines.append(line)
            if not arrived:
                missing.append(r)
        return "; ".join(lines), tuple(missing)

    def _describe_peer(self, r: int, mine: str | None) -> tuple[str, bool]:
        why = self.board.failure(r)
        if why is not None:
            return f"rank {r}: {why}", False
        peer = self.board.peer(r)
        here = f"(this rank is in {mine})"
        if peer is None:
            return f"rank {r}: no heartbeat seen yet", False
        if peer.op is not None and peer.op == mine:
            return f"rank {r} is waiting in the same {mine}", True
        if peer.op is not None:
            return f"rank {r} did not arrive: it is in {peer.op} {here}", False
        last = f", last finished {peer.last}" if peer.last else ""
        return f"rank {r} did not arrive: it is idle{last} {here}", False

    def timeout_error(self, what: str, timeout: float) -> CollectiveTimeoutError:
        silence = self.board.store_silence()
        if silence is not None:
            text, missing = self.board.store_failure_message(silence), (STORE_HOST_RANK,)
        else:
            text, missing = self.describe()
        return CollectiveTimeoutError(
            f"rank {self.me}: {what} did not complete within {timeout:g} s: {text}", missing or self.ranks
        )

    def blame(self, what: str, error: BaseException) -> CommError:
        """The error to raise after the backend itself failed: wait up to `heartbeat_timeout` for the
        board to show which peer died or stopped; if none does, name all watched peers."""
        deadline = time.monotonic() + self.heartbeat_timeout + 2 * self.board.interval
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        while True:
            failed = self.failed()
            if failed:
                return RankFailedError(
                    f"rank {self.me}: {what} failed: {_join_reasons(failed)} (backend said: {detail})",
                    self.blamed(failed),
                )
            if time.monotonic() >= deadline:
                return RankFailedError(
                    f"rank {self.me}: {what} failed ({detail}); no peer is stale on the rank board, "
                    f"so one of {rank_names(self.ranks)} closed its connection",
                    self.ranks,
                )
            time.sleep(0.05)


def _join_reasons(failed: dict[int, str]) -> str:
    return "; ".join(why for _, why in sorted(failed.items()))


def wait_joined(board: RankBoard, timeout: float) -> None:
    """Block until every rank's heartbeat key exists; CommError naming the missing ranks otherwise."""
    deadline = time.monotonic() + timeout
    everyone = frozenset(range(board.world_size))
    while not everyone <= board.present():
        silence = board.store_silence()
        if silence is not None:
            raise CommError(
                f"rank {board.rank}: joining the world failed: {board.store_failure_message(silence)}",
                (STORE_HOST_RANK,),
            )
        if time.monotonic() >= deadline:
            missing = sorted(everyone - board.present())
            keys = ", ".join(heartbeat_key(r) for r in missing)
            raise CommError(
                f"rank {board.rank}: {rank_names(missing)} did not join within {timeout:g} s "
                f"(no heartbeat {keys} on the rank board)",
                tuple(missing),
            )
        time.sleep(0.02)
