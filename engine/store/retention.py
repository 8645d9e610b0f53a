"""Retention: deleting finished runs and everything that hangs off them, in small batches.

A batch is one short transaction: it deletes at most `batch` runs (conditionally: still
finished, still old, no active parent or child, so a run that `resume` reopened in between
stays) and then what only they needed: steps, attempts, logs, tags, inbox rows, tokens, the
events they consumed, sent or were triggered by that no remaining run needs, cron fires
older than the newest of their schedule, and idempotency keys pointing only at them. It
never touches an active run's row, so it holds no lock a claim needs; on SQLite it holds the
write lock only for the batch's few milliseconds. Definitions that no run uses, that were
not saved (by any process, which re-saves hourly) for a day and that no current workflow
file has, go last.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection

from ..models import ACTIVE_STATUSES, RunStatus
from ..pauses import pause_point
from . import schema as t
from .db import Db

__all__ = ["DEFINITION_GRACE", "Retention"]

_ACTIVE = [s.value for s in ACTIVE_STATUSES]
DEFINITION_GRACE = 86400.0  # a definition saved this recently is kept (a process may use it)


def _purgeable(runs: Any, before: float, statuses: Sequence[RunStatus]) -> Any:
    parent, child = t.runs.alias("parent"), t.runs.alias("child")
    return sa.and_(
        runs.c.status.in_([s.value for s in statuses]),
        runs.c.created_at < before,
        runs.c.finished_at < before,
        ~sa.exists().where(parent.c.id == runs.c.parent_run_id, parent.c.status.in_(_ACTIVE)),
        ~sa.exists().where(child.c.parent_run_id == runs.c.id, child.c.status.in_(_ACTIVE)),
    )


class Retention:
    def __init__(self, db: Db) -> None:
        self.db = db

    def purge(
        self, before: float, statuses: Sequence[RunStatus], keep: set[str], batch: int
    ) -> Iterator[int]:
        """Delete finished runs of `statuses` that finished before `before`, one batch per
        transaction; yields how many each batch deleted, then cleans unused definitions."""
        statuses = [s for s in statuses if s not in ACTIVE_STATUSES]
        while statuses:
            chosen, n = self.db.transact(
                functools.partial(self._batch, before=before, statuses=statuses, size=batch)
            )
            if not chosen:
                break
            if n:  # none when another purge deleted this batch first: there may be more
                yield n
        self.db.transact(functools.partial(self._definitions, keep=keep))

    def count(self, before: float, statuses: Sequence[RunStatus]) -> int:
        """How many runs a purge with these arguments would delete now."""
        statuses = [s for s in statuses if s not in ACTIVE_STATUSES]
        q = select(func.count()).select_from(t.runs).where(_purgeable(t.runs, before, statuses))
        with self.db.read() as c:
            return int(c.execute(q).scalar_one())

    def _batch(
        self, c: Connection, before: float, statuses: Sequence[RunStatus], size: int
    ) -> tuple[int, int]:
        """(how many runs were chosen, how many of them this batch deleted)."""
        chosen = list(
            c.execute(
                select(t.runs.c.id).where(_purgeable(t.runs, before, statuses)).limit(size)
            ).scalars()
        )
        if not chosen:
            return 0, 0
        pause_point("store.purge.selected")
        gone = c.execute(
            delete(t.runs)
            .where(t.runs.c.id.in_(chosen), _purgeable(t.runs, before, statuses))
            .returning(
                t.runs.c.id,
                t.runs.c.workflow_id,
                t.runs.c.idempotency_key,
                t.runs.c.trigger,
                t.runs.c.created_at,
            )
        ).all()
        ids = [r.id for r in gone]
        if not ids:
            return len(chosen), 0
        consumed = set(
            c.execute(
                select(t.inbox.c.event_id).where(
                    t.inbox.c.run_id.in_(ids), t.inbox.c.event_id.isnot(None)
                )
            ).scalars()
        )
        for table in (t.steps, t.attempts, t.logs, t.run_tags, t.inbox, t.tokens):
            c.execute(delete(table).where(table.c.run_id.in_(ids)))
        triggered = {(r.trigger or {}).get("event_id") for r in gone} - {None}
        self._events(c, ids, consumed | triggered)
        self._cron_fires(c, ids)
        self._keys(c, gone)
        # finished children of a purged parent no longer point at it
        c.execute(
            update(t.runs)
            .where(t.runs.c.parent_run_id.in_(ids))
            .values(parent_run_id=None, parent_step=None, parent_attempt=None)
        )
        return len(chosen), len(ids)

    def _events(self, c: Connection, ids: list[str], candidates: set[Any]) -> None:
        """Events the purged runs sent, consumed or were triggered by, unless a remaining
        run consumed one or was triggered by it (runs an event triggers share its
        created_at, so that look is an index lookup)."""
        sent = set(
            c.execute(select(t.events.c.id).where(t.events.c.source_run_id.in_(ids))).scalars()
        )
        for event_id in sorted(sent | {str(e) for e in candidates}):
            row = c.execute(select(t.events.c.created_at).where(t.events.c.id == event_id)).first()
            if row is None:
                continue
            needed = c.execute(
                select(t.inbox.c.run_id).where(t.inbox.c.event_id == event_id).limit(1)
            ).first() is not None or any(
                (trig or {}).get("event_id") == event_id
                for trig in c.execute(
                    select(t.runs.c.trigger).where(t.runs.c.created_at == row.created_at)
                ).scalars()
            )
            if needed:
                c.execute(
                    update(t.events)
                    .where(t.events.c.id == event_id, t.events.c.source_run_id.in_(ids))
                    .values(source_run_id=None, source_step=None)
                )
            else:
                c.execute(delete(t.events).where(t.events.c.id == event_id))

    def _cron_fires(self, c: Connection, ids: list[str]) -> None:
        """Fires of purged runs go, but the newest of each schedule (it keeps the
        timetable's place), which forgets its run."""
        f = t.cron_fires
        rows = c.execute(select(f.c.workflow_id, f.c.fire_at).where(f.c.run_id.in_(ids))).all()
        for workflow_id, fire_at in rows:
            latest = c.execute(
                select(func.max(t.cron_fires.c.fire_at)).where(
                    t.cron_fires.c.workflow_id == workflow_id
                )
            ).scalar()
            key = (t.cron_fires.c.workflow_id == workflow_id, t.cron_fires.c.fire_at == fire_at)
            if latest is not None and fire_at < latest:
                c.execute(delete(t.cron_fires).where(*key))
            else:
                c.execute(update(t.cron_fires).where(*key).values(run_id=None))

    def _keys(self, c: Connection, gone: Sequence[Any]) -> None:
        """Idempotency keys forget purged runs; a key left with none goes."""
        purged = {r.id for r in gone}
        names: set[str] = set()
        for r in gone:
            if r.idempotency_key is None:
                continue
            names.add(f"trigger:{r.workflow_id}:{r.idempotency_key}")
            event = (r.trigger or {}).get("event")
            if event:
                names.add(f"event:{event}:{r.idempotency_key}")
        for key in sorted(names):
            row = (
                c.execute(
                    self.db.locked(
                        select(t.idempotency_keys).where(t.idempotency_keys.c.key == key)
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                continue
            left = [rid for rid in row["run_ids"] if rid not in purged]
            where = t.idempotency_keys.c.key == key
            if not left:
                c.execute(delete(t.idempotency_keys).where(where))
            elif len(left) != len(row["run_ids"]):
                c.execute(update(t.idempotency_keys).where(where).values(run_ids=left))

    def _definitions(self, c: Connection, keep: set[str]) -> int:
        used = sa.exists().where(t.runs.c.definition_hash == t.definitions.c.hash)
        q = delete(t.definitions).where(
            ~used, t.definitions.c.created_at < self.db.now() - DEFINITION_GRACE
        )
        if keep:
            q = q.where(t.definitions.c.hash.not_in(sorted(keep)))
        return int(c.execute(q).rowcount or 0)
