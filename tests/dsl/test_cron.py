"""Pure next-fire computation, by table: SPEC's examples, steps, ranges, lists, day-of-month
with day-of-week, and daylight-saving changes in Europe/Paris and America/New_York."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from dsl.cron import CronError, check_cron, check_timezone, next_fire_after, next_fires


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# (cron, timezone, after (UTC), the next fires (UTC))
TABLE = [
    ("* * * * *", "UTC", "2026-01-01T10:00:30", ["2026-01-01T10:01:00", "2026-01-01T10:02:00"]),
    ("30 * * * *", "UTC", "2026-01-01T10:30:00", ["2026-01-01T11:30:00", "2026-01-01T12:30:00"]),
    ("*/5 * * * *", "UTC", "2026-01-01T10:03:00", ["2026-01-01T10:05:00", "2026-01-01T10:10:00"]),
    (
        "0 9-11 * * *",
        "UTC",
        "2026-01-01T09:30:00",
        ["2026-01-01T10:00:00", "2026-01-01T11:00:00", "2026-01-02T09:00:00"],
    ),
    ("15,45 8 * * *", "UTC", "2026-01-01T08:20:00", ["2026-01-01T08:45:00", "2026-01-02T08:15:00"]),
    ("0 0 * * 1-5", "UTC", "2026-01-02T12:00:00", ["2026-01-05T00:00:00", "2026-01-06T00:00:00"]),
    # day-of-month AND day-of-week both restricted: cron fires when either matches (OR)
    (
        "0 12 13 * 5",
        "UTC",
        "2026-02-01T00:00:00",
        ["2026-02-06T12:00:00", "2026-02-13T12:00:00", "2026-02-20T12:00:00"],
    ),
    ("0 0 1 1 *", "UTC", "2026-06-01T00:00:00", ["2027-01-01T00:00:00"]),
    (
        "0 9 * * *",
        "Europe/Paris",
        "2026-01-15T00:00:00",
        ["2026-01-15T08:00:00", "2026-01-16T08:00:00"],
    ),
    ("0 9 * * *", "Europe/Paris", "2026-07-15T00:00:00", ["2026-07-15T07:00:00"]),
    # Paris spring forward 2026-03-29 02:00 -> 03:00: 02:30 does not exist, fires at the jump
    (
        "30 2 * * *",
        "Europe/Paris",
        "2026-03-28T12:00:00",
        ["2026-03-29T01:30:00", "2026-03-30T00:30:00"],
    ),
    # hourly across the gap: 01:30 CET, then 03:30 CEST (02:30 is the same instant), 04:30
    (
        "30 * * * *",
        "Europe/Paris",
        "2026-03-29T00:00:00",
        ["2026-03-29T00:30:00", "2026-03-29T01:30:00", "2026-03-29T02:30:00"],
    ),
    # Paris fall back 2026-10-25 03:00 -> 02:00: 02:30 happens twice, a daily job fires once
    (
        "30 2 * * *",
        "Europe/Paris",
        "2026-10-24T12:00:00",
        ["2026-10-25T00:30:00", "2026-10-26T01:30:00"],
    ),
    # ...while an hourly job fires in both passes of the repeated hour (real time)
    (
        "30 * * * *",
        "Europe/Paris",
        "2026-10-24T23:00:00",
        [
            "2026-10-24T23:30:00",
            "2026-10-25T00:30:00",
            "2026-10-25T01:30:00",
            "2026-10-25T02:30:00",
        ],
    ),
    # New York spring forward 2026-03-08 02:00 -> 03:00
    (
        "30 2 * * *",
        "America/New_York",
        "2026-03-07T12:00:00",
        ["2026-03-08T07:30:00", "2026-03-09T06:30:00"],
    ),
    (
        "0 2 * * *",
        "America/New_York",
        "2026-03-07T12:00:00",
        ["2026-03-08T07:00:00", "2026-03-09T06:00:00"],
    ),
    # New York fall back 2026-11-01 02:00 -> 01:00: 01:30 happens twice
    (
        "30 1 * * *",
        "America/New_York",
        "2026-10-31T12:00:00",
        ["2026-11-01T05:30:00", "2026-11-02T06:30:00"],
    ),
    (
        "*/30 * * * *",
        "America/New_York",
        "2026-11-01T04:50:00",
        [
            "2026-11-01T05:00:00",
            "2026-11-01T05:30:00",
            "2026-11-01T06:00:00",
            "2026-11-01T06:30:00",
            "2026-11-01T07:00:00",
        ],
    ),
]


@pytest.mark.parametrize(("expr", "tz", "after", "expected"), TABLE)
def test_next_fires(expr: str, tz: str, after: str, expected: list[str]) -> None:
    fires = next_fires(expr, tz, utc(after), len(expected))
    assert [f.replace(tzinfo=None).isoformat() for f in fires] == expected


def test_fire_is_strictly_after() -> None:
    assert next_fire_after("0 * * * *", "UTC", utc("2026-01-01T10:00:00")) == utc(
        "2026-01-01T11:00:00"
    )


@pytest.mark.parametrize(
    ("tz", "start"),
    [
        ("Europe/Paris", "2026-03-26T00:00:00"),  # clocks go forward on 29 March
        ("Europe/Paris", "2026-10-22T00:00:00"),  # and back on 25 October
        ("America/New_York", "2026-03-05T00:00:00"),  # forward on 8 March
        ("America/New_York", "2026-10-29T00:00:00"),  # back on 1 November
    ],
)
def test_no_instant_fires_twice_across_dst_changes(tz: str, start: str) -> None:
    fires = next_fires("*/30 * * * *", tz, utc(start), 48 * 7)
    offsets = {f.astimezone(ZoneInfo(tz)).utcoffset() for f in fires}
    assert len(offsets) == 2, "the window spans a daylight-saving change"
    assert len(set(fires)) == len(fires)
    assert all(b > a for a, b in itertools.pairwise(fires))
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(fires)}
    assert gaps == {1800.0}, "a half-hourly schedule follows real time through DST"


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("61 * * * *", "is not a valid expression"),
        ("* * * *", "has 4 fields"),
        ("0 * * * * *", "has 6 fields"),
        ("R * * * *", "uses `R`/`H`"),
        ("* r * * *", "uses `R`/`H`"),
        ("R(0-30) * * * *", "uses `R`/`H`"),
        ("H * * * *", "uses `R`/`H`"),
        ("H/5 * * * *", "uses `R`/`H`"),
        ("0 0 * * H", "uses `R`/`H`"),
    ],
)
def test_bad_cron(expr: str, message: str) -> None:
    with pytest.raises(CronError, match=message):
        check_cron(expr)


@pytest.mark.parametrize("expr", ["0 0 * mar,apr thu", "0 0 * * sun-sat", "0 0 L * *"])
def test_month_and_day_names_are_not_random_fields(expr: str) -> None:
    check_cron(expr)


def test_bad_timezone() -> None:
    with pytest.raises(CronError, match="unknown timezone 'Mars/Olympus'"):
        check_timezone("Mars/Olympus")


@pytest.mark.parametrize("name", ["x" * 5000, "../../etc/passwd", "Europe/\x00Paris", "é/ü"])
def test_hostile_timezone_names_are_cron_errors(name: str) -> None:
    with pytest.raises(CronError, match="unknown timezone"):
        check_timezone(name)


def test_the_steady_shortcut_agrees_with_the_careful_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Away from a change of offset the next fire is found from one croniter step; around
    one, a search from 3 hours early decides. Both give the same fire for every instant of a
    year, in zones with and without daylight saving (half-hour ones included)."""
    import random
    from datetime import timedelta

    import dsl.cron as cron

    shortcut = cron._steady_next
    rng = random.Random(7)
    exprs = ["* * * * *", "30 * * * *", "30 2 * * *", "*/7 3-5 * * 1-5", "0 12 1 * *"]
    zones = ["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
    for _ in range(600):
        expr, tz = rng.choice(exprs), rng.choice(zones)
        after = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(365 * 86400))
        if rng.random() < 0.3:  # exactly on a minute, often a fire itself
            after = after.replace(second=0)
        fast = next_fire_after(expr, tz, after)
        monkeypatch.setattr(cron, "_steady_next", lambda *a: None)
        careful = next_fire_after(expr, tz, after)
        monkeypatch.setattr(cron, "_steady_next", shortcut)
        assert fast == careful, (expr, tz, after)
