"""Operating runs in bulk and queues by hand: pausing a queue, expiring runs past their TTL,
cancelling many runs, and saying why a queued run has not started (`blocked_by`).

Each write is conditional on what it read: a queue's pause is one UPDATE of its row, which
waits for the claims holding that row's lock (a claim reads `paused` under FOR SHARE); an
expiry or a bulk cancel of queued runs is `UPDATE ... WHERE status = 'queued'`, so a run a
claim started meanwhile is left to the per-run path (flagged, stopped at its next step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from ..errors import NotFound
from ..models import ACTIVE_STATUSES, Run, RunStatus
from ..pauses import pause_point
from . import schema as t
from .db import Db
from .runs import Runs
from .sqlutil import NO_LEASE
from .waits import child_result

__all__ = ["Control"]

_ACTIVE = [s.value for s in ACTIVE_STATUSES]
EXPIRED_ERROR = "expired: not started within its TTL"
# what an ended run's parent must be told: which parent, step and attempt started it
_PARENT_OF_ENDED = (
    t.runs.c.id,
    t.runs.c.parent_run_id,
    t.runs.c.parent_step,
    t.runs.c.parent_attempt,
)


class Control:
    def __init__(self, db: Db, runs: Runs) -> None:
        self.db, self.runs = db, runs

    # queues -------------------------------------------------------------------------------
    def set_paused(self, name: str, paused: bool, now: float) -> None:
        """Pause or resume a queue; NotFound if no workflow ever used it. Once this returns,
        no claim starts a run of a paused queue: the UPDATE waits for claims that hold the
        queue row's lock, and later claims read the new value under that lock."""

        def work(c: Connection) -> None:
            done = c.execute(
                update(t.queues)
                .where(t.queues.c.name == name)
                .values(paused=paused, updated_at=now)
                .returning(t.queues.c.name)
            ).first()
            if done is None:
                known = c.execute(select(t.queues.c.name).order_by(t.queues.c.name)).scalars()
                raise NotFound(f"no queue named {name!r} (known: {', '.join(known) or 'none'})")
            if not paused:
                self.db.notify(c)  # its runs are claimable again

        self.db.transact(work)

    def paused_queues(self) -> set[str]:
        with self.db.read() as c:
            return set(c.execute(select(t.queues.c.name).where(t.queues.c.paused)).scalars())

    # TTL ----------------------------------------------------------------------------------
    def expire_due(self, now: float, limit: int = 500) -> list[str]:
        """End `expired` the queued runs whose TTL has passed (at most `limit`); their ids.
        The UPDATE is conditional on status 'queued': a run a claim started in between
        (`store.expire.selected`) is not touched."""

        def work(c: Connection) -> list[str]:
            q = (
                select(t.runs.c.id)
                .where(
                    t.runs.c.status == RunStatus.QUEUED.value,
                    t.runs.c.expires_at.isnot(None),
                    t.runs.c.expires_at <= now,
                )
                .order_by(t.runs.c.expires_at)
                .limit(limit)
            )
            if self.db.is_postgres:
                q = q.with_for_update(skip_locked=True)
            ids = list(c.execute(q).scalars())
            if not ids:
                return []
            pause_point("store.expire.selected")
            rows = (
                c.execute(
                    update(t.runs)
                    .where(t.runs.c.id.in_(ids), t.runs.c.status == RunStatus.QUEUED.value)
                    .values(**_ended(RunStatus.EXPIRED, EXPIRED_ERROR, now))
                    .returning(*_PARENT_OF_ENDED)
                )
                .mappings()
                .all()
            )
            for row in rows:
                self._tell_parent(c, row, "expired", EXPIRED_ERROR, now)
            self.runs.end_open_blocks(c, [r["id"] for r in rows], now, EXPIRED_ERROR)
            return [r["id"] for r in rows]

        return self.db.transact(work)

    def expire_row(self, c: Connection, row: Any, now: float) -> None:
        """Expire one queued run whose row the caller has locked (a claim met it)."""
        c.execute(
            update(t.runs)
            .where(t.runs.c.id == row["id"], t.runs.c.status == RunStatus.QUEUED.value)
            .values(**_ended(RunStatus.EXPIRED, EXPIRED_ERROR, now))
        )
        self._tell_parent(c, row, "expired", EXPIRED_ERROR, now)
        self.runs.end_open_blocks(c, [row["id"]], now, EXPIRED_ERROR)

    def _tell_parent(self, c: Connection, row: Any, status: str, error: str, now: float) -> None:
        if row["parent_run_id"]:
            self.runs._answer_parent(c, row, child_result(row["id"], status, None, error), now)

    # bulk cancel --------------------------------------------------------------------------
    def cancel_batch(self, ids: Sequence[str], now: float) -> int:
        """Cancel these runs in one transaction; how many this call cancelled or flagged
        (a run cancelled or flagged already, by anyone, is not counted again). Queued runs go
        in one conditional UPDATE; the rest (executing, waiting, or claimed meanwhile) one
        by one under their row locks, as `runs cancel ID` does."""

        def work(c: Connection) -> int:
            pause_point("store.cancel_runs.batch")
            done = (
                c.execute(
                    update(t.runs)
                    .where(
                        t.runs.c.id.in_(list(ids)),
                        t.runs.c.status == RunStatus.QUEUED.value,
                        t.runs.c.lease_owner.is_(None),
                        t.runs.c.cancel_requested.is_(False),
                    )
                    .values(cancel_requested=True, **_ended(RunStatus.CANCELLED, "cancelled", now))
                    .returning(*_PARENT_OF_ENDED)
                )
                .mappings()
                .all()
            )
            for ended in done:
                self._tell_parent(c, ended, "cancelled", "child run was cancelled", now)
            self.runs.end_open_blocks(c, [r["id"] for r in done], now)
            count = len(done)
            rest = sorted(set(ids) - {r["id"] for r in done})
            # those still to cancel (read without locks; each is checked again under its lock)
            still = select(t.runs.c.id).where(
                t.runs.c.id.in_(rest),
                t.runs.c.status.in_(_ACTIVE),
                t.runs.c.cancel_requested.is_(False),
            )
            left: list[str] = list(c.execute(still).scalars()) if rest else []
            for run_id in sorted(left):
                row = (
                    c.execute(self.db.locked(select(t.runs).where(t.runs.c.id == run_id)))
                    .mappings()
                    .first()
                )
                if row is None or row["status"] not in _ACTIVE or row["cancel_requested"]:
                    continue
                self.runs.cancel_tree(c, run_id, now)
                count += 1
            if count:
                self.db.notify(c)
            return count

        return self.db.transact(work)

    # why a queued run waits ---------------------------------------------------------------
    def blocked_by(
        self, run: Run, now: float, workers: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Why a queued run has not started, from the state now; None if nothing holds it
        back (a worker takes it within a second) or it is not queued."""
        if run.status != RunStatus.QUEUED:
            return None
        from ..views import iso  # the detail texts show times as the API does

        with self.db.read() as c:
            queue = (
                c.execute(select(t.queues).where(t.queues.c.name == run.queue)).mappings().first()
            )
            if queue is not None and queue["paused"]:
                return {"reason": "queue_paused", "detail": f"queue {run.queue} is paused"}
            if run.next_at is not None and run.next_at > now:
                return {
                    "reason": "delayed",
                    "detail": f"delayed until {iso(run.next_at)}",
                    "until": iso(run.next_at),
                }
            serving = [w for w in workers if not w["queues"] or run.queue in w["queues"]]
            if not serving:
                return {"reason": "no_worker", "detail": f"no live worker serves queue {run.queue}"}
            limit = queue["concurrency"] if queue is not None else None
            if limit is not None:
                running = (
                    select(func.count())
                    .select_from(t.runs)
                    .where(t.runs.c.queue == run.queue, t.runs.c.status == RunStatus.RUNNING.value)
                )
                if run.concurrency_key is not None:
                    n = c.execute(
                        running.where(t.runs.c.concurrency_key == run.concurrency_key)
                    ).scalar_one()
                    if n >= limit:
                        return {
                            "reason": "key_full",
                            "detail": f"concurrency key {run.concurrency_key!r} of queue "
                            f"{run.queue} is full ({n}/{limit} running)",
                        }
                else:
                    n = c.execute(running).scalar_one()
                    if n >= limit:
                        return {
                            "reason": "queue_full",
                            "detail": f"queue {run.queue} is full ({n}/{limit} running)",
                        }
            rate, period = (queue["rate_limit"], queue["rate_period"]) if queue else (None, None)
            if rate is not None and period:
                starts = (
                    c.execute(
                        select(t.runs.c.started_at)
                        .where(t.runs.c.queue == run.queue, t.runs.c.started_at > now - period)
                        .order_by(t.runs.c.started_at)
                    )
                    .scalars()
                    .all()
                )
                if len(starts) >= rate:
                    until = iso(starts[len(starts) - rate] + period)
                    return {
                        "reason": "rate_limited",
                        "detail": f"queue {run.queue} started {len(starts)}/{rate} runs in its "
                        f"rate window; the next may start at {until}",
                        "until": until,
                    }
        slots = sum(w["concurrency"] for w in serving)
        if sum(w["running"] for w in serving) >= slots:
            return {
                "reason": "workers_busy",
                "detail": f"all {slots} executor slot(s) of the workers serving {run.queue} are busy",
            }
        return None


def _ended(status: RunStatus, error: str, now: float) -> dict[str, Any]:
    return {
        "status": status.value,
        "error": error,
        "finished_at": now,
        "updated_at": now,
        "next_at": None,
        "step_running": False,
        **NO_LEASE,
    }
