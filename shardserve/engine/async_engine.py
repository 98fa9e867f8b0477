"""asyncio streaming over `LLMEngine`: the `EngineClient` the servers call.

The engine's step loop runs in one background thread; `generate` yields a `RequestOutput`
per new token to the caller's event loop. Requests are added and aborted from the loop
thread through a lock, so a step never sees a half-added request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from shardserve.engine.engine import LLMEngine, Prompt
from shardserve.engine.request import RequestOutput, SamplingParams


class EngineDeadError(RuntimeError):
    """The step loop stopped on an error; every open stream gets this."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="shardserve-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; cancelling the consumer aborts the request."""
        if self._error is not None:
            raise EngineDeadError(f"engine loop stopped: {self._error!r}")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        with self._lock:  # add_request validates and raises InvalidRequestError here
            rid = self.engine.add_request(prompt, params, request_id, priority)
            self._streams[rid] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine loop stopped: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            self._streams.pop(request_id, None)
            aborted = self.engine.abort(request_id)
        self._wake.set()
        return aborted

    def stats(self) -> dict[str, Any]:
        with self._lock:
            sched = self.engine.scheduler
            return {
                "waiting": len(sched.waiting),
                "running": len(sched.running),
                "kv_cache_usage": self.engine.kv_cache.usage,
                "num_preemptions": sched.stats.num_preemptions,
            }

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"engine loop did not stop within {timeout} s")
        self.engine.shutdown()

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.clear()  # a set() after this line makes the wait below return at once
            with self._lock:
                busy = self.engine.has_unfinished_requests()
                if busy:
                    try:
                        outputs = self.engine.step()
                    except BaseException as exc:  # noqa: BLE001 - every stream must learn of it
                        self._fail(exc)
                        return
                    self._deliver(outputs)
            if not busy:
                self._wake.wait(timeout=0.5)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, out)

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        for loop, queue in self._streams.values():
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        self._streams.clear()
