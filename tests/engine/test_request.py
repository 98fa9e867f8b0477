"""SamplingParams: normalization of list-ish fields and validation with clear messages; Request's
derived counts."""

from __future__ import annotations

import math
from typing import Any

import pytest

from shardserve.engine.request import InvalidRequestError, Request, SamplingParams


def test_defaults_are_valid() -> None:
    p = SamplingParams()
    assert p.max_tokens >= 1
    assert not p.greedy
    assert p.stop_words == () and p.bad_words == () and p.stop_token_ids == ()


@pytest.mark.parametrize(("temperature", "greedy"), [(0.0, True), (0, True), (1e-6, False), (1.0, False)])
def test_greedy_means_temperature_zero(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).greedy is greedy


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("stop_words", "###", ("###",)),
        ("stop_words", ["a", "bc"], ("a", "bc")),
        ("bad_words", "damn", ("damn",)),
        ("stop_token_ids", 7, (7,)),
        ("stop_token_ids", [7, 8], (7, 8)),
        ("bad_words_token_ids", [[1, 2], (3,)], ((1, 2), (3,))),
    ],
)
def test_list_fields_are_normalized_to_tuples(field: str, value: Any, expected: tuple[Any, ...]) -> None:
    p = SamplingParams(**{field: value})
    assert getattr(p, field) == expected
    hash(p)  # frozen and hashable once normalized


def test_bare_string_stop_word_is_one_word_not_characters() -> None:
    assert SamplingParams(stop_words="STOP").stop_words == ("STOP",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop_words": ("ok", "")}, "stop_words"),
        ({"stop_words": ""}, "stop_words"),
        ({"bad_words": ("",)}, "bad_words"),
        ({"bad_words_token_ids": ((1,), ())}, "bad_words"),
    ],
)
def test_invalid_params_raise_with_clear_message(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_invalid_request_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"max_tokens must be an integer >= 1, got 0"):
        SamplingParams(max_tokens=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 1},
        {"min_tokens": 4, "max_tokens": 4},
        {"temperature": 0.0},
        {"top_p": 1.0},
        {"top_p": 1e-9},
        {"top_k": 0},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"logprobs": 0},
        {"logprobs": 20},
        {"repetition_penalty": 0.5},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs)


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
def test_nan_is_rejected(field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: math.nan})


@pytest.mark.parametrize(
    ("max_tokens", "max_total_tokens", "num_outputs", "left"),
    [(5, 100, 0, 5), (5, 100, 3, 2), (5, 100, 5, 0), (50, 12, 0, 8), (50, 12, 6, 2), (50, 12, 8, 0), (50, 12, 9, 0)],
)
def test_max_tokens_left_is_the_lesser_of_params_and_model_length(
    max_tokens: int, max_total_tokens: int, num_outputs: int, left: int
) -> None:
    req = Request("a", [1, 2, 3, 4], SamplingParams(max_tokens=max_tokens), frozenset(), max_total_tokens)
    req.output_token_ids.extend(range(num_outputs))
    assert req.max_tokens_left == left


def test_requests_compare_by_identity() -> None:
    a, b = (Request("a", [1], SamplingParams(), frozenset(), 16) for _ in range(2))
    assert a == a and a != b
    queue = [a, b]
    queue.remove(b)
    assert queue[0] is a and len(queue) == 1
