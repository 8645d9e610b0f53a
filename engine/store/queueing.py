"""Claiming work from queues, under the limits the YAML sets, safely across processes.

A candidate is a run whose `next_at` has come: queued, woken from a wait, or whose lease
expired. Candidates come in priority order, then FIFO. On PostgreSQL they are locked with
`FOR UPDATE SKIP LOCKED`, so concurrent workers take different runs; limited queues' rows are
locked while their running runs are counted, so a limit holds over all workers together. On
SQLite the write lock taken at BEGIN serialises claimers. A queue or key that is full is left
out of the next look, so a busy key never starves the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from ..models import ACTIVE_STATUSES, Lease, QueueLimits, Run, RunStatus
from . import schema as t
from .db import Db
from .runs import Runs
from .sqlutil import pid_alive

__all__ = ["Queues"]

_ACTIVE = [s.value for s in ACTIVE_STATUSES]
LOOKS = (2, 8, 32, 128)  # candidates per look: widen only when limits block the first ones


class Queues:
    def __init__(self, db: Db, runs: Runs) -> None:
        self.db, self.runs = db, runs
        self.engine, self.dialect = db.engine, db.dialect

    def save_queue_limits(self, limits: Iterable[QueueLimits]) -> None:
        """Record each queue's limits (the latest definition wins); idempotent."""
        with self.engine.begin() as c:
            for q in limits:
                self.db.upsert(
                    c,
                    t.queues,
                    {
                        "name": q.name,
                        "concurrency": q.concurrency,
                        "rate_limit": q.rate_limit,
                        "rate_period": q.rate_period,
                        "updated_at": self.db.now(),
                    },
                    ["name"],
                    ["concurrency", "rate_limit", "rate_period", "updated_at"],
                )

    def claim_next_run(
        self, lease: Lease, now: float, queues: Sequence[str] | None = None
    ) -> Run | None:
        """Lease the first claimable run that its queue's limits allow, and begin its
        current step, atomically. None when nothing can run now."""
        full_queues: set[str] = set()
        full_keys: set[str] = set()
        for width in LOOKS:
            with self.engine.begin() as c:
                candidates = self._candidates(c, now, queues, full_queues, full_keys, width)
                if not candidates:
                    return None
                limits = self._limits(c, {row["queue"] for row in candidates})
                # Count and stamp with the time at which this claim holds its locks: a `now`
                # taken before waiting for them would let a rate window admit one too many.
                locked_at = max(now, self.db.now())
                for row in candidates:
                    verdict = self._allowed(c, row, limits.get(row["queue"]), locked_at)
                    if verdict == "queue":
                        full_queues.add(row["queue"])
                    elif verdict == "key":
                        full_keys.add(row["concurrency_key"])
                    elif row["status"] == RunStatus.RUNNING.value or (
                        row["queue"] not in full_queues and row["concurrency_key"] not in full_keys
                    ):
                        return self._take(c, row, lease, locked_at)
        return None

    def _candidates(
        self,
        c: Connection,
        now: float,
        queues: Sequence[str] | None,
        full_queues: set[str],
        full_keys: set[str],
        width: int,
    ) -> list[Any]:
        # next_at is set exactly while a run is active (finishing clears it), so no status
        # filter is needed and the claim index is read in order
        due = t.runs.c.next_at <= now
        if self.dialect == "sqlite":  # keep its planner on the ordered claim index: no sort
            due = sa.and_(t.runs.c.next_at.isnot(None), (t.runs.c.next_at + 0) <= now)
        q = select(t.runs).where(due)
        if queues:
            q = q.where(t.runs.c.queue.in_(list(queues)))
        # A run whose lease is being recovered already holds its slot: no exclusion applies
        recovering = t.runs.c.status == RunStatus.RUNNING.value
        if full_queues:
            q = q.where(sa.or_(recovering, t.runs.c.queue.not_in(list(full_queues))))
        if full_keys:
            q = q.where(
                sa.or_(
                    recovering,
                    t.runs.c.concurrency_key.is_(None),
                    t.runs.c.concurrency_key.not_in(list(full_keys)),
                )
            )
        q = q.order_by(t.runs.c.priority.desc(), t.runs.c.next_at, t.runs.c.id).limit(width)
        if self.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)
        return list(c.execute(q).mappings().all())

    def _limits(self, c: Connection, names: set[str]) -> dict[str, QueueLimits]:
        q = select(t.queues).where(
            t.queues.c.name.in_(sorted(names)),
            sa.or_(t.queues.c.concurrency.isnot(None), t.queues.c.rate_limit.isnot(None)),
        )
        if self.dialect == "postgresql":
            q = q.order_by(t.queues.c.name).with_for_update()  # counted under this lock
        return {
            r["name"]: QueueLimits(r["name"], r["concurrency"], r["rate_limit"], r["rate_period"])
            for r in c.execute(q).mappings()
        }

    def _allowed(self, c: Connection, row: Any, limits: QueueLimits | None, now: float) -> str:
        """'ok', or which limit is full: 'queue' or 'key'."""
        if limits is None or row["status"] == RunStatus.RUNNING.value:
            return "ok"  # unlimited, or already counted (a lease being recovered)
        if limits.concurrency is not None:
            running = (
                select(func.count())
                .select_from(t.runs)
                .where(t.runs.c.queue == row["queue"], t.runs.c.status == RunStatus.RUNNING.value)
            )
            key = row["concurrency_key"]
            if key is not None:
                running = running.where(t.runs.c.concurrency_key == key)
            if c.execute(running).scalar_one() >= limits.concurrency:
                return "key" if key is not None else "queue"
        if limits.rate_limit is not None and limits.rate_period and row["started_at"] is None:
            started = (
                select(func.count())
                .select_from(t.runs)
                .where(
                    t.runs.c.queue == row["queue"], t.runs.c.started_at > now - limits.rate_period
                )
            )
            if c.execute(started).scalar_one() >= limits.rate_limit:
                return "queue"
        return "ok"

    def admits(self, c: Connection, row: Any, now: float) -> bool:
        """Whether the limits of the locked run's queue let it start now."""
        limits = self._limits(c, {row["queue"]})
        return self._allowed(c, row, limits.get(row["queue"]), now) == "ok"

    def _take(self, c: Connection, row: Any, lease: Lease, now: float) -> Run:
        return self.runs.take(c, row, lease, now)

    def expire_dead_leases(self, host: str, now: float) -> list[str]:
        """Runs leased by processes of `host` that no longer exist become claimable now."""
        with self.engine.begin() as c:
            rows = c.execute(
                select(t.runs.c.id, t.runs.c.lease_pid).where(
                    t.runs.c.lease_host == host,
                    t.runs.c.lease_expires_at > now,
                    t.runs.c.status.in_(_ACTIVE),
                )
            ).all()
            dead = [r.id for r in rows if not pid_alive(r.lease_pid)]
            if dead:
                c.execute(
                    update(t.runs)
                    .where(t.runs.c.id.in_(dead), t.runs.c.lease_host == host)
                    .values(lease_expires_at=now, next_at=now, updated_at=now)
                )
        return dead

    def next_due_at(self, queues: Sequence[str] | None = None) -> float | None:
        """When the next run becomes claimable (None: nothing is scheduled)."""
        q = select(func.min(t.runs.c.next_at)).where(t.runs.c.status.in_(_ACTIVE))
        if queues:
            q = q.where(t.runs.c.queue.in_(list(queues)))
        with self.db.read() as c:
            value = c.execute(q).scalar()
        return None if value is None else float(value)

    def queue_stats(self) -> list[dict[str, Any]]:
        """Per queue: runs by status (queued, running, waiting) and its limits."""
        with self.db.read() as c:
            counts = c.execute(
                select(t.runs.c.queue, t.runs.c.status, func.count())
                .where(t.runs.c.status.in_(_ACTIVE))
                .group_by(t.runs.c.queue, t.runs.c.status)
            ).all()
            limits = {r["name"]: r for r in c.execute(select(t.queues)).mappings()}
        stats: dict[str, dict[str, Any]] = {}
        for name in set(limits) | {q for q, _, _ in counts}:
            lim = limits.get(name)
            stats[name] = {
                "name": name,
                "queued": 0,
                "running": 0,
                "waiting": 0,
                "concurrency": lim["concurrency"] if lim else None,
                "rate_limit": lim["rate_limit"] if lim else None,
                "rate_period": lim["rate_period"] if lim else None,
            }
        for queue, status, n in counts:
            stats[queue][status] = n
        return sorted(stats.values(), key=lambda s: s["name"])
