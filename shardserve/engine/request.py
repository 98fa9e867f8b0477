"""Requests as the leader sees them: sampling parameters, lifecycle state, outputs.

Plain Python (no torch): the scheduler and the KV-cache manager work on these objects.
A request's progress is `num_computed_tokens` catching up to `len(token_ids)`; when the
chunk scheduled in a step reaches the end, the step samples one new token for it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request that cannot be served as asked; the message says what is wrong."""


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end id, stop token or stop string
    LENGTH = "length"  # max_tokens or the model's max length
    ABORT = "abort"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request decoding knobs (names follow vLLM / TensorRT-LLM).

    temperature 0 means greedy. `stop_words` are strings matched on the detokenized
    output (across token boundaries; the output is cut before the match). `bad_words`
    are strings whose token sequences are never produced; `bad_words_token_ids` gives
    them as token sequences directly. `end_id` overrides the tokenizer's EOS id.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    end_id: int | None = None
    stop_words: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    bad_words: tuple[str, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    logprobs: int | None = None  # top-n log-probabilities per generated token
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only, no text (and no stop_words)

    def __post_init__(self) -> None:
        for name in ("stop_words", "bad_words", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(
            self, "bad_words_token_ids", tuple(tuple(int(t) for t in seq) for seq in self.bad_words_token_ids)
        )
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise InvalidRequestError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            fail(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            fail(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            fail(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            fail(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            fail(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:  # also rejects NaN
            fail(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            fail(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.stop_words and not self.detokenize:
            fail("stop_words are matched on text: they need detokenize=True")
        if any(not s for s in self.stop_words):
            fail("stop_words must not contain an empty string")
        if any(not w for w in self.bad_words) or any(not s for s in self.bad_words_token_ids):
            fail("bad_words must not contain an empty word")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True, eq=False)
class Request:
    """One generation request on the leader. Compared by identity, so that removing one from the
    scheduler's queues compares no fields."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]  # ids that end generation (empty when ignore_eos)
    max_total_tokens: int  # prompt + output may not exceed this (model length)
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    priority: int = 0
    arrival: int = 0  # global order of arrival; ties in priority go to the earlier one
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit on first scheduling (-1: not yet scheduled)
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks of `block_ids` already in the prefix cache
    in_flight: int = 0  # plans that schedule it whose results have not come back

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens_from(self, start: int) -> list[int]:
        """`token_ids[start:]` without copying the whole sequence."""
        prompt = len(self.prompt_token_ids)
        if start >= prompt:
            return self.output_token_ids[start - prompt :]
        return self.prompt_token_ids[start:] + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def max_tokens_left(self) -> int:
        """How many more tokens this request may still produce."""
        by_model = self.max_total_tokens - len(self.prompt_token_ids)
        return max(0, min(self.params.max_tokens, by_model) - len(self.output_token_ids))

    @property
    def max_final_tokens(self) -> int:
        """Upper bound on prompt + output tokens at completion (for block reservation)."""
        return min(len(self.prompt_token_ids) + self.params.max_tokens, self.max_total_tokens)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the top-n tokens of this position and their log-probabilities


@dataclass(slots=True)
class RequestOutput:
    """What a step (or a finished generation) reports for one request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    new_token_ids: list[int]  # tokens produced since the last output of this request
    token_ids: list[int]  # all output tokens so far
    text_delta: str
    text: str  # all output text so far (stop strings cut)
    finished: bool
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0
    error: str | None = None
