"""The input boundary, rule by rule: each class of mistake is its own error naming the field."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from engine.errors import PayloadInvalid
from engine.inputs import (
    InputInvalid,
    NotFiniteNumber,
    NotJsonData,
    NotText,
    TooDeep,
    TooLarge,
    TooLong,
    check_json,
    check_text,
    loggable,
    parse_json,
)


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def _cyclic() -> Any:
    value: list[Any] = []
    value.append(value)
    return value


@pytest.mark.parametrize(
    ("value", "error", "field"),
    [
        ({1, 2}, NotJsonData, "p"),
        ({"a": b"x"}, NotJsonData, "p.a"),
        ({"a": object()}, NotJsonData, "p.a"),
        ({1: "x"}, NotJsonData, "p"),
        ([math.nan], NotFiniteNumber, "p[0]"),
        ({"a": {"b": -math.inf}}, NotFiniteNumber, "p.a.b"),
        ([2**63], NotFiniteNumber, "p[0]"),
        ({"a": "x\x00"}, NotText, "p.a"),
        ({"\ud800": 1}, NotText, "p.\\ud800"),
        (_deep(65), TooDeep, "p"),
        (_deep(100_000), TooDeep, "p"),
        (_cyclic(), TooDeep, "p"),
        ("a" * 1_100_000, TooLarge, "p"),
        ([0] * 10_000_000, TooLarge, "p"),
        ({str(i): 1 for i in range(500_000)}, TooLarge, "p"),
        ([["x" * 1000] * 1000] * 10, TooLarge, "p"),  # shared parts count each time
    ],
)
def test_check_json_refuses(value: Any, error: type[InputInvalid], field: str) -> None:
    started = time.monotonic()
    with pytest.raises(error) as raised:
        check_json(value, "p")
    assert raised.value.field == field
    assert isinstance(raised.value, PayloadInvalid) and raised.value.exit_code == 2
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -(2**63) + 1, 2**63 - 1, 1.5, "", "é中😀", [], {}, _deep(63), ("a", 1)],
)
def test_check_json_accepts(value: Any) -> None:
    check_json(value, "p")


def test_check_text() -> None:
    assert check_text("ok", "name", 5) == "ok"
    assert check_text(None, "key", 5, required=False) is None
    for value, error in (("", TooLong), ("x" * 6, TooLong), (5, NotJsonData), ("a\x00", NotText)):
        with pytest.raises(error) as raised:
            check_text(value, "name", 5)
        assert raised.value.field == "name"


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("NaN", NotFiniteNumber, "NaN is not a JSON number"),
        ("[1, -Infinity]", NotFiniteNumber, "-Infinity is not a JSON number"),
        ("1e999", NotFiniteNumber, "inf is not a JSON number"),
        ("9" * 5000, NotFiniteNumber, "a whole number must fit 64 bits"),
        ("[" * 5000 + "]" * 5000, TooDeep, "nested more than 64"),
        ('"\\ud800"', NotText, "lone surrogate"),
        (b"\xff", NotText, "not UTF-8"),
        ("{x}", NotJsonData, "is not valid JSON"),
        ('"' + "a" * 1_100_000 + '"', TooLarge, "larger than 1024 KiB"),
    ],
)
def test_parse_json_refuses(text: str | bytes, error: type[InputInvalid], message: str) -> None:
    with pytest.raises(error) as raised:
        parse_json(text, "--payload")
    assert raised.value.field.startswith("--payload") and message in str(raised.value)


def test_loggable_never_refuses() -> None:
    assert loggable("a\x00b\ud800") == "a\ufffdb\ufffd"
    assert loggable(math.nan) == "nan" and loggable(2**70) == str(2**70)
    assert loggable("x" * 100_000).endswith("… (cut)")
    assert loggable(3) == 3
