"""IncrementalDetokenizer with real tokenizers trained offline in fixtures (no downloads).

The byte-level BPE is trained on ASCII text only, so non-ASCII characters are encoded one byte
a token: every multi-byte character is split across tokens. A SentencePiece-style (Metaspace)
BPE checks that the prompt context keeps the leading space of the first output token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from shardserve.engine.output import IncrementalDetokenizer
from shardserve.engine.request import SamplingParams

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there!",
    "Stop here. The end of the story.",
    "She sells sea shells by the sea shore.",
] * 5
PROMPT = "Once upon a time, the quick brown"
CHUNK_SIZES = [1, 2, 5]


def train_tokenizer(
    model: models.Model, pre_tokenizer: Any, decoder: Any, special: list[str], **trainer: Any
) -> PreTrainedTokenizerFast:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    bpe = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False, **trainer)
    tok.train_from_iterator(CORPUS, bpe)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE."""
    return train_tokenizer(
        models.BPE(),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
        ["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece style ("▁fox"): decoding drops the leading space of the first token."""
    return train_tokenizer(
        models.BPE(unk_token="<unk>"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
        decoders.Metaspace(replacement="\u2581", prepend_scheme="first"),
        ["<unk>", "<eos>"],
    )


@dataclass
class Stream:
    """What a client saw: the deltas of each step (the last one with finished=True)."""

    detok: IncrementalDetokenizer
    deltas: list[str] = field(default_factory=list)
    stop: str | None = None
    pending: list[int] = field(default_factory=list)  # characters held back after each step

    @property
    def streamed(self) -> str:
        return "".join(self.deltas)


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def run_stream(
    tokenizer: Any,
    output: str | Sequence[int],
    prompt: str | Sequence[int] = PROMPT,
    chunk: int = 1,
    **params: Any,
) -> Stream:
    """Feed the output's tokens `chunk` at a time, taking a delta after each update."""
    output_ids = encode(tokenizer, output) if isinstance(output, str) else list(output)
    prompt_ids = encode(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(**params))
    s = Stream(detok)
    for i in range(0, len(output_ids), chunk):
        s.stop = detok.update(output_ids[i : i + chunk])
        if s.stop is not None:
            break
        s.deltas.append(detok.delta(finished=False))
        s.pending.append(len(detok.text) - len(s.streamed))
    s.deltas.append(detok.delta(finished=True))
    return s


def assert_spans_tokens(tokenizer: Any, text: str, stop: str, at_least: int = 2) -> None:
    """Guard against a vacuous test: `stop` occurs in `text` and covers >= `at_least` tokens."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    start = text.index(stop)
    end = start + len(stop)
    spanned = sum(1 for a, b in offsets if a < end and b > start)
    assert spanned >= at_least, f"{stop!r} lies within {spanned} token(s) of {text!r}"


def assert_streamed_prefixes(s: Stream, final: str) -> None:
    """Every prefix the client saw is a prefix of the final text, which is what it ends with."""
    seen = ""
    for d in s.deltas:
        seen += d
        assert final.startswith(seen), f"streamed {seen!r}, final text is {final!r}"
    assert seen == final == s.detok.text


# ---------------------------------------------------------------------------- no stop words

PLAIN_OUTPUTS = [
    " fox jumps over the lazy dog.",
    " Hello world, hello there! She sells sea shells.",
    "\n\nThe end.  Spaces   and\ttabs",
]


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize("output", PLAIN_OUTPUTS)
def test_deltas_concatenate_to_decode_of_output(tokenizer: Any, output: str, chunk: int) -> None:
    ids = encode(tokenizer, output)
    s = run_stream(tokenizer, ids, chunk=chunk)
    assert s.stop is None
    assert s.streamed == tokenizer.decode(ids) == output
    assert s.detok.text == output
    assert all(p == 0 for p in s.pending), "nothing is held back without stop words"


def test_leading_space_of_first_token_survives(tokenizer: Any) -> None:
    s = run_stream(tokenizer, " fox")
    assert s.deltas[0] == " fox"


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_prompt_context_keeps_leading_space_with_metaspace_tokenizer(metaspace_tokenizer: Any, chunk: int) -> None:
    tok = metaspace_tokenizer
    ids = encode(tok, "the quick brown fox jumps over the lazy dog")
    prompt_ids, output_ids = ids[:3], ids[3:]
    assert tok.decode(output_ids) == "fox jumps over the lazy dog", "decoded alone, the space is lost"
    assert run_stream(tok, output_ids, prompt=prompt_ids, chunk=chunk).streamed == " fox jumps over the lazy dog"


def test_empty_prompt(tokenizer: Any) -> None:
    assert run_stream(tokenizer, "Hello world", prompt="").streamed == "Hello world"


def test_no_tokenizer_is_a_no_op() -> None:
    detok = IncrementalDetokenizer(None, [1, 2, 3], SamplingParams(stop_words=("x",)))
    assert detok.update([4, 5]) is None
    assert detok.delta(finished=True) == ""


# ---------------------------------------------------------------------------- stop strings

STOP_CASES = [
    # (output, stop, text before the stop)
    (" Hello world, hello there!", "world, he", " Hello "),
    (" Hello world, hello there!", "d, h", " Hello worl"),
    (" The end of the story. Stop here.", ". Stop", " The end of the story"),
    (" She sells sea shells by the sea shore.", "sea shore", " She sells sea shells by the "),
]


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize(("output", "stop", "before"), STOP_CASES)
def test_stop_string_across_tokens_is_cut_and_never_streamed(
    tokenizer: Any, output: str, stop: str, before: str, chunk: int
) -> None:
    assert_spans_tokens(tokenizer, output, stop)
    s = run_stream(tokenizer, output, chunk=chunk, stop_words=(stop,))
    assert s.stop == stop
    assert s.detok.text == before
    assert_streamed_prefixes(s, before)
    assert stop not in s.streamed
    assert all(p <= len(stop) - 1 for p in s.pending), "holds back no more than len(stop) - 1 characters"


def test_stopped_detokenizer_ignores_further_tokens(tokenizer: Any) -> None:
    output, stop, before = STOP_CASES[0]
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, PROMPT), SamplingParams(stop_words=(stop,)))
    assert detok.update(encode(tokenizer, output)) == stop  # all tokens in one update
    assert detok.update(encode(tokenizer, " more")) is None
    assert detok.delta(finished=True) == before
    assert detok.delta(finished=True) == ""


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_partial_stop_match_is_held_back_then_released(tokenizer: Any, chunk: int) -> None:
    # "the lazy" starts "the lazy cat" but the stop never completes: all text comes out in the end
    output, stop = " fox jumps over the lazy dog. The end.", "the lazy cat"
    s = run_stream(tokenizer, output, chunk=chunk, stop_words=(stop,))
    assert s.stop is None
    assert_streamed_prefixes(s, output)
    assert all(p <= len(stop) - 1 for p in s.pending)
    assert any(p > 0 for p in s.pending), "degenerate test: something should have been held back"


def test_holdback_hides_the_beginning_of_a_stop_string(tokenizer: Any) -> None:
    # after " Hello world" the tail "world" could begin the stop "world, he": it must not be out yet
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, PROMPT), SamplingParams(stop_words=("world, he",)))
    detok.update(encode(tokenizer, " Hello world"))
    assert "world" not in detok.delta(finished=False)


@pytest.mark.parametrize("chunk", [1, 100])
@pytest.mark.parametrize("stops", [("wor", "lo wor"), ("lo wor", "wor")], ids=["short-first", "long-first"])
def test_earliest_of_two_matching_stop_strings_wins(tokenizer: Any, stops: tuple[str, str], chunk: int) -> None:
    # both complete with the token " world"; "lo wor" starts earlier
    s = run_stream(tokenizer, " Hello world, hello there!", chunk=chunk, stop_words=stops)
    assert s.stop == "lo wor"
    assert s.detok.text == " Hel"
    assert_streamed_prefixes(s, " Hel")


def test_stop_string_completing_at_an_earlier_token_wins(tokenizer: Any) -> None:
    # "world, hello" starts earlier but completes a token after "d," does
    s = run_stream(tokenizer, " Hello world, hello there!", stop_words=("world, hello", "d,"))
    assert s.stop == "d,"
    assert_streamed_prefixes(s, " Hello worl")


# ---------------------------------------------------------------------------- multi-byte UTF-8

UNICODE_OUTPUTS = [" café", " 日本", " 😀", " olé 日本語 😀🎉 naïve", "é日😀"]


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("output", UNICODE_OUTPUTS)
def test_split_multibyte_characters_never_stream_replacement_chars(tokenizer: Any, output: str, chunk: int) -> None:
    ids = encode(tokenizer, output)
    assert len(ids) > len(output), "degenerate test: characters should be split across tokens"
    s = run_stream(tokenizer, ids, chunk=chunk)
    assert not any("\ufffd" in d for d in s.deltas)
    assert s.streamed == tokenizer.decode(ids) == output


def test_multibyte_stop_string(tokenizer: Any) -> None:
    output = " olé 日本語 😀"
    assert_spans_tokens(tokenizer, output, "本", at_least=3)
    s = run_stream(tokenizer, output, stop_words=("本",))
    assert s.stop == "本"
    assert_streamed_prefixes(s, " olé 日")
    assert not any("\ufffd" in d for d in s.deltas)


def test_multibyte_text_with_holdback(tokenizer: Any) -> None:
    output = " 日本語 😀 then the end"
    s = run_stream(tokenizer, output, stop_words=("😀 x",))
    assert s.stop is None
    assert not any("\ufffd" in d for d in s.deltas)
    assert_streamed_prefixes(s, output)


def test_detokenize_false_gives_no_text(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer, [5, 6], SamplingParams(detokenize=False))
    assert detok.update(tokenizer.encode(" the quick brown")) is None
    detok.flush()
    assert detok.text == "" and detok.delta(finished=True) == ""


def test_stop_words_need_detokenize() -> None:
    from shardserve.engine.request import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="stop_words are matched on text"):
        SamplingParams(stop_words=("end",), detokenize=False)
