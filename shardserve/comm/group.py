"""`GroupCalls`: what every backend communicator does around each call, composed, not inherited.

It names the group ("tp[2,3]"), numbers the calls ("all_reduce #12 on tp[2,3]"), tells the rank
board which call this rank is in, resolves timeouts, waits through `waiting.wait_until`, turns
backend exceptions into errors that name a rank, and marks the group unusable after any failure (a
failed call leaves its operation posted, so later calls would pair up wrongly).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from shardserve.comm.base import DEFAULT, CommError, Timeout, resolve_timeout
from shardserve.comm.board import RankBoard
from shardserve.comm.waiting import Watcher, wait_until

T = TypeVar("T")


@dataclass(slots=True)
class Call:
    """One call in flight: its label, deadline and the watcher over the peers it waits on."""

    label: str
    timeout: float | None
    started: float
    watcher: Watcher

    def wait(self, done: Callable[[], bool]) -> None:
        """Poll `done` until true; backend exceptions become errors naming the responsible rank."""

        def poll() -> bool:
            try:
                return done()
            except CommError:
                raise
            except Exception as exc:  # a backend's own error type (MPI.Exception, RuntimeError)
                raise self.watcher.blame(self.label, exc) from exc

        wait_until(poll, self.watcher, self.timeout, self.label, started=self.started)

    def fail(self, error: BaseException) -> CommError:
        return self.watcher.blame(self.label, error)


class GroupCalls:
    """Bookkeeping for one group: `ranks` are its members' GLOBAL ranks (index = group rank)."""

    def __init__(
        self, name: str, ranks: tuple[int, ...], global_rank: int, board: RankBoard, default_timeout: float | None
    ) -> None:
        if global_rank not in ranks:
            raise ValueError(f"rank {global_rank} is not a member of group {name}{list(ranks)}")
        self.ranks = ranks
        self.me = global_rank
        self.rank = ranks.index(global_rank)
        self.name = f"{name}[{','.join(map(str, ranks))}]"
        self.board = board
        self.default_timeout = default_timeout
        self.seq = 0
        self.failed: CommError | None = None
        self._all_peers = tuple(r for r in ranks if r != global_rank)

    def label(self, op: str) -> str:
        """Number a new call: "all_reduce #12 on tp[0,1]"."""
        self.seq += 1
        return f"{op} #{self.seq} on {self.name}"

    @contextmanager
    def call(self, op: str, timeout: Timeout, peer: int | None = None, label: str | None = None) -> Iterator[Call]:
        """Run one call; `peer` is the GROUP rank of a point-to-point partner (None: all members);
        `label` continues a call numbered earlier (a posted send being waited for)."""
        self.check_usable()
        seconds = resolve_timeout(timeout, self.default_timeout)
        label = self.label(op) if label is None else label
        peers = self._all_peers if peer is None else (self.ranks[peer],)
        self.board.enter(label)
        call = Call(label, seconds, time.monotonic(), self.board.watch(peers))
        try:
            yield call
        except CommError as exc:
            self.failed = exc
            raise
        except Exception as exc:  # a backend error raised while posting (gloo: connection reset)
            self.failed = call.fail(exc)
            raise self.failed from exc
        except BaseException as exc:
            self.failed = CommError(f"rank {self.me}: {label} was interrupted ({type(exc).__name__})", ())
            raise
        finally:
            self.board.leave()

    def post(self, op: str, peer: int, post: Callable[[], T]) -> T:
        """Post a point-to-point operation; a backend error while posting becomes a CommError."""
        self.check_usable()
        try:
            return post()
        except Exception:
            with self.call(op, DEFAULT, peer=peer):
                raise

    def check_usable(self) -> None:
        if self.failed is not None:
            raise CommError(
                f"rank {self.me}: {self.name} is unusable after an earlier failure ({self.failed})", self.failed.ranks
            )

    def peer_rank(self, peer: int, role: str) -> int:
        """Check a src/dst group rank for point-to-point; return it."""
        if not 0 <= peer < len(self.ranks):
            raise ValueError(f"{role} {peer} is not a rank of {self.name} (size {len(self.ranks)})")
        if peer == self.rank:
            raise ValueError(f"{role} {peer} is this rank itself; point-to-point needs another rank of {self.name}")
        return peer

    def root_rank(self, src: int) -> int:
        if not 0 <= src < len(self.ranks):
            raise ValueError(f"src {src} is not a rank of {self.name} (size {len(self.ranks)})")
        return src


class PendingOp:
    """A posted point-to-point send (`base.PendingSend`): `poll` tells completion, `finish` surfaces
    errors; `keep` holds the buffers alive until it completes."""

    def __init__(
        self,
        calls: GroupCalls,
        op: str,
        peer: int,
        poll: Callable[[Call], bool],
        finish: Callable[[Call], None] | None = None,
        keep: object = None,
    ) -> None:
        self._calls = calls
        self._label = calls.label(op)
        self._peer = peer
        self._poll = poll
        self._finish = finish
        self._keep = keep
        self._completed = False
        self._waited = False
        self._probe = Call(self._label, None, time.monotonic(), calls.board.watch(()))

    def done(self) -> bool:
        if not self._completed:
            try:
                self._completed = self._poll(self._probe)
            except Exception:  # noqa: BLE001 - errors surface in wait()
                return False
        return self._completed

    def wait(self, timeout: Timeout = DEFAULT) -> None:
        if self._waited:
            return
        with self._calls.call("", timeout, peer=self._peer, label=self._label) as call:
            if not self._completed:
                call.wait(lambda: self._poll(call))
                self._completed = True
            if self._finish is not None:
                self._finish(call)
        self._waited = True
        self._keep = None
