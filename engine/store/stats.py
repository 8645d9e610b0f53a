"""Counts for the metrics endpoint: a few grouped reads, one snapshot per scrape."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from ..models import RunStatus
from . import schema as t
from .db import Db

__all__ = ["Snapshot", "Stats"]


@dataclass(frozen=True)
class Snapshot:
    """What the database says now: runs per (workflow, status); per queue its queued runs,
    how many of them are due, and since when the longest-waiting due one has been due;
    live workers."""

    runs: dict[tuple[str, str], int]
    queued: dict[str, int]
    due: dict[str, int]
    oldest_due: dict[str, float]  # queue -> the earliest `next_at` of its due queued runs
    running: dict[str, int]
    workers: int
    now: float


class Stats:
    def __init__(self, db: Db) -> None:
        self.db = db

    def snapshot(self, now: float) -> Snapshot:
        """Three grouped queries and a count of live workers on one reading connection
        (never the write lock on SQLite). Each query is consistent in itself; between them
        a run may move on, so the numbers of one scrape can differ by the runs that did."""
        runs = t.runs.c
        with self.db.read() as c:
            by_status = c.execute(
                select(runs.workflow_id, runs.status, func.count()).group_by(
                    runs.workflow_id, runs.status
                )
            ).all()
            queued = c.execute(
                select(
                    runs.queue,
                    func.count(),
                    func.count(runs.next_at).filter(runs.next_at <= now),
                    func.min(runs.next_at).filter(runs.next_at <= now),
                )
                .where(runs.status == RunStatus.QUEUED.value)
                .group_by(runs.queue)
            ).all()
            running = c.execute(
                select(runs.queue, func.count())
                .where(runs.status == RunStatus.RUNNING.value)
                .group_by(runs.queue)
            ).all()
            names = c.execute(select(t.queues.c.name)).scalars().all()
            workers = c.execute(
                select(func.count())
                .select_from(t.workers)
                .where(t.workers.c.heartbeat_at + t.workers.c.lease_seconds >= now)
            ).scalar_one()
        zero = dict.fromkeys(names, 0)
        return Snapshot(
            runs={(w, s): n for w, s, n in by_status},
            queued={**zero, **{q: n for q, n, _, _ in queued}},
            due={**zero, **{q: d for q, _, d, _ in queued}},
            oldest_due={q: m for q, _, _, m in queued if m is not None},
            running={**zero, **dict(running)},  # type: ignore[arg-type]
            workers=int(workers),
            now=now,
        )
