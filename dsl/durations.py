"""Durations as users write them: 500ms, 3s, 5m, 2h, 1d, "3 seconds", ISO-8601 "PT3S", or seconds."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

from .limits import LATEST_YEAR, SECONDS_MAX

__all__ = ["DurationError", "InstantError", "parse_duration", "parse_instant"]

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
    """Return the duration in seconds: a finite float from 0 to `SECONDS_MAX` (ten years)."""
    seconds = _seconds(value)
    if not math.isfinite(seconds):
        raise DurationError(f"{value!r} is not a finite duration")
    if seconds > SECONDS_MAX:
        raise DurationError(f"{value!r} is longer than the longest duration allowed, 10 years")
    return seconds


def _seconds(value: object) -> float:
    if isinstance(value, bool):
        raise DurationError(f"{value!r} is not a duration")
    if isinstance(value, int) and abs(value) > SECONDS_MAX:  # float() of a huge int overflows
        shown = str(value) if value.bit_length() < 64 else f"a {value.bit_length()}-bit number"
        if value < 0:
            raise DurationError(f"a duration cannot be negative ({shown})")
        raise DurationError(f"{shown} is longer than the longest duration allowed, 10 years")
    if isinstance(value, int | float):
        if math.isnan(value):
            raise DurationError(f"{value!r} is not a finite duration")
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


class InstantError(ValueError):
    """The text is not a usable ISO-8601 timestamp; the message says why."""


def parse_instant(value: object) -> float:
    """An ISO-8601 timestamp (UTC when it has no offset) as a POSIX timestamp, before the
    year `LATEST_YEAR` + 1 so that every timezone can still show it."""
    if not isinstance(value, str):
        raise InstantError(f"expected an ISO-8601 timestamp, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InstantError(f"{value!r} is not an ISO-8601 timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if not 1970 <= parsed.year <= LATEST_YEAR:
        raise InstantError(f"{value!r} is out of range: use a year from 1970 to {LATEST_YEAR}")
    return parsed.timestamp()
