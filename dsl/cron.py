"""Pure cron arithmetic: when does a schedule fire next, in its own timezone.

Rules for daylight-saving changes (documented in the README):
- A local time that does not exist (the skipped hour of a spring-forward day) fires at the
  instant the clock jumps to, so `30 2 * * *` fires at 03:30 that day: no fire is lost.
- A local time that happens twice (the repeated hour of a fall-back day) fires once, at its
  first occurrence - unless the hour field is `*`: an hourly-or-faster schedule follows real
  time and fires in both passes of the repeated hour, as its interval says.
- Instants are de-duplicated, so nothing fires twice.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["CronError", "check_cron", "check_timezone", "next_fire_after", "next_fires"]


class CronError(ValueError):
    """A cron expression or timezone is not valid; the message says why."""


def check_cron(expr: str) -> None:
    fields = expr.split()
    if len(fields) != 5:
        raise CronError(
            f"cron {expr!r} has {len(fields)} fields; write 5: minute hour day-of-month month day-of-week"
        )
    for field in fields:  # croniter's `R` fires at random, `H` at a hashed value
        letters = set(re.findall(r"[a-z]+", field.lower()))
        if letters & {"r", "h"}:
            raise CronError(
                f"cron {expr!r} uses `R`/`H` (random or hashed times), which are not"
                f" supported; write the minutes and hours to fire at"
            )
    from croniter import CroniterBadDateError, croniter  # only where a schedule is checked

    if not croniter.is_valid(expr):
        raise CronError(f"cron {expr!r} is not a valid expression")
    try:  # a day that no month has (`* * 31 2 *`) is valid syntax that never fires
        croniter(expr, datetime(2000, 1, 1)).get_next(datetime)
    except (CroniterBadDateError, ValueError, OverflowError):
        raise CronError(f"cron {expr!r} never fires: no month has that day") from None


def check_timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError, UnicodeError):  # OSError: name too long
        raise CronError(
            f"unknown timezone {name!r}; use an IANA name like Europe/Paris or UTC"
        ) from None


def _instants(naive: datetime, tz: ZoneInfo, follow_real_time: bool) -> list[datetime]:
    """The UTC instants at which the local wall-clock time `naive` fires."""
    first = naive.replace(tzinfo=tz, fold=0)
    second = naive.replace(tzinfo=tz, fold=1)
    first_utc = first.astimezone(UTC)
    if first.utcoffset() == second.utcoffset():
        return [first_utc]
    if first_utc.astimezone(tz).replace(tzinfo=None) != naive:
        return [first_utc]  # does not exist locally: fires when the clock jumps past it
    second_utc = second.astimezone(UTC)
    return [first_utc, second_utc] if follow_real_time else [first_utc]


def next_fire_after(expr: str, tz_name: str, after: datetime) -> datetime:
    """The first fire strictly after `after` (an aware datetime), as an aware UTC datetime.
    CronError if the expression or timezone is bad or the schedule never fires again."""
    if after.tzinfo is None:
        raise ValueError("`after` must be timezone-aware")
    tz = check_timezone(tz_name)
    follow_real_time = expr.split()[1] in ("*", "*/1")
    after_utc = after.astimezone(UTC)
    local = after_utc.astimezone(tz).replace(tzinfo=None)
    fast = _steady_next(expr, tz, after_utc, local)
    if fast is not None:
        return fast
    from croniter import CroniterBadDateError

    # Near a change of offset, start a few hours early: a repeated or skipped hour maps local
    # times across offsets.
    it = _iterator(expr, local - timedelta(hours=3))
    best: datetime | None = None
    while True:
        try:
            naive: datetime = it.get_next(datetime)
        except (CroniterBadDateError, ValueError, OverflowError):
            if best is not None:
                return best
            raise CronError(f"cron {expr!r} never fires after {after_utc.isoformat()}") from None
        if best is not None and naive > best.astimezone(tz).replace(tzinfo=None) + timedelta(
            hours=3
        ):
            return best
        for instant in _instants(naive, tz, follow_real_time):
            if instant > after_utc and (best is None or instant < best):
                best = instant


def _iterator(expr: str, start: datetime) -> Any:
    from croniter import croniter  # only where a schedule is computed

    try:
        return croniter(expr, start)
    except (ValueError, KeyError) as exc:  # croniter's errors are ValueErrors
        raise CronError(f"cron {expr!r} is not a valid expression: {exc}") from None


def _steady_next(expr: str, tz: ZoneInfo, after_utc: datetime, local: datetime) -> datetime | None:
    """The next fire when the offset stays the same from 3 hours before `after` to 3 hours
    after the candidate (no change of offset in between, so local and UTC times map one to
    one); None when that does not hold or the schedule does not fire within a week, and the
    careful search decides."""
    from croniter import CroniterBadDateError

    try:
        naive: datetime = _iterator(expr, local).get_next(datetime)
    except (CroniterBadDateError, ValueError, OverflowError):
        return None
    candidate = naive.replace(tzinfo=tz).astimezone(UTC)
    if not after_utc < candidate < after_utc + timedelta(days=7):
        return None
    margin = timedelta(hours=3)
    before, later = (after_utc - margin).astimezone(tz), (candidate + margin).astimezone(tz)
    if before.utcoffset() != later.utcoffset():
        return None
    return candidate


def next_fires(expr: str, tz_name: str, after: datetime, count: int) -> list[datetime]:
    """The next `count` fires after `after`, in order."""
    out: list[datetime] = []
    for _ in range(count):
        after = next_fire_after(expr, tz_name, after)
        out.append(after)
    return out
