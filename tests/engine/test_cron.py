"""Cron schedules with an injected clock: missed-fire and overlap policies, the cron payload,
and three schedulers racing on one database creating exactly one run per instant."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from dsl import load_workflow
from engine.models import RunStatus
from engine.scheduler import CronScheduler, due_fires
from engine.service import Engine
from engine.settings import resolve_settings
from engine.store import schema as t
from tests.conftest import cli

CRON = Path(__file__).parent / "cron"


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("workflow", "last", "now", "expected"),
    [
        ("hourly-once", "2026-05-01T12:00:00", "2026-05-01T12:30:00", None),
        (
            "hourly-once",
            "2026-05-01T12:00:00",
            "2026-05-01T13:00:00.5",
            ("2026-05-01T13:00:00", False),
        ),
        # down from 12:30 to 14:20: 13:00 and 14:00 were missed; `once` makes one catch-up run
        (
            "hourly-once",
            "2026-05-01T12:00:00",
            "2026-05-01T14:20:00",
            ("2026-05-01T14:00:00", True),
        ),
        ("hourly-skip", "2026-05-01T12:00:00", "2026-05-01T14:20:00", None),
        (
            "hourly-skip",
            "2026-05-01T12:00:00",
            "2026-05-01T14:00:30",
            ("2026-05-01T14:00:00", False),
        ),
    ],
)
def test_due_fire(workflow: str, last: str, now: str, expected: tuple[str, bool] | None) -> None:
    machine = load_workflow(CRON / f"{workflow}.yaml")
    fires = due_fires(machine, ts(now), ts(last), ts(last))
    if expected is None:
        assert fires == []
    else:
        assert [(f.at, f.missed) for f in fires] == [(ts(expected[0]), expected[1])]


def test_a_later_instant_fired_first_never_hides_an_earlier_one() -> None:
    """Issue #10 cause 10: 14:00 was fired (by a host whose clock ran ahead) before 13:00;
    at 13:00:20 the on-time instant 13:00 is not recorded, so it fires."""
    machine = load_workflow(CRON / "hourly-once.yaml")
    now = ts("2026-05-01T13:00:20")
    last = ts("2026-05-01T14:00:00")
    assert [(f.at, f.missed) for f in due_fires(machine, now, last, now)] == [
        (ts("2026-05-01T13:00:00"), False)
    ]
    assert due_fires(machine, now, last, now, {ts("2026-05-01T13:00:00")}) == []
    # a catch-up is made only for the latest missed instant with no fire at or after it
    assert due_fires(machine, ts("2026-05-01T13:30:00"), last, now) == []


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    e = Engine(resolve_settings(db=db_url, workflows=str(CRON)), import_steps=False)
    yield e
    e.close()


def fired(engine: Engine, workflow: str) -> list[tuple[float, str | None]]:
    return sorted(engine.store.fires(workflow))


def test_timetable_missed_once_and_payload(engine: Engine) -> None:
    clock = Clock(ts("2026-05-01T12:30:00"))
    scheduler = CronScheduler(engine, lambda: None, clock)
    scheduler.tick()
    assert fired(engine, "hourly-once") == []
    clock.now = ts("2026-05-01T13:00:00.2")
    scheduler.tick()
    ((at, run_id),) = fired(engine, "hourly-once")
    assert at == ts("2026-05-01T13:00:00") and run_id is not None
    run = engine.store.get_run(run_id)
    assert run.payload == {
        "timestamp": "2026-05-01T13:00:00+00:00",
        "last_timestamp": None,
        "timezone": "UTC",
        "schedule": "0 * * * *",
    }
    # nothing ran from 13:00 to 16:20: one catch-up run for 16:00, then the timetable
    later = CronScheduler(engine, lambda: None, Clock(ts("2026-05-01T16:20:00")))
    later.tick()
    fires = fired(engine, "hourly-once")
    assert [f[0] for f in fires] == [ts("2026-05-01T13:00:00"), ts("2026-05-01T16:00:00")]
    catch_up = engine.store.get_run(fires[1][1] or "")
    assert catch_up.trigger["missed"] is True
    assert catch_up.payload["last_timestamp"] == "2026-05-01T13:00:00+00:00"
    assert [f[0] for f in fired(engine, "hourly-skip")] == [ts("2026-05-01T13:00:00")]


def test_overlap_skip_waits_for_the_previous_run(engine: Engine) -> None:
    clock = Clock(ts("2026-05-01T11:55:00"))
    scheduler = CronScheduler(engine, lambda: None, clock)
    scheduler.tick()
    clock.now = ts("2026-05-01T12:00:01")
    scheduler.tick()
    clock.now = ts("2026-05-01T12:10:01")
    scheduler.tick()
    fires = fired(engine, "overlap")
    assert [(f[0], f[1] is not None) for f in fires] == [
        (ts("2026-05-01T12:00:00"), True),
        (ts("2026-05-01T12:10:00"), False),
    ]
    engine.store.request_cancel(fires[0][1] or "", clock.now)  # the first run ends
    clock.now = ts("2026-05-01T12:20:01")
    scheduler.tick()
    assert fired(engine, "overlap")[-1][1] is not None


def test_three_schedulers_one_run_per_instant(db_url: str) -> None:
    engines = [
        Engine(resolve_settings(db=db_url, workflows=str(CRON)), import_steps=False)
        for _ in range(3)
    ]
    clocks = [Clock(ts("2026-05-01T09:59:00")) for _ in engines]
    schedulers = [CronScheduler(e, lambda: None, c) for e, c in zip(engines, clocks, strict=True)]
    for s in schedulers:
        s.tick()
    instants = [ts(f"2026-05-01T{h:02d}:00:00.3") for h in range(10, 16)]
    for instant in instants:
        barrier = threading.Barrier(3)
        errors: list[BaseException] = []

        def tick(
            i: int,
            at: float = instant,
            b: threading.Barrier = barrier,
            errors: list[BaseException] = errors,
        ) -> None:
            clocks[i].now = at
            b.wait()
            try:
                schedulers[i].tick()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=tick, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
    with engines[0].store.engine.connect() as c:
        per_instant = c.execute(
            sa.select(t.runs.c.workflow_id, t.runs.c.payload).where(
                t.runs.c.workflow_id == "hourly-once"
            )
        ).all()
    stamps = sorted(p["timestamp"] for _, p in per_instant)
    assert stamps == [f"2026-05-01T{h:02d}:00:00+00:00" for h in range(10, 16)]
    assert all(r.status == RunStatus.QUEUED for r in engines[0].store.list_runs(limit=100))
    for e in engines:
        e.close()


def test_schedules_list(tmp_path: Path, sqlite_url: str) -> None:
    result = cli(
        "schedules", "list", "--json", "--workflows", str(CRON), "--db", sqlite_url, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    import json

    data = {s["workflow"]: s for s in json.loads(result.stdout)}
    assert set(data) == {"hourly-once", "hourly-skip", "overlap"}
    paris = data["overlap"]
    assert paris["cron"] == "*/10 * * * *" and paris["timezone"] == "Europe/Paris"
    assert len(paris["next"]) == 5
    first = paris["next"][0]
    assert first["utc"].endswith("+00:00") and first["local"][-6:] in ("+01:00", "+02:00")
    text = cli("schedules", "list", "--workflows", str(CRON), "--db", sqlite_url, cwd=tmp_path)
    assert "hourly-once" in text.stdout and "0 * * * *" in text.stdout


def test_schedulers_record_each_instant_so_a_fast_host_hides_nothing(engine: Engine) -> None:
    """Issue #10 cause 10, on the database: a host an hour ahead fires 14:00 before the
    other fires 13:00; the slow one still fires 13:00 (once), and 15:00 fires once."""
    fast_clock, slow_clock = Clock(ts("2026-05-01T13:59:50")), Clock(ts("2026-05-01T12:59:50"))
    fast = CronScheduler(engine, lambda: None, fast_clock)
    slow = CronScheduler(engine, lambda: None, slow_clock)
    fast.tick()
    slow.tick()
    fast_clock.now = ts("2026-05-01T14:00:10")
    fast.tick()
    slow_clock.now = ts("2026-05-01T13:00:10")
    slow.tick()
    slow.tick()
    fast_clock.now = slow_clock.now = ts("2026-05-01T15:00:10")
    fast.tick()
    slow.tick()
    stamps = [at for at, run in fired(engine, "hourly-once") if run is not None]
    assert stamps == [ts(f"2026-05-01T{h}:00:00") for h in (13, 14, 15)]


def test_a_fire_that_raises_is_given_up_and_the_scheduler_goes_on(engine: Engine) -> None:
    """Issue #10 cause 9: anything raised while firing (not only EngineError) is logged,
    that instant is given up (never retried in a loop), and the next instant fires."""
    from engine.pauses import pause_at

    clock = Clock(ts("2026-05-01T12:59:50"))
    scheduler = CronScheduler(engine, lambda: None, clock)
    scheduler.tick()
    raised: list[int] = []

    def explode() -> None:
        raised.append(1)
        raise RuntimeError("a bug while firing")

    with pause_at("scheduler.fire", explode):
        clock.now = ts("2026-05-01T13:00:01")
        scheduler.tick()
        tried = len(raised)
        clock.now = ts("2026-05-01T13:00:02")
        scheduler.tick()
        assert len(raised) == tried, "a given-up instant is not tried again"
    assert tried >= 1 and fired(engine, "hourly-once") == []
    clock.now = ts("2026-05-01T14:00:01")
    scheduler.tick()
    assert [at for at, _ in fired(engine, "hourly-once")] == [ts("2026-05-01T14:00:00")]
