"""Durations as users write them: 500ms, 3s, 5m, 2h, 1d, "3 seconds", ISO-8601 "PT3S", or seconds."""

from __future__ import annotations

import re

__all__ = ["DurationError", "parse_duration"]

_UNITS = {
    "ms": 0.001, "msec": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}  # fmt: skip
_HUMAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")
_ISO = re.compile(
    r"^P(?:(?P<w>\d+(?:\.\d+)?)W)?(?:(?P<d>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


class DurationError(ValueError):
    """The text is not a duration; the message says what is accepted."""


def parse_duration(value: object) -> float:
    """Return the duration in seconds (a non-negative float)."""
    if isinstance(value, bool):
        raise DurationError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise DurationError(f"a duration cannot be negative ({value})")
        return float(value)
    if not isinstance(value, str):
        raise DurationError(f"{value!r} is not a duration")
    text = value.strip()
    human = _HUMAN.match(text)
    if human:
        unit = human.group(2).lower()
        if unit in _UNITS:
            return float(human.group(1)) * _UNITS[unit]
        raise DurationError(
            f"unknown unit `{human.group(2)}` in duration {value!r}; use ms, s, m, h or d"
        )
    iso = _ISO.match(text.upper())
    if iso and text.upper() not in ("P", "PT") and any(iso.groupdict().values()):
        parts = {k: float(v) for k, v in iso.groupdict().items() if v}
        return (
            parts.get("w", 0) * 604800
            + parts.get("d", 0) * 86400
            + parts.get("h", 0) * 3600
            + parts.get("m", 0) * 60
            + parts.get("s", 0)
        )
    raise DurationError(
        f"{value!r} is not a duration; write e.g. 500ms, 3s, 5m, 2h, 1d, '3 seconds' or PT3S"
    )
