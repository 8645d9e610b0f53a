"""The store on SQLAlchemy Core: one query implementation for SQLite and PostgreSQL.

Dialect hooks are kept to what really differs: SQLite takes its write lock at BEGIN
(`BEGIN IMMEDIATE`, so concurrent claims serialise instead of deadlocking), PostgreSQL locks
rows with `FOR UPDATE` (and `SKIP LOCKED` when claiming from a queue); upserts use each
dialect's `ON CONFLICT`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import and_, event, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url

from ..errors import DatabaseError, LeaseLost, NotFound, RunBusy
from ..models import (
    ACTIVE_STATUSES,
    Attempt,
    Lease,
    LogEntry,
    NewLog,
    NewRun,
    Run,
    RunStatus,
    StepState,
    StepStatus,
    Transition,
    TransitionResult,
)
from . import schema as t
from .events import EventOps, new_run_values
from .migrations import MIGRATIONS
from .queueing import QueueOps
from .schedules import ScheduleOps
from .sqlutil import (
    INSERT_RUN,
    MOVE_RUN,
    NO_LEASE,
    move_and_record_statement,
    now_ts,
    pid_alive,
    run_from_row,
    sqlite_begin,
    sqlite_connect,
    step_from_row,
    translate,
    upsert_statement,
)

__all__ = ["SqlStore", "normalise_url"]

P = ParamSpec("P")
R = TypeVar("R")
_ACTIVE = [s.value for s in ACTIVE_STATUSES]


def normalise_url(url: str) -> str:
    """Accept postgres:// and postgresql:// (psycopg 3 is the driver) and plain sqlite paths."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class SqlStore(QueueOps, EventOps, ScheduleOps):
    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = sa.create_engine(
                self.url, connect_args={"timeout": 60, "check_same_thread": False}
            )
            event.listen(self.engine, "connect", sqlite_connect)
            event.listen(self.engine, "begin", sqlite_begin)
        elif self.dialect == "postgresql":
            self.engine = sa.create_engine(
                self.url, pool_size=10, max_overflow=20, pool_pre_ping=True
            )
        else:
            raise DatabaseError(
                f"unsupported database {parsed.drivername!r}; use sqlite:/// or postgresql://"
            )

    def close(self) -> None:
        self.engine.dispose()

    # schema -------------------------------------------------------------------------------
    @translate
    def migrate(self) -> None:
        with self.engine.begin() as c:
            if self.dialect == "postgresql":
                c.execute(sa.text("SELECT pg_advisory_xact_lock(7218391)"))
            insp = sa.inspect(c)
            if not insp.has_table(t.meta.name):
                t.metadata.create_all(c)
                c.execute(insert(t.meta).values(key="schema_version", value=str(t.SCHEMA_VERSION)))
                return
            found = int(
                c.execute(
                    select(t.meta.c.value).where(t.meta.c.key == "schema_version")
                ).scalar_one()
            )
            if found > t.SCHEMA_VERSION:
                raise DatabaseError(
                    f"the database schema is version {found}, newer than this durable-yaml "
                    f"(version {t.SCHEMA_VERSION}); upgrade durable-yaml"
                )
            for version in range(found + 1, t.SCHEMA_VERSION + 1):
                MIGRATIONS[version](c)
            if found != t.SCHEMA_VERSION:
                c.execute(
                    update(t.meta)
                    .where(t.meta.c.key == "schema_version")
                    .values(value=str(t.SCHEMA_VERSION))
                )

    # definitions --------------------------------------------------------------------------
    @translate
    def save_definition(
        self,
        content_hash: str,
        workflow_id: str,
        version: str,
        machine: dict[str, Any],
        source_path: str,
    ) -> None:
        with self.engine.begin() as c:
            self._insert_ignore(
                c,
                t.definitions,
                {
                    "hash": content_hash,
                    "workflow_id": workflow_id,
                    "version": version,
                    "machine": machine,
                    "source_path": source_path,
                    "created_at": now_ts(),
                },
                ["hash"],
            )

    @translate
    def load_definition(self, content_hash: str) -> dict[str, Any]:
        with self.engine.connect() as c:
            row = c.execute(
                select(t.definitions.c.machine).where(t.definitions.c.hash == content_hash)
            ).first()
        if row is None:
            raise NotFound(f"no stored definition has hash {content_hash}")
        machine: dict[str, Any] = row[0]
        return machine

    # runs ---------------------------------------------------------------------------------
    @translate
    def create_run(self, new: NewRun, now: float, lease: Lease | None = None) -> Run:
        values = new_run_values(new, now)
        if lease is not None:
            values.update(
                self._lease_values(lease, now),
                status=RunStatus.RUNNING.value,
                started_at=now,
                current_attempt=1,
                step_running=True,
                step_started_at=now,
            )
        if self.dialect == "postgresql":  # one statement: autocommit, no BEGIN/COMMIT trips
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.execute(INSERT_RUN, values)
        else:
            with self.engine.begin() as c:
                c.execute(INSERT_RUN, values)
        return run_from_row(values)

    @translate
    def claim_run(self, run_id: str, lease: Lease, now: float) -> Run:
        with self.engine.begin() as c:
            row = (
                c.execute(self._locked(select(t.runs).where(t.runs.c.id == run_id)))
                .mappings()
                .first()
            )
            if row is None:
                raise NotFound(f"no run has id {run_id}")
            if row["status"] not in _ACTIVE:
                return run_from_row(row)
            self._check_lease(row, lease, now)
            values = {**self._lease_values(lease, now), "updated_at": now}
            values.update(self._begin_current_step(c, row, now))
            if row["started_at"] is None and values.get("status") == RunStatus.RUNNING.value:
                values["started_at"] = now
            c.execute(update(t.runs).where(t.runs.c.id == run_id).values(**values))
        return run_from_row({**row, **values})

    def _check_lease(self, row: Any, lease: Lease, now: float) -> None:
        owner = row["lease_owner"]
        if owner is None or owner == lease.owner or (row["lease_expires_at"] or 0) <= now:
            return
        if row["lease_host"] == lease.host and not pid_alive(row["lease_pid"]):
            return  # its process died on this very machine: no need to wait for expiry
        raise RunBusy(
            f"run {row['id']} is being executed by process {row['lease_pid']} on "
            f"{row['lease_host']} (lease until {row['lease_expires_at']:.0f}); try again later"
        )

    def _begin_current_step(self, c: Connection, row: Any, now: float) -> dict[str, Any]:
        """Decide what claiming does to the current step; record a crashed attempt."""
        step_key = row["current_step"]
        if row["step_running"]:
            c.execute(
                insert(t.attempts).values(
                    run_id=row["id"],
                    step_key=step_key,
                    attempt=row["current_attempt"],
                    status="crashed",
                    started_at=row["step_started_at"],
                    finished_at=now,
                    error_type="WorkerDied",
                    error_message="the process executing this attempt stopped before it finished",
                )
            )
            return {
                "status": RunStatus.RUNNING.value,
                "current_attempt": row["current_attempt"] + 1,
                "step_running": True,
                "step_started_at": now,
            }
        if step_key is None:
            return {"status": RunStatus.RUNNING.value}
        step = c.execute(
            select(
                t.steps.c.status, t.steps.c.attempts, t.steps.c.wake_at, t.steps.c.resume_data
            ).where(t.steps.c.run_id == row["id"], t.steps.c.step_key == step_key)
        ).first()
        if step is None:
            return {
                "status": RunStatus.RUNNING.value,
                "current_attempt": 1,
                "step_running": True,
                "step_started_at": now,
            }
        due = step.wake_at is not None and step.wake_at <= now
        if step.status == StepStatus.RETRYING.value:
            if not due:
                return {"status": RunStatus.WAITING.value}
            return {
                "status": RunStatus.RUNNING.value,
                "current_attempt": step.attempts + 1,
                "step_running": True,
                "step_started_at": now,
            }
        if step.status == StepStatus.WAITING.value and not due and step.resume_data is None:
            return {"status": RunStatus.WAITING.value}
        return {"status": RunStatus.RUNNING.value}

    @translate
    def commit_transition(
        self, run_id: str, lease: Lease, transition: Transition, now: float
    ) -> TransitionResult:
        tr = transition
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
        if tr.error is not None:
            values["error"] = tr.error
        finished = tr.status not in ACTIVE_STATUSES
        if finished:
            values.update(output=tr.output, finished_at=now, next_at=None, **NO_LEASE)
        elif tr.release:
            values.update(next_at=tr.next_at, **NO_LEASE)
        else:
            values.update(self._lease_values(lease, now))
        if (
            self.dialect == "postgresql"
            and tr.record is not None
            and not (finished and tr.has_parent)
            and not tr.logs
            and not tr.record.attempt_status
            and (tr.record.wait or {}).get("kind") != "token"
        ):
            # The common step: one statement is a whole transaction, so PostgreSQL runs it in
            # autocommit - atomic and durable, without BEGIN and COMMIT round trips.
            step, step_updates = _step_values(run_id, tr.record, now)
            params = {**values, **{f"s_{k}": v for k, v in step.items()}}
            statement = move_and_record_statement(tuple(values), tuple(step), tuple(step_updates))
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                row = c.execute(statement, params).first()
            if row is None:
                raise LeaseLost(f"run {run_id}: this process no longer holds its lease")
            return TransitionResult(cancel_requested=bool(row.cancel_requested))
        with self.engine.begin() as c:
            if tr.record is not None and self.dialect == "postgresql":
                # one round trip: the step is written only if the lease-checked UPDATE matched
                step, step_updates = _step_values(run_id, tr.record, now)
                row = c.execute(
                    move_and_record_statement(tuple(values), tuple(step), tuple(step_updates)),
                    {**values, **{f"s_{k}": v for k, v in step.items()}},
                ).first()
            else:
                row = c.execute(MOVE_RUN, values).first()
            if row is None:
                raise LeaseLost(f"run {run_id}: this process no longer holds its lease")
            if tr.record is not None:
                if self.dialect != "postgresql":
                    step, step_updates = _step_values(run_id, tr.record, now)
                    self._upsert(c, t.steps, step, ["run_id", "step_key"], step_updates)
                self._record_step_extras(c, run_id, tr.record, now)
            if tr.logs:
                self._insert_logs(c, run_id, tr.logs, now)
            if finished and row.parent_run_id:
                self._wake_parent(
                    c,
                    row.parent_run_id,
                    row.parent_step,
                    {
                        "status": tr.status.value,
                        "output": tr.output,
                        "error": tr.error,
                        "run_id": run_id,
                    },
                    now,
                )
        return TransitionResult(cancel_requested=bool(row.cancel_requested))

    def _record_step_extras(self, c: Connection, run_id: str, rec: Any, now: float) -> None:
        """What a step record writes beside its row: a token, a failed attempt."""
        wait = rec.wait or {}
        if rec.status == StepStatus.WAITING and wait.get("kind") == "token":
            self._insert_ignore(
                c,
                t.tokens,
                {
                    "token": wait["token"],
                    "run_id": run_id,
                    "step_key": rec.step_key,
                    "created_at": now,
                },
                ["token"],
            )
        if rec.attempt_status:
            self._upsert(
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

    def _wake_parent(
        self, c: Connection, parent_id: str, step_key: str | None, data: dict[str, Any], now: float
    ) -> None:
        """A child ended: hand its result to the parent's waiting step and wake the parent."""
        if step_key is not None:
            self._resume_step(c, parent_id, step_key, data, now)
            self.notify(c)

    def _insert_logs(self, c: Connection, run_id: str, logs: Sequence[NewLog], now: float) -> None:
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

    @translate
    def heartbeat(self, run_id: str, lease: Lease, now: float, logs: Sequence[NewLog]) -> bool:
        with self.engine.begin() as c:
            held = c.execute(
                update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.lease_owner == lease.owner)
                .values(**self._lease_values(lease, now))
                .returning(t.runs.c.id)
            ).first()
            if held is None:
                return False
            if logs:
                self._insert_logs(c, run_id, logs, now)
        return True

    @translate
    def release(self, run_id: str, lease: Lease, now: float) -> None:
        with self.engine.begin() as c:
            c.execute(
                update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.lease_owner == lease.owner)
                .values(next_at=now, updated_at=now, **NO_LEASE)
            )

    @translate
    def reopen_failed_run(self, run_id: str, step_key: str, lease: Lease, now: float) -> Run:
        """Give a failed run's failed step one more attempt: the step becomes a due retry
        and the run is leased to `lease`, so claiming it begins the next attempt (attempt
        numbers continue; history is kept). A run that is not failed is returned as is."""
        with self.engine.begin() as c:
            row = (
                c.execute(self._locked(select(t.runs).where(t.runs.c.id == run_id)))
                .mappings()
                .first()
            )
            if row is None:
                raise NotFound(f"no run has id {run_id}")
            if row["status"] != RunStatus.FAILED.value:
                return run_from_row(row)
            c.execute(
                update(t.steps)
                .where(
                    t.steps.c.run_id == run_id,
                    t.steps.c.step_key == step_key,
                    t.steps.c.status == StepStatus.FAILED.value,
                )
                .values(status=StepStatus.RETRYING.value, wake_at=now, finished_at=None)
            )
            values = {
                **self._lease_values(lease, now),
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

    @translate
    def request_cancel(self, run_id: str, now: float) -> Run:
        with self.engine.begin() as c:
            row = (
                c.execute(self._locked(select(t.runs).where(t.runs.c.id == run_id)))
                .mappings()
                .first()
            )
            if row is None:
                raise NotFound(f"no run has id {run_id}")
            pending = [row]
            while pending:
                current = pending.pop()
                self._cancel_one(c, current, now)
                pending += (
                    c.execute(
                        self._locked(
                            select(t.runs).where(
                                t.runs.c.parent_run_id == current["id"],
                                t.runs.c.status.in_(_ACTIVE),
                            )
                        )
                    )
                    .mappings()
                    .all()
                )
            result = c.execute(select(t.runs).where(t.runs.c.id == run_id)).mappings().one()
        return run_from_row(result)

    def _cancel_one(self, c: Connection, row: Any, now: float) -> None:
        if row["status"] not in _ACTIVE:
            return
        executing = row["lease_owner"] is not None and (row["lease_expires_at"] or 0) > now
        if executing and row["status"] == RunStatus.RUNNING.value:
            c.execute(
                update(t.runs)
                .where(t.runs.c.id == row["id"])
                .values(cancel_requested=True, updated_at=now)
            )
            return
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
        if row["parent_run_id"]:
            self._wake_parent(
                c,
                row["parent_run_id"],
                row["parent_step"],
                {
                    "status": "cancelled",
                    "output": None,
                    "error": "child run was cancelled",
                    "run_id": row["id"],
                },
                now,
            )

    # reading ------------------------------------------------------------------------------
    @translate
    def get_run(self, run_id: str) -> Run:
        with self.engine.connect() as c:
            row = c.execute(select(t.runs).where(t.runs.c.id == run_id)).mappings().first()
        if row is None:
            raise NotFound(f"no run has id {run_id}")
        return run_from_row(row)

    @translate
    def list_runs(
        self,
        status: RunStatus | None = None,
        workflow_id: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
        parent_run_id: str | None = None,
        since: float | None = None,
    ) -> list[Run]:
        q = select(t.runs)
        if since is not None:
            q = q.where(t.runs.c.created_at >= since)
        if status is not None:
            q = q.where(t.runs.c.status == status.value)
        if workflow_id is not None:
            q = q.where(t.runs.c.workflow_id == workflow_id)
        if parent_run_id is not None:
            q = q.where(t.runs.c.parent_run_id == parent_run_id)
        if before is not None:
            q = q.where(
                or_(
                    t.runs.c.created_at < before[0],
                    and_(t.runs.c.created_at == before[0], t.runs.c.id < before[1]),
                )
            )
        q = q.order_by(t.runs.c.created_at.desc(), t.runs.c.id.desc()).limit(limit)
        with self.engine.connect() as c:
            return [run_from_row(r) for r in c.execute(q).mappings()]

    @translate
    def get_steps(self, run_id: str) -> list[StepState]:
        q = (
            select(t.steps)
            .where(t.steps.c.run_id == run_id)
            .order_by(t.steps.c.started_at, t.steps.c.step_key)
        )
        with self.engine.connect() as c:
            return [step_from_row(r) for r in c.execute(q).mappings()]

    @translate
    def get_attempts(self, run_id: str) -> list[Attempt]:
        q = (
            select(t.attempts)
            .where(t.attempts.c.run_id == run_id)
            .order_by(t.attempts.c.step_key, t.attempts.c.attempt)
        )
        with self.engine.connect() as c:
            return [Attempt(**dict(r)) for r in c.execute(q).mappings()]

    @translate
    def get_logs(self, run_id: str, after_id: int = 0, limit: int = 1000) -> list[LogEntry]:
        q = (
            select(t.logs)
            .where(t.logs.c.run_id == run_id, t.logs.c.id > after_id)
            .order_by(t.logs.c.id)
            .limit(limit)
        )
        with self.engine.connect() as c:
            return [LogEntry(**dict(r)) for r in c.execute(q).mappings()]

    # dialect hooks ------------------------------------------------------------------------
    def _locked(self, q: sa.Select[Any]) -> sa.Select[Any]:
        return q.with_for_update() if self.dialect == "postgresql" else q

    def _upsert(
        self,
        c: Connection,
        table: sa.Table,
        values: dict[str, Any],
        keys: list[str],
        update_cols: list[str],
    ) -> None:
        c.execute(upsert_statement(self.dialect, table, tuple(keys), tuple(update_cols)), values)

    def _insert_ignore(
        self, c: Connection, table: sa.Table, values: dict[str, Any], keys: list[str]
    ) -> bool:
        """Insert unless the key exists; True if inserted. (RETURNING, because a driver's
        rowcount for ON CONFLICT DO NOTHING is not reliable: psycopg reports -1.)"""
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        stmt = dialect_insert(table).values(**values).on_conflict_do_nothing(index_elements=keys)
        return c.execute(stmt.returning(table.c[keys[0]])).first() is not None

    @staticmethod
    def _lease_values(lease: Lease, now: float) -> dict[str, Any]:
        expires = now + lease.seconds
        return {
            "lease_owner": lease.owner,
            "lease_host": lease.host,
            "lease_pid": lease.pid,
            "lease_expires_at": expires,
            "next_at": expires,
        }


def _step_values(run_id: str, rec: Any, now: float) -> tuple[dict[str, Any], list[str]]:
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
        "resume_data": None,
        "wait_event": (rec.wait or {}).get("event") if rec.status == StepStatus.WAITING else None,
    }
    updates = [k for k in values if k not in ("run_id", "step_key", "started_at")]
    if terminal or rec.status == StepStatus.RETRYING:
        updates.append("started_at")
    return values, updates
