"""Token ids → text, incrementally, with stop strings.

Each request's output is decoded with a few prompt tokens as left context (so a leading
space of the first output token survives), emitting text only once it no longer ends in an
incomplete UTF-8 sequence. Stop strings are searched across token boundaries; the text is
cut before the match. While a stream is live, the last `max(len(stop)) - 1` characters are
held back, so a streamed delta never shows the start of a stop string that later matches.
"""

from __future__ import annotations

from typing import Any

from shardserve.engine.request import SamplingParams

CONTEXT_TOKENS = 6  # prompt tokens decoded with the output for correct spacing


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer if params.detokenize else None  # no tokenizer: ids only, text stays ""
        self.params = params
        context = prompt_token_ids[-CONTEXT_TOKENS:]
        self.tokens: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""
        self.num_sent = 0  # characters of `text` already returned by `delta`
        self.holdback = max((len(s) for s in params.stop_words), default=1) - 1
        self.stopped = False

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; returns the stop string that matched (text is then cut before it)."""
        if self.tokenizer is None or self.stopped:
            return None
        for token in new_token_ids:
            self.tokens.append(token)
            before = len(self.text)
            self.text += self._decode_next()
            stop = self._find_stop(before)
            if stop is not None:
                self.stopped = True
                return stop
        return None

    def flush(self) -> None:
        """At the end of a request: keep trailing bytes that never completed a character."""
        if self.tokenizer is None or self.stopped:
            return
        prefix, full = self._decode_window()
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.tokens)

    def delta(self, finished: bool) -> str:
        if self.num_sent == len(self.text):
            return ""  # nothing new (always so without a tokenizer)
        end = len(self.text) if finished else max(self.num_sent, len(self.text) - self.holdback)
        out = self.text[self.num_sent : end]
        self.num_sent = end
        return out

    def _decode_window(self) -> tuple[str, str]:
        """Text of the tokens already emitted in the window, and of the whole window."""
        skip = self.params.skip_special_tokens
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        return prefix, self.tokenizer.decode(self.tokens[self.prefix_offset :], skip_special_tokens=skip)

    def _decode_next(self) -> str:
        prefix, full = self._decode_window()
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return full[len(prefix) :]
        return ""

    def _find_stop(self, new_from: int) -> str | None:
        """The earliest stop string that ends in the new text; cuts the text before it."""
        best: tuple[int, str] | None = None
        for stop in self.params.stop_words:
            index = self.text.find(stop, max(0, new_from - len(stop) + 1))
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]
