"""The one boundary where data enters the engine: CLI arguments and files, API bodies, Client
calls and step results all pass through `check_json` / `check_text` before anything is stored.

The rules, the same on SQLite and PostgreSQL:
- JSON data only: mappings with text keys, lists, text, finite numbers, true/false, null.
- Whole numbers fit 64 bits; no NaN or Infinity (they are not JSON).
- Text is Unicode text: no lone surrogates and no NUL character (PostgreSQL cannot store NUL,
  so neither backend accepts it: a run behaves the same wherever it is stored).
- Nested at most `JSON_DEPTH_MAX` (64) levels; at most `JSON_SIZE_MAX` (1 MiB) as JSON text.
- Names and keys fit their database columns (`dsl/limits.py`).

Each class of mistake has its own error, naming the field; all are `InputInvalid` (exit 2,
HTTP 422). The walk is iterative, so no input can exhaust the stack.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from dsl.limits import INT_MAX, JSON_DEPTH_MAX, JSON_SIZE_MAX

from .errors import EngineError, PayloadInvalid

__all__ = [
    "InputInvalid",
    "NotFiniteNumber",
    "NotJsonData",
    "NotText",
    "TooDeep",
    "TooLarge",
    "TooLong",
    "check_json",
    "check_text",
    "loggable",
    "parse_count",
    "parse_json",
]

_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")
_COUNT = re.compile("[0-9]+")


class InputInvalid(PayloadInvalid):
    """Data given to the engine breaks a rule of the input boundary; nothing was stored.
    A `PayloadInvalid` (exit 2, HTTP 422) whatever the field: code catching bad payloads
    catches these too."""

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        self.workflow_id = ""
        self.field = field
        self.message = message
        EngineError.__init__(self, f"{field}: {message}" if field else message)


class NotJsonData(InputInvalid):
    """A value that is not JSON data (a set, bytes, an object, a non-text key) or not JSON text."""


class NotFiniteNumber(InputInvalid):
    """NaN, Infinity or a whole number beyond 64 bits."""


class NotText(InputInvalid):
    """Text holding NUL or a lone surrogate, or bytes that are not UTF-8."""


class TooDeep(InputInvalid):
    """Nested more than `JSON_DEPTH_MAX` levels."""


class TooLarge(InputInvalid):
    """More than `JSON_SIZE_MAX` bytes as JSON text."""


class TooLong(InputInvalid):
    """Text longer than its database column, or empty where a name is needed."""


def _path(field: str, part: str | int) -> str:
    """`payload.a[0]`; a key that is not text is shown escaped, so the path always prints."""
    if isinstance(part, int):
        return f"{field}[{part}]"
    part = _NOT_TEXT.sub(lambda m: f"\\u{ord(m.group()):04x}", part)
    return f"{field}.{part}" if field else part


def _text_problem(text: str, field: str) -> None:
    bad = _NOT_TEXT.search(text)
    if bad is not None:
        what = "the NUL character" if bad.group() == "\x00" else "a lone surrogate"
        raise NotText(field, f"contains {what} (\\u{ord(bad.group()):04x}), which is not text")


def check_json(value: Any, field: str) -> None:
    """Raise the `InputInvalid` subclass for the first rule `value` breaks, naming where."""
    size = 0
    stack: list[tuple[Any, str, int]] = [(value, field, 1)]
    while stack:
        item, where, depth = stack.pop()
        if depth > JSON_DEPTH_MAX:
            raise TooDeep(field, f"nested more than {JSON_DEPTH_MAX} levels deep")
        if item is None or isinstance(item, bool):
            size += 5
        elif isinstance(item, int):
            if abs(item) > INT_MAX:
                raise NotFiniteNumber(where, "a whole number must fit 64 bits")
            size += 20
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise NotFiniteNumber(where, f"{item} is not a JSON number")
            size += 24
        elif isinstance(item, str):
            _text_problem(item, where)
            size += len(item) + 2
        elif isinstance(item, dict):
            size += 2 + 4 * len(item)
            _check_size(size, field)  # before walking a huge mapping
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise NotJsonData(where, f"a key must be text, not {type(key).__name__}")
                _text_problem(key, _path(where, key))
                size += len(key)
                stack.append((sub, _path(where, key), depth + 1))
        elif isinstance(item, list | tuple):
            size += 2 + len(item)
            _check_size(size, field)  # before walking a huge list
            stack.extend((sub, _path(where, i), depth + 1) for i, sub in enumerate(item))
        else:
            raise NotJsonData(where, f"a value of type {type(item).__name__} is not JSON data")
        _check_size(size, field)


def _check_size(size: int, field: str) -> None:
    if size > JSON_SIZE_MAX:
        raise TooLarge(field, f"larger than {JSON_SIZE_MAX // 1024} KiB as JSON")


def check_text(value: Any, field: str, max_length: int, *, required: bool = True) -> str | None:
    """A name or key: text, not empty, at most `max_length` characters, no NUL or
    lone surrogate. None passes when not `required`."""
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise NotJsonData(field, f"must be text, not {type(value).__name__}")
    if not value:
        raise TooLong(field, "must not be empty")
    if len(value) > max_length:
        raise TooLong(field, f"is {len(value)} characters long; at most {max_length} are allowed")
    _text_problem(value, field)
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str | bytes, field: str) -> Any:
    """Parse JSON text and check the value: NaN/Infinity, depth, size and text refused."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NotText(field, f"is not UTF-8 text (byte {exc.start})") from None
    if len(text) > JSON_SIZE_MAX:
        raise TooLarge(field, f"larger than {JSON_SIZE_MAX // 1024} KiB as JSON")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise NotJsonData(
            field, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise TooDeep(field, f"nested more than {JSON_DEPTH_MAX} levels deep") from None
    except ValueError as exc:  # NaN/Infinity, or an integer of more than 4,300 digits
        message = str(exc)
        if "integer string conversion" in message:
            message = "a whole number must fit 64 bits"
        raise NotFiniteNumber(field, message) from None
    check_json(value, field)
    return value


LOG_TEXT_MAX = 64 * 1024


def loggable(value: Any) -> Any:
    """A log line or log field as something every backend stores: NUL and lone surrogates
    become U+FFFD, NaN and Infinity their names, text beyond 64 KiB is cut. Logs are never
    refused: a step's log line must not fail the run that writes it."""
    if isinstance(value, str):
        text = _NOT_TEXT.sub("\ufffd", value)
        return text if len(text) <= LOG_TEXT_MAX else text[:LOG_TEXT_MAX] + "… (cut)"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
        return str(value)
    return value


def parse_count(text: str | None, limit: int = INT_MAX) -> int | None:
    """The whole number `text` spells in ASCII digits (blanks around allowed), at most
    `limit` (a larger one is `limit`); None if it is none. Unlike `str.isdigit` + `int`, no
    text raises: `²` and other Unicode digits are not numbers here, and a number too long
    for `int()` (over 4,300 digits) is just large."""
    value = (text or "").strip()
    if not _COUNT.fullmatch(value):
        return None
    value = value.lstrip("0") or "0"
    return limit if len(value) > len(str(limit)) else min(int(value), limit)
