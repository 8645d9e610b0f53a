"""Durations given through the Python API and HTTP: seconds or text like "5m"."""

from __future__ import annotations

from dsl import DurationError, parse_duration

from .inputs import InputInvalid

__all__ = ["to_seconds"]


def to_seconds(value: float | str | None, field: str = "delay") -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise InputInvalid(field, str(exc)) from None
