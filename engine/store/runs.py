"""A run's life in the database: created, claimed, moved on step by step, parked, cancelled.

Every write to a run that its lease holder makes is conditional on the lease
(`lease_owner = :owner`, or the row locked and checked), so a process that lost its lease
writes nothing. Parking reads the inbox under the run's lock (see `waits`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from ..answers import ANY, wait_names
from ..errors import LeaseLost, NotFound, RunBusy, ValueNotStorable
from ..models import (
    ACTIVE_STATUSES,
    Answer,
    Lease,
    NewLog,
    NewRun,
    Run,
    RunStatus,
    StepRecord,
    StepStatus,
    Transition,
    TransitionResult,
)
from ..pauses import pause_point
from . import schema as t
from .db import Db
from .events import Events, insert_tags, new_run_values
from .sqlutil import (
    INSERT_RUN,
    NO_LEASE,
    move_and_record_statement,
    move_statement,
    run_from_row,
    upsert_statement,
)
from .waits import Inbox, child_result

__all__ = ["Runs", "groupable"]

_ACTIVE = [s.value for s in ACTIVE_STATUSES]


class Runs:
    def __init__(self, db: Db, inbox: Inbox, events: Events, alive: Any) -> None:
        self.db, self.inbox, self.events = db, inbox, events
        self.alive = alive  # (conn, owner, now) -> bool: is a lease holder alive? (workers.py)

    # creating and claiming -------------------------------------------------------------------
    def create_run(self, new: NewRun, now: float, lease: Lease | None = None) -> Run:
        values = new_run_values(new, now)
        if lease is not None:
            values.update(
                self.db.lease_values(lease, now),
                status=RunStatus.RUNNING.value,
                started_at=now,
                current_attempt=1,
                step_running=True,
                step_started_at=now,
            )
        if new.first_wait_event is None and not new.tags:  # one statement, on the driver
            self.db.alone(INSERT_RUN, tuple(values), values)
            return run_from_row(values)

        def work(c: Connection) -> Run:
            if new.first_wait_event is not None:
                values["step_since"] = self.db.lock_names(c, [new.first_wait_event], now)
            c.execute(INSERT_RUN, values)
            insert_tags(c, [new], now)
            return run_from_row(values)

        return self.db.transact(work)

    def claim_run(
        self,
        run_id: str,
        lease: Lease,
        now: float,
        admit: Callable[[Connection, Any, float], bool] | None = None,
    ) -> Run:
        """Lease the run (RunBusy if a live process holds it); with `admit`, a queued run is
        left as it is unless its queue's limits admit it now."""

        def work(c: Connection) -> Run:
            row = self._lock_run(c, run_id)
            if row["status"] not in _ACTIVE:
                return run_from_row(row)
            self._check_lease(c, row, lease, now)
            if (
                admit is not None
                and row["status"] == RunStatus.QUEUED.value
                and not admit(c, row, now)
            ):
                return run_from_row(row)
            return self.take(c, row, lease, now)

        return self.db.transact(work)

    def take(self, c: Connection, row: Any, lease: Lease, now: float) -> Run:
        """Lease a locked row and begin its current step."""
        values = {**self.db.lease_values(lease, now), "updated_at": now}
        values.update(self._begin_current_step(c, row, now))
        fresh = row["started_at"] is None and values.get("status") == RunStatus.RUNNING.value
        if fresh:  # its first start: no step of it can be recorded yet
            values["started_at"] = now
        params = {**values, "w_id": row["id"]}
        keys = (*values, "w_id")  # on the driver's cursor (see `Direct`)
        self.db.direct(_update_run_statement(tuple(values)), keys).execute(c, params)
        return run_from_row({**row, **values}, fresh=fresh)

    def _lock_run(self, c: Connection, run_id: str) -> Any:
        row = (
            c.execute(self.db.locked(select(t.runs).where(t.runs.c.id == run_id)))
            .mappings()
            .first()
        )
        if row is None:
            raise NotFound(f"no run has id {run_id}")
        return row

    def _check_lease(self, c: Connection, row: Any, lease: Lease, now: float) -> None:
        owner = row["lease_owner"]
        if owner is None or owner == lease.owner or (row["lease_expires_at"] or 0) <= now:
            return
        if not self.alive(c, owner, now):
            return  # its worker is known dead: no need to wait for the lease to expire
        raise RunBusy(
            f"run {row['id']} is being executed by process {row['lease_pid']} on "
            f"{row['lease_host']}; try again later"
        )

    def _begin_current_step(self, c: Connection, row: Any, now: float) -> dict[str, Any]:
        """What claiming does to the current step; a crashed attempt is recorded."""
        step_key = row["current_step"]
        if row["step_running"]:
            # An upsert: a step in a `repeat` body counts its attempts from 1 each round, so
            # an earlier round may have recorded this attempt number (its row is replaced by
            # the latest round's, as a failed attempt's row is)
            self.db.upsert(
                c,
                t.attempts,
                {
                    "run_id": row["id"],
                    "step_key": step_key,
                    "attempt": row["current_attempt"],
                    "status": "crashed",
                    "started_at": row["step_started_at"],
                    "finished_at": now,
                    "error_type": "WorkerDied",
                    "error_message": "the process executing this attempt stopped before it "
                    "finished",
                    "traceback": None,
                },
                ["run_id", "step_key", "attempt"],
                ["status", "started_at", "finished_at", "error_type", "error_message", "traceback"],
            )
            return _begin(row["current_attempt"] + 1, now)
        if step_key is None:
            return {"status": RunStatus.RUNNING.value}
        if row["started_at"] is None:  # never started: none of its steps is recorded
            return _begin(1, now)
        key = {"w_run": row["id"], "w_key": step_key}
        # on the driver's cursor (see `Direct`)
        found = next(iter(self.db.direct_query(_CURRENT_STEP, tuple(key)).mappings(c, key)), None)
        if found is None:
            return _begin(1, now)
        due = found["wake_at"] is not None and found["wake_at"] <= now
        if found["status"] == StepStatus.RETRYING.value:
            if due:
                return _begin(found["attempts"] + 1, now)
            return {"status": RunStatus.WAITING.value}
        if found["status"] == StepStatus.WAITING.value:
            return {"status": RunStatus.WAITING.value}  # the runner reads its inbox
        return {"status": RunStatus.RUNNING.value}

    # moving on -------------------------------------------------------------------------------
    def commit_transition(
        self, run_id: str, lease: Lease, tr: Transition, now: float
    ) -> TransitionResult:
        values = _run_values(run_id, lease, tr, now, self.db)
        finished = tr.status not in ACTIVE_STATUSES
        if (
            self.db.is_postgres
            and tr.simple
            and tr.record is not None
            and not (finished and tr.has_parent)
        ):
            # The common step: one statement is a whole transaction, so PostgreSQL runs it in
            # autocommit - atomic and durable, without BEGIN and COMMIT round trips.
            statement, params = _move_and_record(values, *_step_values(run_id, tr.record, now))
            rows = self.db.alone(statement, tuple(params), params)
            if not rows:
                raise LeaseLost(f"run {run_id}: this process no longer holds its lease")
            return TransitionResult(bool(rows[0][0]), output=tr.record.output)
        if tr.simple and tr.record is not None and not (finished and tr.has_parent):
            # SQLite's common step: the lease-checked UPDATE, then the step row
            record = tr.record
            return self.db.transact(lambda c: self._commit_simple(c, run_id, record, values, now))
        try:
            return self.db.transact(lambda c: self._commit(c, run_id, lease, tr, values, now))
        except sa.exc.DataError as exc:
            raise ValueNotStorable(
                f"run {run_id}: the database cannot store this step's result: "
                f"{str(exc.orig).strip().splitlines()[0]}"
            ) from exc

    def commit_group(
        self, items: Sequence[tuple[str, Lease, Transition, float]]
    ) -> list[TransitionResult | LeaseLost]:
        """Several runs' step transitions (each `groupable`) in ONE transaction: the group
        commit of a worker's executors. Each is lease-checked on its own: a run whose lease
        is lost writes nothing and gets its LeaseLost, the others go on. All are durable
        together at the COMMIT, or none is (a crash before it loses them all: each run's
        step is executed again after its lease, as after any crash before a commit)."""
        return self.db.transact(self.group_work(items))

    def group_work(
        self, items: Sequence[tuple[str, Lease, Transition, float]]
    ) -> Callable[[Connection], list[TransitionResult | LeaseLost]]:
        """`commit_group`'s statements, for a transaction of the caller's."""
        prepared = []
        for run_id, lease, tr, now in items:
            assert groupable(tr) and tr.record is not None
            values = _run_values(run_id, lease, tr, now, self.db)
            step, step_updates = _step_values(run_id, tr.record, now)
            prepared.append((run_id, tr.record, values, step, tuple(step_updates)))

        def work(c: Connection) -> list[TransitionResult | LeaseLost]:
            out: list[TransitionResult | LeaseLost] = []
            for run_id, rec, values, step, step_updates in prepared:
                if self.db.is_postgres:
                    statement, params = _move_and_record(values, step, step_updates)
                    rows = self.db.direct(statement, tuple(params)).execute(c, params)
                    cancel = rows[0][0] if rows else None
                else:
                    keys = tuple(values)
                    rows = self.db.direct(move_statement(keys), keys).execute(c, values)
                    cancel = rows[0][0] if rows else None
                    if rows:
                        upsert = upsert_statement("sqlite", t.steps, _STEP_KEYS, step_updates)
                        self.db.direct(upsert, tuple(step)).execute(c, step)
                if cancel is None:
                    out.append(LeaseLost(f"run {run_id}: this process no longer holds its lease"))
                else:
                    out.append(TransitionResult(bool(cancel), output=rec.output))
            pause_point("store.group.before_commit")  # every statement run, none committed
            return out

        return work

    def _commit_simple(
        self, c: Connection, run_id: str, rec: StepRecord, values: dict[str, Any], now: float
    ) -> TransitionResult:
        keys = tuple(values)
        rows = self.db.direct(move_statement(keys), keys).execute(c, values)
        if not rows:
            raise LeaseLost(f"run {run_id}: this process no longer holds its lease")
        step, step_updates = _step_values(run_id, rec, now)
        upsert = upsert_statement(self.db.dialect, t.steps, _STEP_KEYS, tuple(step_updates))
        self.db.direct(upsert, tuple(step)).execute(c, step)
        return TransitionResult(bool(rows[0][0]), output=rec.output)

    def _commit(
        self,
        c: Connection,
        run_id: str,
        lease: Lease,
        tr: Transition,
        values: dict[str, Any],
        now: float,
    ) -> TransitionResult:
        rec = tr.record
        wait = (rec.wait or {}) if rec is not None and rec.status == StepStatus.WAITING else {}
        new_runs = [*tr.children, *(tr.emission.runs if tr.emission else ())]
        names = [
            tr.emission.event.name if tr.emission else None,
            *wait_names(wait),
            tr.reach_event,
            *(r.first_wait_event for r in new_runs),
        ]
        locked_now = self.db.lock_names(c, names, now)  # name locks first, then rows
        pause_point("store.commit.locked")
        if "step_since" in values:
            values["step_since"] = locked_now
        row = (
            c.execute(self.db.locked(select(t.runs).where(t.runs.c.id == run_id)))
            .mappings()
            .first()
        )
        if row is None or row["lease_owner"] != lease.owner:
            raise LeaseLost(f"run {run_id}: this process no longer holds its lease")
        pause_point("store.commit.run_locked")
        output = rec.output if rec is not None else None
        if tr.emission is not None and rec is not None:
            sent = self.events.store_emission(c, tr.emission, locked_now)
            output = {**(output or {}), "resumed": list(sent.resumed)}
            rec = _with_output(rec, output)
        if rec is not None:
            step, step_updates = _step_values(run_id, rec, now)
            self.db.upsert(c, t.steps, step, ["run_id", "step_key"], step_updates)
            self._record_step_extras(c, run_id, rec, now)
        for also in tr.also:  # the records a block step writes beside its own
            step, step_updates = _step_values(run_id, also, now)
            self.db.upsert(c, t.steps, step, ["run_id", "step_key"], step_updates)
        for child in tr.children:
            if self.db.insert_ignore(c, t.runs, new_run_values(child, locked_now), ["id"]):
                self.db.notify(c)
        cancel = list(tr.cancel_runs)
        if tr.status == RunStatus.CANCELLED:  # its holder cancels it: withdraw what it waits on
            self.withdraw_wait(c, row, now)
            cancel += self._active_children(c, run_id)
        for other in cancel:
            self.cancel_tree(c, other, now)
        if tr.logs:
            self.insert_logs(c, run_id, tr.logs, now)
        answer: Answer | None = None
        if tr.status == RunStatus.WAITING and tr.current_step is not None:
            answer = self.inbox.find_answer(c, row, tr.current_step, now)
        if tr.release and tr.status in ACTIVE_STATUSES and (answer or row["cancel_requested"]):
            # answered already, or cancelled meanwhile: the holder keeps the lease and goes on
            values.update(self.db.lease_values(lease, now))
        update_values = {k: v for k, v in values.items() if not k.startswith("w_")}
        update_values["active_seconds"] = row["active_seconds"] + tr.active_seconds
        if tr.metadata:  # merged under the run's lock: concurrent items keep each other's keys
            update_values["metadata"] = {**(row["metadata"] or {}), **tr.metadata}
        c.execute(update(t.runs).where(t.runs.c.id == run_id).values(**update_values))
        if tr.status not in ACTIVE_STATUSES:
            self._answer_parent(
                c, row, child_result(run_id, tr.status.value, tr.output, tr.error), now
            )
        pause_point("store.commit.written")  # all written, nothing committed yet
        return TransitionResult(bool(row["cancel_requested"]), answer, output)

    def _record_step_extras(self, c: Connection, run_id: str, rec: StepRecord, now: float) -> None:
        """What a step record writes beside its row: a token, a failed attempt, the index
        rows of a wait_for_any's alternatives (written as it parks, deleted as it ends)."""
        wait = rec.wait or {}
        tokens = [wait] if wait.get("kind") == "token" else []
        if wait.get("kind") == ANY:
            tokens = [a for a in wait.get("alternatives") or [] if a["kind"] == "token"]
            if rec.status == StepStatus.WAITING:
                self.inbox.index_alternatives(c, run_id, rec.step_key, rec.attempt, wait)
            else:
                self.inbox.withdraw_alternatives(c, run_id, rec.step_key)
        for token in tokens if rec.status == StepStatus.WAITING else ():
            self.db.insert_ignore(
                c,
                t.tokens,
                {
                    "token": token["token"],
                    "run_id": run_id,
                    "step_key": rec.step_key,
                    "attempt": rec.attempt,
                    "created_at": now,
                },
                ["token"],
            )
        if rec.attempt_status:
            self.db.upsert(
                c,
                t.attempts,
                {
                    "run_id": run_id,
                    "step_key": rec.step_key,
                    "attempt": rec.attempt,
                    "status": rec.attempt_status,
                    "started_at": rec.started_at,
                    "finished_at": now,
                    "error_type": rec.error_type,
                    "error_message": rec.error,
                    "traceback": rec.traceback,
                },
                ["run_id", "step_key", "attempt"],
                ["status", "finished_at", "error_type", "error_message", "traceback"],
            )

    def insert_logs(self, c: Connection, run_id: str, logs: Sequence[NewLog], now: float) -> None:
        c.execute(
            insert(t.logs),
            [
                {
                    "run_id": run_id,
                    "step_key": log.step_key,
                    "attempt": log.attempt,
                    "level": log.level,
                    "message": log.message,
                    "extra": log.extra,
                    "created_at": log.created_at or now,
                }
                for log in logs
            ],
        )

    # leases ----------------------------------------------------------------------------------
    def heartbeat(self, run_id: str, lease: Lease, now: float, logs: Sequence[NewLog]) -> bool:
        def work(c: Connection) -> bool:
            held = c.execute(
                update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.lease_owner == lease.owner)
                .values(**self.db.lease_values(lease, now))
                .returning(t.runs.c.id)
            ).first()
            if held is None:
                return False
            if logs:
                self.insert_logs(c, run_id, logs, now)
            return True

        return self.db.transact(work)

    def release(self, run_id: str, lease: Lease, now: float) -> None:
        def work(c: Connection) -> None:
            c.execute(
                update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.lease_owner == lease.owner)
                .values(next_at=now, updated_at=now, **NO_LEASE)
            )
            self.db.notify(c)

        self.db.transact(work)

    def reopen_failed_run(
        self,
        run_id: str,
        step_key: str,
        lease: Lease,
        now: float,
        reopen: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Run:
        """Give a failed run's failed step one more attempt: the step becomes a due retry
        and the run is leased to `lease`, so claiming it begins the next attempt (attempt
        numbers continue; history is kept). `reopen`: other failed step rows (the blocks
        the failure left) and the columns each takes, and the step's own if it is not to
        be a retry. All under the run's lock, each row only while it is still failed; a run
        that is not failed, or whose step is no longer failed, is returned as is (a second
        resume in between changes nothing)."""
        rows = {step_key: {"status": StepStatus.RETRYING.value, "wake_at": now}, **(reopen or {})}

        def work(c: Connection) -> Run:
            row = self._lock_run(c, run_id)
            if row["status"] != RunStatus.FAILED.value:
                return run_from_row(row)
            for key, columns in rows.items():
                changed = c.execute(
                    update(t.steps)
                    .where(
                        t.steps.c.run_id == run_id,
                        t.steps.c.step_key == key,
                        t.steps.c.status == StepStatus.FAILED.value,
                    )
                    .values(**columns, finished_at=None)
                    .returning(t.steps.c.step_key)
                ).first()
                if key == step_key and changed is None:
                    # the step was read failed, but another resume retried it since and the
                    # run failed again elsewhere: going on at it would run it again
                    return run_from_row(row)
            values = {
                **self.db.lease_values(lease, now),
                "status": RunStatus.WAITING.value,
                "current_step": step_key,
                "step_running": False,
                "error": None,
                "output": None,
                "finished_at": None,
                "updated_at": now,
            }
            c.execute(update(t.runs).where(t.runs.c.id == run_id).values(**values))
            return run_from_row({**row, **values})

        return self.db.transact(work)

    # cancelling ------------------------------------------------------------------------------
    def request_cancel(self, run_id: str, now: float) -> Run:
        def work(c: Connection) -> Run:
            if c.execute(select(t.runs.c.id).where(t.runs.c.id == run_id)).first() is None:
                raise NotFound(f"no run has id {run_id}")
            self.cancel_tree(c, run_id, now)
            return run_from_row(
                c.execute(select(t.runs).where(t.runs.c.id == run_id)).mappings().one()
            )

        return self.db.transact(work)

    def cancel_tree(self, c: Connection, run_id: str, now: float) -> None:
        """Cancel a run and its active descendants. Rows are locked children first (the
        order a finishing child takes: itself, then its parent), so the two never deadlock.
        The tree is read again once its rows are locked: a parent's commit that started
        children after the first read (PostgreSQL reads without locks) held the parent's
        lock, so they are seen now, and cancelled too; none is left running on its own.
        (Those are locked after their parent: against one finishing at that moment,
        PostgreSQL may pick a deadlock victim, and `transact` runs that one again.)"""
        tree: list[str] = []
        frontier = [run_id]
        while frontier:
            found = list(frontier)
            while frontier:
                frontier = list(
                    c.execute(
                        select(t.runs.c.id).where(
                            t.runs.c.parent_run_id.in_(frontier),
                            t.runs.c.status.in_(_ACTIVE),
                            t.runs.c.id.not_in(tree + found),
                        )
                    ).scalars()
                )
                found += frontier
            pause_point("store.cancel.tree_read")  # tests: a parent starts children meanwhile
            for rid in reversed(found):
                row = (
                    c.execute(self.db.locked(select(t.runs).where(t.runs.c.id == rid)))
                    .mappings()
                    .first()
                )
                if row is not None:
                    self._cancel_one(c, row, now)
            tree += found
            frontier = list(  # started since the read above, before their parent's lock
                c.execute(
                    select(t.runs.c.id).where(
                        t.runs.c.parent_run_id.in_(tree),
                        t.runs.c.status.in_(_ACTIVE),
                        t.runs.c.id.not_in(tree),
                    )
                ).scalars()
            )

    def withdraw_wait(self, c: Connection, row: Any, now: float) -> None:
        """A run is cancelled: its waiting step's wait is answered by the cancel (later
        events, tokens and child results lose) and the step ends `cancelled`, and so do the
        blocks (switch, repeat) whose lists it was in: their records were open (`running`),
        and nothing would ever close them."""
        self.end_open_blocks(c, [row["id"]], now)
        step_key = row["current_step"]
        if step_key is None:
            return
        step = c.execute(
            select(t.steps.c.attempts, t.steps.c.wait).where(
                t.steps.c.run_id == row["id"],
                t.steps.c.step_key == step_key,
                t.steps.c.status == StepStatus.WAITING.value,
            )
        ).first()
        if step is None:
            return
        self.inbox.deliver(c, row["id"], step_key, step.attempts, "cancel", None, now, wake=False)
        if (step.wait or {}).get("kind") == ANY:
            self.inbox.withdraw_alternatives(c, row["id"], step_key)
        c.execute(
            update(t.steps)
            .where(t.steps.c.run_id == row["id"], t.steps.c.step_key == step_key)
            .values(
                status=StepStatus.CANCELLED.value,
                finished_at=now,
                error="cancelled",
                wait_event=None,
            )
        )

    def end_open_blocks(
        self, c: Connection, run_ids: Sequence[str], now: float, error: str = "cancelled"
    ) -> None:
        """The runs are ending (cancelled, expired) without going on: the blocks (switch,
        repeat) whose records are open (`running`) end `cancelled` with them, or nothing
        would ever close them."""
        if run_ids:
            c.execute(
                update(t.steps)
                .where(
                    t.steps.c.run_id.in_(list(run_ids)),
                    t.steps.c.status == StepStatus.RUNNING.value,
                )
                .values(status=StepStatus.CANCELLED.value, finished_at=now, error=error)
            )

    def _active_children(self, c: Connection, run_id: str) -> list[str]:
        return list(
            c.execute(
                select(t.runs.c.id).where(
                    t.runs.c.parent_run_id == run_id, t.runs.c.status.in_(_ACTIVE)
                )
            ).scalars()
        )

    def _cancel_one(self, c: Connection, row: Any, now: float) -> None:
        if row["status"] not in _ACTIVE:
            return
        executing = row["lease_owner"] is not None and (row["lease_expires_at"] or 0) > now
        if executing and row["status"] == RunStatus.RUNNING.value:
            # its holder stops at the next step boundary, and then cancels it
            c.execute(
                update(t.runs)
                .where(t.runs.c.id == row["id"])
                .values(cancel_requested=True, updated_at=now)
            )
            return
        self.withdraw_wait(c, row, now)
        c.execute(
            update(t.runs)
            .where(t.runs.c.id == row["id"])
            .values(
                cancel_requested=True,
                status=RunStatus.CANCELLED.value,
                finished_at=now,
                updated_at=now,
                next_at=None,
                step_running=False,
                error="cancelled",
                **NO_LEASE,
            )
        )
        data = child_result(row["id"], "cancelled", None, "child run was cancelled")
        self._answer_parent(c, row, data, now)

    def _answer_parent(self, c: Connection, row: Any, data: dict[str, Any], now: float) -> None:
        """A child run ended: its result answers the wait of the parent attempt that
        started it (a later attempt of that step waits for another child)."""
        if row["parent_run_id"] and row["parent_step"]:
            attempt = row["parent_attempt"] or 1
            self.inbox.deliver(
                c, row["parent_run_id"], row["parent_step"], attempt, "child", data, now
            )
            self.db.notify(c)


@functools.cache
def _update_run_statement(keys: tuple[str, ...]) -> Any:
    """UPDATE of these columns of the run `w_id`, built once per set of columns."""
    set_ = {k: sa.bindparam(k, type_=t.runs.c[k].type) for k in keys}
    return update(t.runs).where(t.runs.c.id == sa.bindparam("w_id")).values(set_)


_STEP_KEYS = ("run_id", "step_key")
_CURRENT_STEP = select(t.steps.c.status, t.steps.c.attempts, t.steps.c.wake_at).where(
    t.steps.c.run_id == sa.bindparam("w_run"), t.steps.c.step_key == sa.bindparam("w_key")
)


def _move_and_record(
    values: dict[str, Any], step: dict[str, Any], step_updates: Sequence[str]
) -> tuple[Any, dict[str, Any]]:
    """PostgreSQL: the one statement that moves the run (lease-checked) and records its
    step, with its parameters (the step's values as `s_<column>`)."""
    statement = move_and_record_statement(tuple(values), tuple(step), tuple(step_updates))
    return statement, {**values, **{f"s_{k}": v for k, v in step.items()}}


def groupable(tr: Transition) -> bool:
    """A step's transition that writes only its run's row and its step's row: what a group
    commit may commit beside other runs' (anything that emits an event, starts or answers a
    run, waits or logs goes through `commit_transition` on its own)."""
    finished = tr.status not in ACTIVE_STATUSES
    return tr.simple and tr.record is not None and not (finished and tr.has_parent)


def _begin(attempt: int, now: float) -> dict[str, Any]:
    return {
        "status": RunStatus.RUNNING.value,
        "current_attempt": attempt,
        "step_running": True,
        "step_started_at": now,
    }


def _with_output(rec: StepRecord, output: Any) -> StepRecord:
    from dataclasses import replace

    return replace(rec, output=output)


def _run_values(run_id: str, lease: Lease, tr: Transition, now: float, db: Db) -> dict[str, Any]:
    """The run row after `tr`; `w_*` keys are the lease-checked statement's parameters."""
    values: dict[str, Any] = {
        "status": tr.status.value,
        "current_step": tr.current_step,
        "updated_at": now,
        "step_running": tr.begin_attempt > 0,
        "w_id": run_id,
        "w_owner": lease.owner,
        "w_active": tr.active_seconds,
    }
    if tr.begin_attempt:
        values.update(current_attempt=tr.begin_attempt, step_started_at=now)
    rec = tr.record
    reached = rec is not None and tr.current_step not in (None, rec.step_key)
    if reached and rec is not None and "[" not in rec.step_key:  # not a for_each item
        values["step_since"] = now
    if tr.error is not None:
        values["error"] = tr.error
    if tr.status not in ACTIVE_STATUSES:
        values.update(output=tr.output, finished_at=now, next_at=None, **NO_LEASE)
    elif tr.release:
        values.update(next_at=tr.next_at, **NO_LEASE)
    else:
        values.update(db.lease_values(lease, now))
    return values


def _step_values(run_id: str, rec: StepRecord, now: float) -> tuple[dict[str, Any], list[str]]:
    """A step record as its row's values, and the columns an existing row takes from it."""
    terminal = rec.status in (
        StepStatus.COMPLETED,
        StepStatus.SKIPPED,
        StepStatus.FAILED,
        StepStatus.CANCELLED,
    )
    values = {
        "run_id": run_id,
        "step_key": rec.step_key,
        "status": rec.status.value,
        "attempts": rec.attempt,
        "output": rec.output,
        "error": rec.error,
        "started_at": rec.started_at,
        "finished_at": now if terminal else None,
        "wake_at": rec.wake_at,
        "wait": rec.wait,
        "wait_event": (rec.wait or {}).get("event") if rec.status == StepStatus.WAITING else None,
    }
    updates = [k for k in values if k not in ("run_id", "step_key", "started_at")]
    if terminal or rec.status == StepStatus.RETRYING:
        updates.append("started_at")
    return values, updates
