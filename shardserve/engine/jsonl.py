"""A JSON-lines front end for the leader: one request per input line, one result per output line.

Used by `shardserve worker` on rank 0 (the MPI world's leader) until the serving API lands.
Input lines are read on a thread, so requests join the running batch as they arrive:

    {"id": "a", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    {"id": "b", "prompt_token_ids": [1, 2, 3], "max_tokens": 4, "priority": 1}

Any `SamplingParams` field may be given. Each finished request prints
`{"id", "token_ids", "text", "finish_reason", "num_cached_tokens"}`; a bad line prints
`{"id", "error"}` and nothing else happens. At end of input the running requests finish, then
a last line `{"done": true, "stats": {...}}` gives the scheduler's counters.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import asdict, fields
from typing import IO, Any

from shardserve.engine.engine import LLMEngine
from shardserve.engine.request import InvalidRequestError, SamplingParams

_PARAM_NAMES = {f.name for f in fields(SamplingParams)}
_EOF = object()


def parse_request(line: str) -> tuple[str | None, Any, SamplingParams, int]:
    """(id, prompt, params, priority) of one input line; InvalidRequestError says what is wrong."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"not a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("each line must be a JSON object")
    request_id = data.pop("id", None)
    prompt = data.pop("prompt", None)
    token_ids = data.pop("prompt_token_ids", None)
    if (prompt is None) == (token_ids is None):
        raise InvalidRequestError("give exactly one of 'prompt' and 'prompt_token_ids'")
    priority = data.pop("priority", 0)
    unknown = sorted(set(data) - _PARAM_NAMES)
    if unknown:
        raise InvalidRequestError(f"unknown fields: {', '.join(unknown)}")
    try:
        params = SamplingParams(**data)
    except TypeError as exc:
        raise InvalidRequestError(str(exc)) from None
    if not isinstance(priority, int):
        raise InvalidRequestError(f"priority must be an integer, got {priority!r}")
    return (
        (None if request_id is None else str(request_id)),
        (prompt if prompt is not None else token_ids),
        params,
        priority,
    )


def serve_jsonl(engine: LLMEngine, source: IO[str], sink: IO[str]) -> None:
    lines: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=_read, args=(source, lines), daemon=True).start()
    ended = False
    while not ended or engine.has_unfinished_requests():
        block = not engine.has_unfinished_requests() and not ended
        while True:
            try:
                line = lines.get(block=block, timeout=0.1 if block else None)
            except queue.Empty:
                break
            block = False
            if line is _EOF:
                ended = True
            elif line.strip():
                _add(engine, line, sink)
        for out in engine.step() if engine.has_unfinished_requests() else []:
            if out.finished:
                reason = out.finish_reason.value if out.finish_reason is not None else None
                _emit(sink, {"id": out.request_id, "token_ids": out.token_ids, "text": out.text,
                             "finish_reason": reason, "num_cached_tokens": out.num_cached_tokens})  # fmt: skip
    _emit(sink, {"done": True, "stats": asdict(engine.scheduler.stats)})


def _read(source: IO[str], lines: queue.Queue[Any]) -> None:
    for line in source:
        lines.put(line)
    lines.put(_EOF)


def _add(engine: LLMEngine, line: str, sink: IO[str]) -> None:
    try:
        request_id, prompt, params, priority = parse_request(line)
        engine.add_request(prompt, params, request_id, priority)
    except InvalidRequestError as exc:
        _emit(sink, {"id": _id_of(line), "error": str(exc)})


def _id_of(line: str) -> str | None:
    """The id of a line that failed to parse, where it has one."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return None if value is None else str(value)


def _emit(sink: IO[str], record: dict[str, Any]) -> None:
    sink.write(json.dumps(record) + "\n")
    sink.flush()
