"""Cron schedules, fired by the workers themselves: no scheduler service, no leader.

Every worker computes what is due; the database's primary key on (workflow, instant) makes a
fire happen once however many workers try. `due_fire` is the pure decision.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from dsl import Machine, next_fire_after

from .errors import EngineError

__all__ = ["ON_TIME_SECONDS", "CronScheduler", "Fire", "cron_payload", "due_fire", "next_fire"]

log = logging.getLogger("durable_yaml.scheduler")
ON_TIME_SECONDS = 60.0  # a fire this late is still on time (not "missed")
MAX_CATCH_UP_STEPS = 100_000


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


def due_fire(machine: Machine, last: float, now: float) -> Fire | None:
    """The one fire to make now for a schedule last fired (or first seen) at `last`.

    Several instants may have passed while nothing ran: only the latest is fired, once, and
    with `missed: skip` only if it is on time.
    """
    latest = None
    at = next_fire(machine, last)
    for _ in range(MAX_CATCH_UP_STEPS):
        if at > now:
            break
        latest = at
        at = next_fire(machine, at)
    else:
        latest = None if at > now else at
    if latest is None:
        return None
    missed = now - latest > ON_TIME_SECONDS
    if missed and machine.trigger.missed == "skip":
        return None
    return Fire(latest, missed)


def cron_payload(machine: Machine, at: float, last: float | None) -> dict[str, Any]:
    tz = ZoneInfo(machine.trigger.timezone)
    return {
        "timestamp": _dt(at).astimezone(tz).isoformat(),
        "last_timestamp": _dt(last).astimezone(tz).isoformat() if last is not None else None,
        "timezone": machine.trigger.timezone,
        "schedule": machine.trigger.cron,
    }


class CronScheduler:
    """Fires the cron workflows of a catalog; one per worker process, in its own thread."""

    def __init__(
        self,
        engine: Any,
        wake_executors: Callable[[], None],
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.engine = engine
        self.wake_executors = wake_executors
        self.clock = clock or engine.store.now
        self.first_seen: dict[str, float] = {}
        self.skipped: dict[str, float] = {}

    def schedules(self) -> list[Machine]:
        return [m for m in self.engine.catalog.workflows.values() if m.trigger.kind == "cron"]

    def tick(self) -> float:
        """Fire whatever is due; return when the next fire is due (epoch seconds)."""
        now = self.clock()
        last_fires = self.engine.store.last_fires()
        next_at = now + 1.0
        for machine in self.schedules():
            wid = machine.workflow_id
            first = self.first_seen.setdefault(wid, now)
            last = max(last_fires.get(wid, first), self.skipped.get(wid, 0.0))
            fire = due_fire(machine, last, now)
            if fire is not None:
                self._fire(machine, fire, last_fires.get(wid))
                last = fire.at
            else:
                # a skipped catch-up is not looked at again
                self.skipped[wid] = max(last, self._latest_before(machine, last, now))
            next_at = min(next_at, next_fire(machine, max(last, now)))
        return next_at

    def _latest_before(self, machine: Machine, last: float, now: float) -> float:
        at, latest = next_fire(machine, last), last
        for _ in range(MAX_CATCH_UP_STEPS):
            if at > now:
                break
            latest, at = at, next_fire(machine, at)
        return latest

    def _fire(self, machine: Machine, fire: Fire, last: float | None) -> None:
        payload = cron_payload(machine, fire.at, last)
        trigger = {"kind": "cron", **payload, "missed": fire.missed}
        try:
            new = self.engine.new_run(machine, payload, trigger)
            run_id = self.engine.store.fire_cron(
                machine.workflow_id,
                fire.at,
                new,
                self.clock(),
                skip_if_active=machine.trigger.overlap == "skip",
            )
        except EngineError as exc:
            log.error("cron fire of %s failed: %s", machine.workflow_id, exc)
            return
        if run_id is not None:
            log.info(
                "cron fired %s at %s: run %s", machine.workflow_id, payload["timestamp"], run_id
            )
            self.wake_executors()

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                next_at = self.tick()
            except EngineError as exc:
                log.error("scheduler: %s", exc)
                next_at = self.clock() + 1.0
            stop.wait(max(0.0, min(next_at - self.clock(), 1.0)))
