"""Cron fires: exactly one per (workflow, scheduled instant), by the database's primary key.
Fires are recorded per instant (never a high-water mark), so any instant's fire can be
looked up and none hides another."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..models import ACTIVE_STATUSES, NewRun
from . import schema as t
from .db import Db
from .events import new_run_values
from .sqlutil import INSERT_RUN

__all__ = ["Schedules"]

_ACTIVE = [s.value for s in ACTIVE_STATUSES]


class Schedules:
    def __init__(self, db: Db) -> None:
        self.db = db
        self.engine = db.engine

    def fire_cron(
        self, workflow_id: str, fire_at: float, new: NewRun, now: float, *, skip_if_active: bool
    ) -> str | None:
        """Record the fire of `workflow_id` at `fire_at` and create its run, atomically.
        None if another scheduler fired this instant already, or (with `skip_if_active`)
        the schedule's previous run is still active: the fire is then recorded as skipped."""

        def work(c: Connection) -> str | None:
            stamp = self.db.lock_names(c, [new.first_wait_event], now)  # names before rows
            if not self.db.insert_ignore(
                c,
                t.cron_fires,
                {"workflow_id": workflow_id, "fire_at": fire_at, "run_id": None, "created_at": now},
                ["workflow_id", "fire_at"],
            ):
                return None
            if skip_if_active:
                active = c.execute(
                    select(t.runs.c.id)
                    .join(t.cron_fires, t.cron_fires.c.run_id == t.runs.c.id)
                    .where(t.cron_fires.c.workflow_id == workflow_id, t.runs.c.status.in_(_ACTIVE))
                    .limit(1)
                ).first()
                if active is not None:
                    return None
            c.execute(INSERT_RUN, new_run_values(new, stamp))
            c.execute(
                sa.update(t.cron_fires)
                .where(t.cron_fires.c.workflow_id == workflow_id, t.cron_fires.c.fire_at == fire_at)
                .values(run_id=new.id)
            )
            self.db.notify(c)
            return new.id

        return self.db.transact(work)

    def last_fires(self) -> dict[str, float]:
        """The latest recorded fire instant of every scheduled workflow."""
        with self.db.read() as c:
            rows = c.execute(
                select(t.cron_fires.c.workflow_id, func.max(t.cron_fires.c.fire_at)).group_by(
                    t.cron_fires.c.workflow_id
                )
            ).all()
        return {r[0]: float(r[1]) for r in rows}

    def fires_since(self, since: float, workflow_ids: Sequence[str]) -> dict[str, set[float]]:
        """Per workflow of `workflow_ids`, the instants fired (or skipped) at or after
        `since` (read by primary key)."""
        if not workflow_ids:
            return {}
        with self.db.read() as c:
            rows = c.execute(
                select(t.cron_fires.c.workflow_id, t.cron_fires.c.fire_at).where(
                    t.cron_fires.c.workflow_id.in_(list(workflow_ids)),
                    t.cron_fires.c.fire_at >= since,
                )
            ).all()
        out: dict[str, set[float]] = {}
        for wid, at in rows:
            out.setdefault(wid, set()).add(float(at))
        return out

    def fires(self, workflow_id: str, limit: int = 100) -> list[tuple[float, str | None]]:
        """(instant, run id or None if skipped), newest first."""
        with self.db.read() as c:
            rows = c.execute(
                select(t.cron_fires.c.fire_at, t.cron_fires.c.run_id)
                .where(t.cron_fires.c.workflow_id == workflow_id)
                .order_by(t.cron_fires.c.fire_at.desc())
                .limit(limit)
            ).all()
        return [(float(r[0]), r[1]) for r in rows]
