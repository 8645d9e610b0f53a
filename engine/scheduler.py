"""Cron schedules, fired by the workers themselves: no scheduler service, no leader.

Every worker computes what is due on the database's clock; each fire is recorded per
scheduled instant, and the primary key on (workflow, instant) makes it happen once however
many workers try. An instant is on time for `ON_TIME_SECONDS`: every worker fires every
on-time instant that is not recorded yet, so a fire of a later instant (by a worker that
got there first) never hides an earlier one. Instants missed while nothing ran get, with
`missed: once`, one catch-up fire: the latest missed instant, if no fire is recorded at or
after it. `due_fires` is the pure decision.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from dsl import Machine, next_fire_after

from .errors import EngineError
from .pauses import pause_point

__all__ = [
    "ON_TIME_SECONDS",
    "CronScheduler",
    "Fire",
    "cron_payload",
    "due_fires",
    "next_fire",
]

log = logging.getLogger("durable_yaml.scheduler")
ON_TIME_SECONDS = 60.0  # a fire this late is still on time (not "missed")
MAX_CATCH_UP_STEPS = 100_000
# Tests only: "SPEED:ORIGIN" makes cron time run SPEED times faster than the database's
# clock from ORIGIN, so real worker processes fire an every-minute schedule every few seconds.
SPEED_VARIABLE = "DURABLE_YAML_TEST_CRON_SPEED"


@dataclass(frozen=True)
class Fire:
    at: float
    missed: bool  # later than ON_TIME_SECONDS: it is a catch-up


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def next_fire(machine: Machine, after: float) -> float:
    trigger = machine.trigger
    assert trigger.cron is not None
    return next_fire_after(trigger.cron, trigger.timezone, _dt(after)).timestamp()


def due_fires(
    machine: Machine,
    now: float,
    last: float | None,
    first_seen: float,
    recorded: set[float] | frozenset[float] = frozenset(),
) -> list[Fire]:
    """The fires to make at `now` for a schedule whose latest recorded fire is `last`
    (None: never fired; then only instants after `first_seen`, when this process first
    saw the schedule, count), given the instants `recorded` in the on-time window.

    Every instant in the on-time window (`now - ON_TIME_SECONDS`, `now`] that is not
    recorded fires. If none is on time, `missed: once` makes one catch-up fire for the
    latest missed instant, provided no fire is recorded at or after it.
    """
    window_start = now - ON_TIME_SECONDS
    lower = window_start if last is not None else max(window_start, first_seen)
    on_time = []
    at = next_fire(machine, lower)
    while at <= now:
        on_time.append(at)
        at = next_fire(machine, at)
    if on_time:
        return [Fire(at, False) for at in on_time if at not in recorded]
    if machine.trigger.missed != "once":
        return []
    since = last if last is not None else first_seen
    latest = None
    at = next_fire(machine, since)
    for _ in range(MAX_CATCH_UP_STEPS):
        if at > window_start:
            break
        latest, at = at, next_fire(machine, at)
    return [] if latest is None else [Fire(latest, True)]


def cron_payload(machine: Machine, at: float, last: float | None) -> dict[str, Any]:
    tz = ZoneInfo(machine.trigger.timezone)
    return {
        "timestamp": _dt(at).astimezone(tz).isoformat(),
        "last_timestamp": _dt(last).astimezone(tz).isoformat() if last is not None else None,
        "timezone": machine.trigger.timezone,
        "schedule": machine.trigger.cron,
    }


class CronScheduler:
    """Fires the cron workflows of a catalog; one per worker process, in its own thread.

    `clock` is cron time (the database's clock unless a test injects one); `speed` is how
    many cron seconds pass per real second (tests only)."""

    def __init__(
        self,
        engine: Any,
        wake_executors: Callable[[], None],
        clock: Callable[[], float] | None = None,
        speed: float = 1.0,
    ) -> None:
        self.engine = engine
        self.wake_executors = wake_executors
        self.clock = clock or engine.store.now
        self.speed = speed
        self.first_seen: dict[str, float] = {}
        self.failed: set[tuple[str, float]] = set()  # fires that raised: not tried again

    @classmethod
    def from_environment(cls, engine: Any, wake_executors: Callable[[], None]) -> CronScheduler:
        text = os.environ.get(SPEED_VARIABLE)
        if not text:
            return cls(engine, wake_executors)
        speed_text, _, origin_text = text.partition(":")
        speed, origin = float(speed_text), float(origin_text or 0)
        store_now = engine.store.now
        return cls(engine, wake_executors, lambda: origin + (store_now() - origin) * speed, speed)

    def schedules(self) -> list[Machine]:
        return [m for m in self.engine.catalog.workflows.values() if m.trigger.kind == "cron"]

    def tick(self) -> float:
        """Fire whatever is due; return when the next fire is due (cron time)."""
        now = self.clock()
        machines = self.schedules()
        next_at = now + self.speed
        if not machines:
            return next_at
        ids = [m.workflow_id for m in machines]
        last_fires = self.engine.store.last_fires()
        recorded = self.engine.store.fires_since(now - ON_TIME_SECONDS - 1.0, ids)
        for machine in machines:
            wid = machine.workflow_id
            first = self.first_seen.setdefault(wid, now)
            try:
                fires = due_fires(
                    machine, now, last_fires.get(wid), first, recorded.get(wid, set())
                )
                for fire in fires:
                    if (wid, fire.at) not in self.failed:
                        self._fire(machine, fire)
                next_at = min(next_at, next_fire(machine, now))
            except Exception:  # a poison schedule must not stop the others
                log.exception("schedule %s: could not be evaluated", wid)
        return next_at

    def _fire(self, machine: Machine, fire: Fire) -> None:
        wid = machine.workflow_id
        try:
            previous = [at for at, _ in self.engine.store.fires(wid, 5) if at < fire.at]
            payload = cron_payload(machine, fire.at, max(previous) if previous else None)
            trigger = {"kind": "cron", **payload, "missed": fire.missed}
            pause_point("scheduler.fire")
            new = self.engine.new_run(machine, payload, trigger)
            run_id = self.engine.store.fire_cron(
                wid,
                fire.at,
                new,
                self.engine.store.now(),
                skip_if_active=machine.trigger.overlap == "skip",
            )
        except EngineError as exc:  # the database: try again at the next tick
            log.error("cron fire of %s failed: %s", wid, exc)
            return
        except Exception:
            self.failed.add((wid, fire.at))
            log.exception("cron fire of %s at %s failed; this instant is given up", wid, fire.at)
            return
        if run_id is not None:
            log.info("cron fired %s at %s: run %s", wid, payload["timestamp"], run_id)
            self.wake_executors()

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                next_at = self.tick()
            except Exception as exc:
                log.error("scheduler: %s", exc, exc_info=not isinstance(exc, EngineError))
                next_at = self.clock() + self.speed
            try:
                delay = (next_at - self.clock()) / self.speed
            except Exception:
                delay = 1.0
            stop.wait(max(0.0, min(delay, 1.0)))
