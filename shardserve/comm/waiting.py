"""The one way every backend waits: poll, back off, watch the rank board, fail with a named rank.

Several ranks often share a couple of CPU cores, so a wait spins only a few polls and then sleeps
with exponential back-off (20 µs doubling up to 2 ms). About every 0.25 s it asks the watcher
whether a peer it waits on is dead or stopped (RankFailedError); at the deadline it raises
CollectiveTimeoutError describing what each peer is doing. `timeout=None` waits without deadline but
keeps watching.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from shardserve.comm.base import CollectiveTimeoutError, CommError, rank_names

SPIN_POLLS = 16
FIRST_SLEEP_S = 20e-6
MAX_SLEEP_S = 2e-3
CHECK_EVERY_S = 0.25

T = TypeVar("T")


class Watcher(Protocol):
    """What a wait asks about the peers it waits on (`board.BoardWatcher`, or `NoWatcher` before the board)."""

    me: int  # this rank (global)
    ranks: tuple[int, ...]  # the peers waited on (global)

    def check(self, what: str) -> None: ...

    def timeout_error(self, what: str, timeout: float) -> CollectiveTimeoutError: ...

    def blame(self, what: str, error: BaseException) -> CommError: ...


class NoWatcher:
    """For waits before the rank board exists: no liveness information, only the deadline."""

    def __init__(self, me: int, ranks: tuple[int, ...], detail: str = "") -> None:
        self.me = me
        self.ranks = ranks
        self.detail = detail

    def check(self, what: str) -> None:
        return None

    def timeout_error(self, what: str, timeout: float) -> CollectiveTimeoutError:
        return CollectiveTimeoutError(
            f"rank {self.me}: {what} did not complete within {timeout:g} s; one of {rank_names(self.ranks)} "
            f"did not answer{self.detail}",
            self.ranks,
        )

    def blame(self, what: str, error: BaseException) -> CommError:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        return CommError(f"rank {self.me}: {what} failed{self.detail}: {text}", self.ranks)


def wait_until(
    done: Callable[[], bool], watcher: Watcher, timeout: float | None, what: str, *, started: float | None = None
) -> None:
    """Return once `done()` is true. `what` names the call, e.g. "all_reduce #12 on tp[0,1]";
    `started` (monotonic) lets several waits of one call share its deadline."""
    for _ in range(SPIN_POLLS):
        if done():
            return
    start = time.monotonic() if started is None else started
    deadline = None if timeout is None else start + timeout
    next_check = time.monotonic() + CHECK_EVERY_S
    pause = FIRST_SLEEP_S
    while not done():
        now = time.monotonic()
        if now >= next_check:
            watcher.check(what)
            next_check = now + CHECK_EVERY_S
        if deadline is not None and now >= deadline:
            raise watcher.timeout_error(what, timeout)  # type: ignore[arg-type]
        time.sleep(pause)
        pause = min(pause * 2, MAX_SLEEP_S)


def run_blocking(fn: Callable[[], T], watcher: Watcher, timeout: float | None, what: str) -> T:
    """Run a blocking call that has no deadline of its own (group creation) on a helper thread and
    wait for it like a collective. On failure the helper thread is abandoned (it is a daemon)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"comm-setup: {what}", daemon=True)
    thread.start()
    wait_until(lambda: not thread.is_alive(), watcher, timeout, what)
    if "error" in box:
        error = box["error"]
        assert isinstance(error, BaseException)
        if isinstance(error, CommError):
            raise error
        raise watcher.blame(what, error) from error
    return box["value"]  # type: ignore[return-value]
