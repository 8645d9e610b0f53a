"""Claiming work from queues, under the limits the YAML sets, safely across processes.

A candidate is a run whose `next_at` has come: queued, woken from a wait, or whose lease
expired. Candidates come in priority order, then FIFO. On PostgreSQL they are locked with
`FOR UPDATE SKIP LOCKED`, so concurrent workers take different runs; limited queues' rows are
locked while their running runs are counted, so a limit holds over all workers together. On
SQLite the write lock taken at BEGIN serialises claimers. A queue, or a key within its queue,
that is full is left out of the next look, so a busy key never starves the others, and looks
widen until the candidates run out: a claimable run is always found.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..models import ACTIVE_STATUSES, Lease, QueueLimits, Run, RunStatus
from ..pauses import pause_point
from . import schema as t
from .db import Db
from .runs import Runs
from .sqlutil import run_from_row

__all__ = ["Queues"]

_ACTIVE = [s.value for s in ACTIVE_STATUSES]
LOOKS = (2, 512)  # candidates per look: from the first, x4 per look up to the last
MISSED_LOOK = 64  # due runs in claim order `next_claim_at` looks at for one left behind


_Look = tuple[list[Run], set[tuple[str, str | None]], bool]  # taken, found full, ran out


def _widening(
    leases: int, look: Callable[[frozenset[tuple[str, str | None]], int], _Look]
) -> tuple[list[Run], bool]:
    """Looks from the first width, leaving out what was found full so far and x4 wider each
    time up to the last, until a run is taken or the candidates run out."""
    full: set[tuple[str, str | None]] = set()  # (queue, None): the whole queue is full
    width = max(LOOKS[0], leases)
    while True:
        taken, learned, exhausted = look(frozenset(full), width)
        if taken or exhausted:
            return taken, exhausted
        full |= learned
        width = min(width * 4, LOOKS[-1])


class LimitedAfterAll(Exception):
    """PostgreSQL: a queue whose row was read under FOR SHARE alone, as unlimited, has
    limits (its hint was stale, or they were committed while the limited rows were being
    locked): the transaction is rolled back and made again, that row locked FOR UPDATE this
    time (see `Queues._queue_state`; the callers of a claim retry)."""


class Queues:
    def __init__(self, db: Db, runs: Runs, expire_row: Any) -> None:
        self.db, self.runs = db, runs
        # PostgreSQL: the queues this process last found limited (a hint, never trusted:
        # whatever it says, the rows read under their locks decide)
        self._found_limited: frozenset[str] = frozenset()
        self.expire_row = expire_row  # (conn, locked row, now): a queued run past its TTL
        self.engine, self.dialect = db.engine, db.dialect
        self._limited: tuple[float, frozenset[str]] | None = None
        # PostgreSQL: until when a claim goes straight to the full look (`_claim_fresh`
        # found a run that needs it: limits, a recovery, a wake-up)
        self._fresh_off_until = 0.0

    def save_queue_limits(self, limits: Iterable[QueueLimits]) -> None:
        """Record each queue's limits (the latest definition wins); idempotent."""
        rows = [
            {
                "name": q.name,
                "concurrency": q.concurrency,
                "rate_limit": q.rate_limit,
                "rate_period": q.rate_period,
                "updated_at": self.db.now(),
            }
            for q in limits
        ]

        def work(c: Connection) -> None:
            for row in rows:
                self.db.upsert(
                    c,
                    t.queues,
                    row,
                    ["name"],
                    ["concurrency", "rate_limit", "rate_period", "updated_at"],
                )

        self.db.transact(work)

    def claim_next_run(
        self, lease: Lease, now: float, queues: Sequence[str] | None = None
    ) -> Run | None:
        """Lease the first claimable run that its queue's limits allow, and begin its
        current step, atomically. None only when no run is claimable now."""
        taken, _ = self.claim_next_runs([lease], now, queues)
        return taken[0] if taken else None

    def claim_next_runs(
        self, leases: Sequence[Lease], now: float, queues: Sequence[str] | None = None
    ) -> tuple[list[Run], bool]:
        """Up to one run per lease (the first run taken to the first lease), taken in one
        look's transaction: each the next claimable run that its queue's limits allow, its
        current step begun; and whether the candidates ran out (only then may a lease left without
        a run wait for a wake-up: otherwise runs were held back by limits, or beyond the
        look's width, and claiming again may find one). No run at all comes only with
        True.

        Each look reads the next candidates in claim-index order, leaving out the queues
        and (queue, key) pairs found full so far; it widens until a run is taken or the
        candidates run out, so any number of full keys cannot hide a claimable run.
        Runs taken by this transaction count towards their queue's limits for the next.

        PostgreSQL, one lease: first `_claim_fresh`, the common claim in one statement."""
        if self.db.is_postgres and len(leases) == 1 and time.monotonic() >= self._fresh_off_until:
            fresh = self._claim_fresh(leases[0], now, queues)
            if fresh is not None:
                return fresh
            self._fresh_off_until = time.monotonic() + 1.0  # (limits, recoveries: a while)

        def look(full: frozenset[tuple[str, str | None]], width: int) -> _Look:
            while True:  # each look its own transaction: the rows it locked go with it
                try:
                    return self.db.transact(
                        functools.partial(
                            self._look,
                            leases=leases,
                            now=now,
                            queues=queues,
                            full=full,
                            width=width,
                        ),
                        fsync=False,  # see Db.transact: a claim's loss only requeues the run
                    )
                except LimitedAfterAll:
                    continue  # now known as limited: the same look, the rows locked to count

        return _widening(len(leases), look)

    def _claim_fresh(
        self, lease: Lease, now: float, queues: Sequence[str] | None
    ) -> tuple[list[Run], bool] | None:
        """PostgreSQL: the first candidate taken in ONE statement in autocommit, if it is a
        queued run never started, in a queue neither paused nor limited: what a busy worker
        claims almost always (issue #15: a claim's transaction was five round trips, the
        server's CPU as much as the worker's). Its row is locked as the full look locks it
        (FOR UPDATE SKIP LOCKED), then its queue's row FOR SHARE, read under that lock, as
        the full look reads it: a pause or new limits committed first are seen, one committed
        later waits for this statement's end. Stamped, as the full look stamps, with the time
        at which it holds those locks (`max(now, store's clock)`, plus the wait for a pooled
        connection, plus how long the server's clock says the statement waited): its lease,
        its start and its TTL's check, however long it waited for a connection (found by
        the reviewer helper: uncounted, a wait for the pool started a run past its TTL) or
        for the queue's row.
        ([run], False) taken; ([], True) no candidate at all, as the full look would find;
        None: the first candidate needs the full look (nothing was written, its locks went
        with the statement)."""
        params: dict[str, Any] = {
            "now": now,
            "base": now,  # set once the connection is held (the statement adds its wait)
            "width": 1,
            "lease_owner": lease.owner,
            "lease_host": lease.host,
            "lease_pid": lease.pid,
            "lease_seconds": lease.seconds,
        }
        if queues:
            params["queues"] = list(queues)
        statement = _claim_fresh_statement(bool(queues))

        # the store's time now, plus the wait for a pooled connection once one is held
        # (measured on this host's monotonic clock: no query, with the connection held)
        base, asked = max(now, self.db.now()), time.monotonic()

        def stamp(p: dict[str, Any]) -> None:
            p["base"] = base + (time.monotonic() - asked)

        (row,) = self.db.alone(statement, tuple(params), params, query=True, late=stamp)
        if row["id"] is not None:
            return [run_from_row(row, fresh=True)], False
        return ([], True) if row["dy_found"] == 0 else None

    def claim_in(
        self, c: Connection, leases: Sequence[Lease], now: float, queues: Sequence[str] | None
    ) -> tuple[list[Run], bool]:
        """SQLite: `claim_next_runs` inside the caller's write transaction (its write lock
        held: a group commit's flush, store/group.py), widening its looks as that does."""
        assert not self.db.is_postgres  # (there a stale hint makes the transaction start over)
        return _widening(
            len(leases), lambda full, width: self._look(c, leases, now, queues, full, width)
        )

    def _look(
        self,
        c: Connection,
        leases: Sequence[Lease],
        now: float,
        queues: Sequence[str] | None,
        full: frozenset[tuple[str, str | None]],
        width: int,
    ) -> _Look:
        """One look: (the runs taken, the limits found full, whether no candidate is left)."""
        candidates = self._candidates(c, now, queues, full, width)
        if not candidates:
            return [], set(), True
        # read under the queue rows' locks: a pause that returned is seen here
        limits, paused = self._queue_state(c, {row["queue"] for row in candidates})
        pause_point("store.claim.queues_locked")
        # Count and stamp with the time at which this claim holds its locks: a `now`
        # taken before waiting for them would let a rate window admit one too many.
        locked_at = max(now, self.db.now())
        learned: set[tuple[str, str | None]] = set()
        taken: list[Run] = []
        for row in candidates:
            lease = leases[len(taken)]
            if row["status"] == RunStatus.RUNNING.value:  # a lease being recovered
                taken.append(self._take(c, row, lease, locked_at))
            else:
                queue, key = row["queue"], row["concurrency_key"]
                if (queue, None) in learned or (queue, key) in learned:
                    continue
                if row["status"] == RunStatus.QUEUED.value:
                    if queue in paused:
                        learned.add((queue, None))
                        continue
                    if row["expires_at"] is not None and row["expires_at"] <= locked_at:
                        self.expire_row(c, row, locked_at)  # its TTL passed: it never starts
                        continue
                # (counted in this transaction: the runs it took so far count too)
                verdict = self._allowed(c, row, limits.get(queue), locked_at)
                if verdict == "queue":
                    learned.add((queue, None))
                    continue
                if verdict == "key":
                    learned.add((queue, key))
                    continue
                taken.append(self._take(c, row, lease, locked_at))
            if len(taken) == len(leases):
                return taken, learned, False
        return taken, learned, len(candidates) < width

    def _candidates(
        self,
        c: Connection,
        now: float,
        queues: Sequence[str] | None,
        full: frozenset[tuple[str, str | None]],
        width: int,
    ) -> list[Any]:
        q = _candidates_statement(self.dialect, bool(queues))
        params: dict[str, Any] = {"now": now, "width": width}
        if not queues and not full:
            # the common look, on the driver's cursor (issue #15: SQLAlchemy's result
            # machinery cost more than the database's reading of the rows)
            return self.db.direct_query(q, ("now", "width")).mappings(c, params)
        if queues:
            params["queues"] = list(queues)
        if full:
            q = _excluding(q, full)
        return list(c.execute(q, params).mappings().all())

    def _queue_state(
        self, c: Connection, names: set[str], *, shared_first: bool = True
    ) -> tuple[dict[str, QueueLimits], set[str]]:
        """The limits of the limited queues among `names`, and which of `names` are paused.
        PostgreSQL: the limited queues' rows locked FOR UPDATE (claims of a limited queue
        count its runs one at a time), the others' FOR SHARE (claims of an unlimited queue
        go at once; a pause or new limits wait for them). SQLite (its write lock held
        already): one read of the rows.

        On PostgreSQL, when none of `names` was limited when this process last looked
        (`shared_first`), every row is read in one statement FOR SHARE (a claim's round
        trips: six instead of seven, issue #15). Otherwise the limited rows are locked FOR
        UPDATE, then the others FOR SHARE. Either way a row that the share finds limited
        (a new definition, committed meanwhile) raises `LimitedAfterAll`: the transaction is
        made again, with that row among the ones locked FOR UPDATE. Taking FOR UPDATE after
        FOR SHARE on the same row instead would deadlock two claimers that both hold the
        share; counting under the share alone would let two of them start a run each."""
        if self.db.is_postgres:
            if shared_first and not names & self._found_limited:
                shared = self._shared(c, names)
                limited = {r["name"] for r in shared if _has_limits(r)}
                if limited:
                    self._found_limited = self._found_limited | limited
                    raise LimitedAfterAll()
                return {}, {r["name"] for r in shared if r["paused"]}
            limits = self._limits(c, names)
            others = names - set(limits)
            shared = self._shared(c, others) if others else []
            late = {r["name"] for r in shared if _has_limits(r)}
            if late:  # limited by a commit after `_limits` read them: not locked to count
                self._found_limited = self._found_limited | late
                raise LimitedAfterAll()
            self._found_limited = (self._found_limited - names) | set(limits)
            paused = {r["name"] for r in shared if r["paused"]}
            return limits, paused | {q.name for q in limits.values() if q.paused}
        if len(names) == 1:  # the common look: one queue, on the driver's cursor
            (name,) = names
            rows: Any = self.db.direct_query(_QUEUE_ROW, ("name",)).mappings(c, {"name": name})
        else:
            rows = c.execute(_QUEUE_ROWS, {"names": sorted(names)}).mappings()
        limits, paused = {}, set()
        for r in rows:
            if r["paused"]:
                paused.add(r["name"])
            if _has_limits(r):
                limits[r["name"]] = QueueLimits(
                    r["name"], r["concurrency"], r["rate_limit"], r["rate_period"], r["paused"]
                )
        return limits, paused

    def _shared(self, c: Connection, names: set[str]) -> Sequence[Any]:
        """PostgreSQL: the rows of the queues `names` locked FOR SHARE (see `_SHARED`)."""
        if len(names) == 1:  # the common look: one queue, on the driver's cursor
            (name,) = names
            return self.db.direct_query(_SHARED_ONE, ("name",)).mappings(c, {"name": name})
        return c.execute(_SHARED, {"names": sorted(names)}).mappings().all()

    def _limits(self, c: Connection, names: set[str]) -> dict[str, QueueLimits]:
        """PostgreSQL: the limited queues among `names`, their rows locked."""
        rows = c.execute(_LIMITS, {"names": sorted(names)}).mappings()
        return {
            r["name"]: QueueLimits(
                r["name"], r["concurrency"], r["rate_limit"], r["rate_period"], r["paused"]
            )
            for r in rows
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
        limits, paused = self._queue_state(c, {row["queue"]}, shared_first=False)
        if row["queue"] in paused:
            return False
        return self._allowed(c, row, limits.get(row["queue"]), now) == "ok"

    def _take(self, c: Connection, row: Any, lease: Lease, now: float) -> Run:
        return self.runs.take(c, row, lease, now)

    def next_due_at(self, queues: Sequence[str] | None = None) -> float | None:
        """When the next run becomes claimable (None: nothing is scheduled)."""
        q = select(func.min(t.runs.c.next_at)).where(t.runs.c.status.in_(_ACTIVE))
        if queues:
            q = q.where(t.runs.c.queue.in_(list(queues)))
        with self.db.read() as c:
            value = c.execute(q).scalar()
        return None if value is None else float(value)

    def next_claim_at(self, after: float, queues: Sequence[str] | None = None) -> float | None:
        """After a claim at `after` found nothing: the earliest time a run may become
        claimable with no other commit. That is the next `next_at` after `after` (a timer,
        a delayed run, a back-off, a lease expiry), or the end of a rate window of a limited
        queue with due runs. A run due by `after` that the claim missed gives `after`
        itself (claim again): among the first MISSED_LOOK due runs in claim order, one in a
        queue neither paused nor limited, or a lease to recover - on PostgreSQL, a run some
        transaction held locked while the claim looked (SKIP LOCKED passed it by) and then
        let go without taking it, or a run committed after the claim's snapshot. Runs due
        but held back by a full queue or key are not counted: only a release or a finished
        run frees them, and those NOTIFY."""
        soonest = select(func.min(t.runs.c.next_at)).where(t.runs.c.next_at > after)
        held_back = select(t.queues.c.name).where(_holds_back(t.queues.c))
        # the first due rows in claim order (the claim index: a bounded read however many
        # runs are held back), of which one not held back
        due = select(t.runs.c.status, t.runs.c.queue).where(t.runs.c.next_at <= after)
        rated = select(t.queues.c.name, t.queues.c.rate_period).where(
            t.queues.c.rate_limit.isnot(None), t.queues.c.rate_period.isnot(None)
        )
        if queues:
            soonest = soonest.where(t.runs.c.queue.in_(list(queues)))
            due = due.where(t.runs.c.queue.in_(list(queues)))
            rated = rated.where(t.queues.c.name.in_(list(queues)))
        first = (
            due.order_by(t.runs.c.priority.desc(), t.runs.c.next_at, t.runs.c.id)
            .limit(MISSED_LOOK)
            .subquery()
        )
        missed = (
            select(first.c.queue)
            .where(
                sa.or_(first.c.status == RunStatus.RUNNING.value, first.c.queue.not_in(held_back))
            )
            .limit(1)
        )
        with self.db.read() as c:
            if c.execute(missed).first() is not None:
                return after
            times = [c.execute(soonest).scalar()]
            for name, period in c.execute(rated).all():
                waiting = (
                    select(t.runs.c.id)
                    .where(
                        t.runs.c.queue == name,
                        t.runs.c.next_at <= after,
                        t.runs.c.started_at.is_(None),
                    )
                    .limit(1)
                )
                if c.execute(waiting).first() is None:
                    continue
                oldest = c.execute(
                    select(func.min(t.runs.c.started_at)).where(
                        t.runs.c.queue == name, t.runs.c.started_at > after - period
                    )
                ).scalar()
                if oldest is not None:
                    times.append(float(oldest) + period)
        known = [float(x) for x in times if x is not None]
        return min(known) if known else None

    def announce_slot_freed(self, queue: str) -> bool:
        """Wake sleeping claimers if `queue` has a concurrency limit (PostgreSQL NOTIFY;
        SQLite watchers see every commit, so nothing is sent there). Whether it has one."""
        if queue not in self._limited_queues():
            return False
        if self.db.is_postgres:
            with self.db.autocommit() as c:
                self.db.notify(c)
        return True

    def _limited_queues(self) -> frozenset[str]:
        """Names of queues with a concurrency limit, read at most every 5 seconds."""
        local = time.monotonic()
        if self._limited is None or local - self._limited[0] > 5.0:
            with self.db.read() as c:
                names = c.execute(
                    select(t.queues.c.name).where(t.queues.c.concurrency.isnot(None))
                ).scalars()
                self._limited = (local, frozenset(names))
        return self._limited[1]

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
                "paused": bool(lim["paused"]) if lim else False,
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


# Statements built once per dialect (issue #15): building a Select, and computing its cache
# key, cost more than executing it. What varies is bound: the time, the width, the names.


@functools.cache
def _candidates_statement(dialect: str, by_queue: bool) -> sa.Select[Any]:
    """Due runs in claim-index order: `now`, `width` and (`by_queue`) `queues` bound."""
    # next_at is set exactly while a run is active (finishing clears it), so no status
    # filter is needed and the claim index is read in order
    now = sa.bindparam("now", type_=sa.Float)
    due = t.runs.c.next_at <= now
    if dialect == "sqlite":  # keep its planner on the ordered claim index: no sort
        due = sa.and_(t.runs.c.next_at.isnot(None), (t.runs.c.next_at + 0) <= now)
    q = select(t.runs).where(due)
    if by_queue:
        q = q.where(t.runs.c.queue.in_(sa.bindparam("queues", expanding=True)))
    # a paused queue's queued runs are no candidates (checked again under its row lock)
    paused = select(t.queues.c.name).where(t.queues.c.paused)
    q = q.where(sa.or_(t.runs.c.status != RunStatus.QUEUED.value, t.runs.c.queue.not_in(paused)))
    q = q.order_by(t.runs.c.priority.desc(), t.runs.c.next_at, t.runs.c.id).limit(
        sa.bindparam("width", type_=sa.Integer)
    )
    if dialect == "postgresql":
        q = q.with_for_update(skip_locked=True)
    return q


@functools.cache
def _claim_fresh_statement(by_queue: bool) -> sa.Select[Any]:
    """PostgreSQL, `Queues._claim_fresh`: the first candidate (`now`, and `queues` as an
    array) locked; its queue's row locked FOR SHARE; then the time read (`base` plus the
    wait since the statement began: `stamp`), and the candidate leased for `lease_seconds`
    and its first step begun at that time, only if it is a queued run never started, not
    past its TTL then, in a queue neither paused nor limited (or without a row). One row:
    how many candidates were found (`dy_found`, 0 or 1), and the run as leased or NULLs."""
    from sqlalchemy.dialects.postgresql import ARRAY

    r = t.runs.c
    cand = _candidates_statement("postgresql", False).with_only_columns(
        r.id, r.queue, r.status, r.started_at, r.current_step, r.step_running, r.expires_at
    )
    if by_queue:
        cand = cand.where(r.queue == sa.any_(sa.bindparam("queues", type_=ARRAY(sa.String))))
    found = cand.cte("cand")
    queue_row = (
        select(t.queues.c.paused, t.queues.c.concurrency, t.queues.c.rate_limit)
        .where(t.queues.c.name.in_(select(found.c.queue)))
        .with_for_update(read=True)
        .cte("queue_row")
    )
    # the clock read once the queue's row is locked (an aggregate over its locked rows reads
    # it after fetching all of them): the store's time as the statement was sent (`base`:
    # the store's clock may be a virtual one) plus what the server's clock says passed
    # since the statement began
    waited = sa.func.extract("epoch", sa.func.clock_timestamp()) - sa.func.extract(
        "epoch", sa.func.statement_timestamp()
    )
    stamp = (
        select(
            (sa.bindparam("base", type_=sa.Float) + sa.cast(waited, sa.Float)).label("at"),
            func.count().label("rows"),
        )
        .select_from(queue_row)
        .cte("stamp")
    )
    held_back = select(queue_row.c.paused).where(_holds_back(queue_row.c))
    at = sa.cast(stamp.c.at, sa.Float)
    expires = at + sa.bindparam("lease_seconds", type_=sa.Float)
    taken = (
        sa.update(t.runs)
        .where(
            r.id == found.c.id,
            found.c.status == RunStatus.QUEUED.value,
            found.c.started_at.is_(None),
            found.c.current_step.isnot(None),
            sa.not_(found.c.step_running),
            ~sa.exists(held_back),
            stamp.c.rows >= 0,  # (joins the stamp: one row)
            sa.or_(found.c.expires_at.is_(None), found.c.expires_at > at),
        )
        .values(
            status=RunStatus.RUNNING.value,
            current_attempt=1,
            step_running=True,
            step_started_at=at,
            started_at=at,
            updated_at=at,
            lease_owner=sa.bindparam("lease_owner", type_=sa.String),
            lease_host=sa.bindparam("lease_host", type_=sa.String),
            lease_pid=sa.bindparam("lease_pid", type_=sa.Integer),
            lease_expires_at=expires,
            next_at=expires,
        )
        .returning(*t.runs.c)
        .cte("taken")
    )
    count = select(func.count().label("dy_found")).select_from(found).subquery("found")
    return select(count.c.dy_found, *taken.c).select_from(count.outerjoin(taken, sa.true()))


def _excluding(q: sa.Select[Any], full: frozenset[tuple[str, str | None]]) -> sa.Select[Any]:
    """`q` leaving out the queues and the (queue, key) pairs found full."""
    # A run whose lease is being recovered already holds its slot: no exclusion applies
    recovering = t.runs.c.status == RunStatus.RUNNING.value
    full_queues = sorted(name for name, key in full if key is None)
    full_keys: dict[str, list[str]] = {}
    for name, key in sorted(full, key=lambda pair: (pair[0], pair[1] or "")):
        if key is not None and name not in full_queues:
            full_keys.setdefault(name, []).append(key)
    if full_queues:
        q = q.where(sa.or_(recovering, t.runs.c.queue.not_in(full_queues)))
    # keys are scoped by queue: a full `u1` in qa leaves `u1` in qb alone; one NOT IN
    # list per queue (PostgreSQL hashes long lists: the cost stays per row, not per key)
    for name, keys in full_keys.items():
        q = q.where(
            sa.or_(
                recovering,
                t.runs.c.queue != name,
                t.runs.c.concurrency_key.is_(None),
                t.runs.c.concurrency_key.not_in(keys),
            )
        )
    return q


# PostgreSQL's two reads of the queue rows: the limited ones locked FOR UPDATE (counted under
# it), the others FOR SHARE (a pause waits for the claim, a claim after it sees the pause)
_LIMITS = (
    select(t.queues)
    .where(
        t.queues.c.name.in_(sa.bindparam("names", expanding=True)),
        sa.or_(t.queues.c.concurrency.isnot(None), t.queues.c.rate_limit.isnot(None)),
    )
    .order_by(t.queues.c.name)
    .with_for_update()
)
_SHARED = (  # the named queues' rows FOR SHARE: paused, and whether they are limited
    select(
        t.queues.c.name,
        t.queues.c.concurrency,
        t.queues.c.rate_limit,
        t.queues.c.paused,
    )
    .where(t.queues.c.name.in_(sa.bindparam("names", expanding=True)))
    .order_by(t.queues.c.name)
    .with_for_update(read=True)
)

_SHARED_ONE = (
    select(*_SHARED.selected_columns)
    .where(t.queues.c.name == sa.bindparam("name"))
    .with_for_update(read=True)
)


def _holds_back(queue: Any) -> Any:
    """SQL: a queue row (its columns `queue`) that holds its queued runs back: paused or
    limited."""
    return sa.or_(queue.paused, queue.concurrency.isnot(None), queue.rate_limit.isnot(None))


def _has_limits(row: Any) -> bool:
    return row["concurrency"] is not None or row["rate_limit"] is not None


# SQLite's one read of them (its write lock is held already): one queue's row, or several
_QUEUE_COLUMNS = (
    t.queues.c.name,
    t.queues.c.concurrency,
    t.queues.c.rate_limit,
    t.queues.c.rate_period,
    t.queues.c.paused,
)
_QUEUE_ROW = select(*_QUEUE_COLUMNS).where(t.queues.c.name == sa.bindparam("name"))
_QUEUE_ROWS = select(*_QUEUE_COLUMNS).where(
    t.queues.c.name.in_(sa.bindparam("names", expanding=True))
)
