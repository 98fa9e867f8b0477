"""RankBoard liveness and progress, and the wait helper, over an in-memory store (no processes)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from shardserve.comm import CollectiveTimeoutError, CommError, RankFailedError
from shardserve.comm.board import RankBoard, wait_joined
from shardserve.comm.waiting import NoWatcher, run_blocking, wait_until

pytestmark = pytest.mark.timeout(10)
INTERVAL, HB_TIMEOUT = 0.02, 0.25


class FakeStore:
    """The three Store calls the board makes; `stall()` makes them hang, `fail` makes them raise."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.open = threading.Event()
        self.open.set()
        self.fail: Exception | None = None

    def _enter(self) -> None:
        self.open.wait()
        if self.fail is not None:
            raise self.fail

    def set(self, key: str, value: str | bytes) -> None:
        self._enter()
        self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys: list[str]) -> bool:
        self._enter()
        return all(k in self.data for k in keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        self._enter()
        return [self.data[k] for k in keys]


class FakePeer:
    """A peer's heartbeat thread, writing straight into the fake store."""

    def __init__(self, store: FakeStore, rank: int, op: str | None = None, last: str | None = None) -> None:
        self.store, self.rank, self.op, self.last = store, rank, op, last
        self.beating = True
        self.n = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            if self.beating:
                self.n += 1
                self.store.data[f"hb/{self.rank}"] = json.dumps(
                    {"n": self.n, "in": self.op, "last": self.last}
                ).encode()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def board(store: FakeStore) -> Iterator[RankBoard]:
    b = RankBoard(store, 0, 3, interval=INTERVAL, heartbeat_timeout=HB_TIMEOUT).start()
    yield b
    store.open.set()
    b.close()


@pytest.fixture
def peers(store: FakeStore) -> Iterator[dict[int, FakePeer]]:
    live = {1: FakePeer(store, 1), 2: FakePeer(store, 2)}
    yield live
    for p in live.values():
        p.stop()


def settle(seconds: float = HB_TIMEOUT + 0.15) -> None:
    time.sleep(seconds)


def test_heartbeat_carries_counter_and_current_op(store: FakeStore, board: RankBoard) -> None:
    board.enter("all_reduce #4 on tp[0,1]")
    settle(0.1)
    first = json.loads(store.data["hb/0"])
    assert first["in"] == "all_reduce #4 on tp[0,1]"
    board.leave()
    settle(0.1)
    later = json.loads(store.data["hb/0"])
    assert later["n"] > first["n"] and later["in"] is None and later["last"] == "all_reduce #4 on tp[0,1]"
    board.close()
    assert json.loads(store.data["hb/0"])["closed"] is True


def test_live_peers_pass_and_a_silent_peer_is_named(board: RankBoard, peers: dict[int, FakePeer]) -> None:
    watcher = board.watch([0, 1, 2])
    settle()
    watcher.check("barrier #1 on world[0,1,2]")
    assert board.present() == {0, 1, 2}
    peers[2].beating = False
    settle()
    with pytest.raises(RankFailedError) as info:
        watcher.check("barrier #2 on world[0,1,2]")
    assert info.value.ranks == (2,)
    message = str(info.value)
    assert message.startswith("rank 0: barrier #2 on world[0,1,2] failed: rank 2: no heartbeat for ")
    assert "(dead or stopped)" in message
    board.watch([1]).check("recv #3 on world[0,1,2]")  # a call that waits only on rank 1 is unaffected


def test_a_peer_never_seen_is_named(store: FakeStore, board: RankBoard) -> None:
    peer = FakePeer(store, 1)
    try:
        settle()
        failed = board.watch([1, 2]).failed()
        assert set(failed) == {2} and "no heartbeat ever seen" in failed[2]
    finally:
        peer.stop()


def test_a_closed_peer_is_named_at_once(store: FakeStore, board: RankBoard, peers: dict[int, FakePeer]) -> None:
    settle(0.1)
    peers[1].stop()
    store.data["hb/1"] = json.dumps({"n": 999, "closed": True}).encode()
    settle(0.1)
    assert "closed its world" in board.watch([1]).failed()[1]


def test_a_rank_that_gave_up_is_named_with_its_reason(store: FakeStore, peers: dict[int, FakePeer]) -> None:
    quitter = RankBoard(store, 1, 3, interval=INTERVAL, heartbeat_timeout=HB_TIMEOUT)
    watcher_board = RankBoard(store, 0, 3, interval=INTERVAL, heartbeat_timeout=HB_TIMEOUT).start()
    peers[1].stop()
    quitter.start()
    try:
        settle(0.1)
        assert watcher_board.watch([1]).failed() == {}
        cause = RankFailedError("rank 1: all_reduce #3 on tp[0,1] failed: rank 2: no heartbeat", (2,))
        quitter.report_failure(cause)
        quitter.close()
        settle(0.1)
        with pytest.raises(RankFailedError) as info:
            watcher_board.watch([1]).check("recv_object #9 on world[0,1,2]")
        assert info.value.ranks == (1, 2)  # the rank that gave up, and the one it blamed
        assert "rank 1: gave up: rank 1: all_reduce #3 on tp[0,1] failed: rank 2" in str(info.value)
    finally:
        watcher_board.close()


@pytest.mark.parametrize("how", ["stalled", "broken"])
def test_a_silent_store_blames_rank_0(store: FakeStore, board: RankBoard, peers: dict[int, FakePeer], how: str) -> None:
    settle(0.1)
    if how == "stalled":
        store.open.clear()
    else:
        store.fail = RuntimeError("Broken pipe")
    watcher = board.watch([1, 2])
    watcher.check("all_reduce #1 on world[0,1,2]")  # not yet: the store may just be slow
    settle()
    with pytest.raises(RankFailedError) as info:
        watcher.check("all_reduce #1 on world[0,1,2]")
    assert info.value.ranks == (0,)
    assert "rank 0 hosts the rank board and did not answer" in str(info.value)
    if how == "broken":
        assert "Broken pipe" in str(info.value)


def test_describe_says_what_each_peer_is_doing(store: FakeStore, board: RankBoard) -> None:
    here = "all_reduce #42 on world[0,1,2]"
    same = FakePeer(store, 1, op=here)
    idle = FakePeer(store, 2, last="all_reduce #41 on world[0,1,2]")
    try:
        board.enter(here)
        settle(0.1)
        error = board.watch([1, 2]).timeout_error(here, 1.0)
        assert isinstance(error, CollectiveTimeoutError) and error.ranks == (2,)
        assert str(error).startswith(f"rank 0: {here} did not complete within 1 s: ")
        assert f"rank 1 is waiting in the same {here}" in str(error)
        assert (
            f"rank 2 did not arrive: it is idle, last finished all_reduce #41 on world[0,1,2] (this rank is in {here})"
        ) in str(error)
        idle.op = "broadcast_object #7 on world[0,1,2]"
        settle(0.1)
        text, missing = board.watch([2]).describe()
        assert text == f"rank 2 did not arrive: it is in broadcast_object #7 on world[0,1,2] (this rank is in {here})"
        assert missing == (2,)
    finally:
        same.stop()
        idle.stop()


def test_join_names_the_ranks_that_never_came(store: FakeStore, board: RankBoard) -> None:
    peer = FakePeer(store, 1)
    try:
        started = time.monotonic()
        with pytest.raises(CommError) as info:
            wait_joined(board, timeout=0.3)
        assert info.value.ranks == (2,) and "rank 2 did not join within 0.3 s" in str(info.value)
        assert time.monotonic() - started < 1.0
    finally:
        peer.stop()


class CountingWatcher(NoWatcher):
    def __init__(self, fail_after: float | None = None) -> None:
        super().__init__(0, (1,))
        self.checks = 0
        self.fail_at = None if fail_after is None else time.monotonic() + fail_after

    def check(self, what: str) -> None:
        self.checks += 1
        if self.fail_at is not None and time.monotonic() >= self.fail_at:
            raise RankFailedError(f"rank 0: {what} failed: rank 1: gone", (1,))


def test_wait_until_backs_off_checks_and_times_out() -> None:
    polls = 0

    def never() -> bool:
        nonlocal polls
        polls += 1
        return False

    watcher = CountingWatcher()
    started = time.monotonic()
    with pytest.raises(CollectiveTimeoutError) as info:
        wait_until(never, watcher, 0.6, "barrier #1 on world[0,1]")
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 0.8
    assert str(info.value).startswith("rank 0: barrier #1 on world[0,1] did not complete within 0.6 s")
    assert 1 <= watcher.checks <= 3  # about every 0.25 s
    assert polls < 600  # sleeps with back-off (cap 2 ms), no busy spin


def test_wait_without_deadline_still_fails_on_a_dead_peer() -> None:
    started = time.monotonic()
    with pytest.raises(RankFailedError):
        wait_until(lambda: False, CountingWatcher(fail_after=0.3), None, "recv_object #1 on world[0,1]")
    assert time.monotonic() - started < 1.0
    flag = threading.Event()
    threading.Timer(0.05, flag.set).start()
    wait_until(flag.is_set, CountingWatcher(), None, "recv #2 on world[0,1]")


def test_run_blocking_returns_or_blames() -> None:
    assert run_blocking(lambda: 41 + 1, CountingWatcher(), 1.0, "setup") == 42

    def boom() -> None:
        raise RuntimeError("connection reset")

    with pytest.raises(CommError, match="rank 0: setup failed: connection reset"):
        run_blocking(boom, CountingWatcher(), 1.0, "setup")
    with pytest.raises(CollectiveTimeoutError):
        run_blocking(lambda: time.sleep(2), CountingWatcher(), 0.2, "setup")
