"""The store on SQLAlchemy Core: one query implementation for SQLite and PostgreSQL.

`SqlStore` is assembled from parts that each own one concept and share one `Db` (the
connection, dialect hooks and clock): `Runs` (a run's life), `Inbox` (answers to waits),
`Events` (events, triggers, idempotency, tokens), `Queues` (claiming under limits),
`Schedules` (cron fires) and `Workers` (worker registry and lease liveness). This class translates driver errors into `engine.errors` and
holds definitions and the read side.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.engine import Connection

from dsl.limits import INT_MAX

from ..errors import DatabaseError, LeaseLost, NotFound
from ..models import (
    Answer,
    Attempt,
    Lease,
    LogEntry,
    NewEvent,
    NewLog,
    NewRun,
    QueueLimits,
    Run,
    RunFilter,
    RunStatus,
    Sent,
    StepState,
    Transition,
    TransitionResult,
    WorkerInfo,
)
from . import schema as t
from .control import Control
from .db import Db
from .events import Events
from .migrations import MIGRATIONS
from .queueing import LimitedAfterAll, Queues
from .retention import Retention
from .runs import Runs
from .schedules import Schedules
from .search import Search
from .sqlutil import run_from_row, step_from_row, translate
from .stats import Snapshot, Stats
from .waits import Inbox
from .workers import Workers

__all__ = ["RolledBack", "SqlStore", "normalise_url"]

log = logging.getLogger(__name__)


class RolledBack(Exception):
    """`commit_and_claim`: one of its statements failed (its `__cause__`), so nothing of the
    transaction was committed and each part may be made again on its own. An error at BEGIN
    or COMMIT, or after the COMMIT, is raised as it is instead: the work may be committed."""


PG_INTEGER_MAX = 2**31 - 1  # the largest id of a 32-bit SERIAL
LOG_IDS_WARN_AT = PG_INTEGER_MAX // 4 * 3
_LOG_IDS = sa.text(  # (whether dy_logs.id is 32-bit, the last id its sequence gave)
    "SELECT (SELECT atttypid = 'int4'::regtype FROM pg_attribute "
    "WHERE attrelid = 'dy_logs'::regclass AND attname = 'id'), "
    "pg_sequence_last_value(pg_get_serial_sequence('dy_logs', 'id')::regclass)"
)

_RUN_STEPS = (  # built once: the runner reads a run's steps at every claim
    select(t.steps)
    .where(t.steps.c.run_id == sa.bindparam("w_run"))
    .order_by(t.steps.c.started_at, t.steps.c.step_key)
)


def normalise_url(url: str) -> str:
    """Accept postgres:// and postgresql:// (psycopg 3 is the driver) and plain sqlite paths."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class SqlStore:
    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        skew = float(os.environ.get("DURABLE_YAML_TEST_CLOCK_SKEW", "0") or 0)
        self.db = Db(self.url, skew=skew)
        self.engine, self.dialect = self.db.engine, self.db.dialect
        self.inbox = Inbox(self.db)
        self.events = Events(self.db, self.inbox)
        self.workers = Workers(self.db)
        self.runs = Runs(self.db, self.inbox, self.events, self.workers.owner_alive)
        self.control = Control(self.db, self.runs)
        self.queues = Queues(self.db, self.runs, self.control.expire_row)
        self.schedules = Schedules(self.db)
        self.search = Search(self.db)
        self.retention = Retention(self.db)
        self.stats = Stats(self.db)

    def close(self) -> None:
        self.db.close()

    def now(self) -> float:
        """The database's clock (see `DbClock`)."""
        return self.db.now()

    # schema -------------------------------------------------------------------------------
    @translate
    def migrate(self) -> None:
        with self.db.writing(), self.engine.begin() as c:
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
        if self.dialect == "postgresql":
            self._warn_of_32_bit_log_ids()

    def _warn_of_32_bit_log_ids(self) -> None:
        """A PostgreSQL database made before log ids were 64-bit keeps a 32-bit SERIAL (no
        migration widens it unasked: README, "Upgrading"); once three quarters of its ids
        are used, every process that opens the store says so, before log writes, and the
        steps whose results carry log lines, fail at the last one."""
        try:
            with self.db.read_one() as c:
                narrow, used = c.execute(_LOG_IDS).one()
        except sa.exc.SQLAlchemyError:  # renamed or dropped by hand: nothing to say
            return
        if narrow and used is not None and used >= LOG_IDS_WARN_AT:
            log.warning(
                "database %s: dy_logs.id is a 32-bit integer and %s of its %s ids are used; "
                "writing log lines fails past the last. Widen it at a quiet time (it rewrites "
                "the table): ALTER TABLE dy_logs ALTER COLUMN id TYPE BIGINT; "
                "ALTER SEQUENCE dy_logs_id_seq AS BIGINT;",
                self.db.safe_url,
                f"{used:,}",
                f"{PG_INTEGER_MAX:,}",
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
        values = {
            "hash": content_hash,
            "workflow_id": workflow_id,
            "version": version,
            "machine": machine,
            "source_path": source_path,
            "created_at": self.now(),
        }
        # created_at is when it was last saved: retention keeps recently saved definitions
        self.db.transact(
            lambda c: self.db.upsert(c, t.definitions, values, ["hash"], ["created_at"])
        )

    @translate
    def load_definition(self, content_hash: str) -> dict[str, Any]:
        with self.db.read() as c:
            row = c.execute(
                select(t.definitions.c.machine).where(t.definitions.c.hash == content_hash)
            ).first()
        if row is None:
            raise NotFound(f"no stored definition has hash {content_hash}")
        machine: dict[str, Any] = row[0]
        return machine

    # runs (see runs.py) -----------------------------------------------------------------------
    @translate
    def create_run(self, new: NewRun, now: float, lease: Lease | None = None) -> Run:
        return self.runs.create_run(new, now, lease)

    @translate
    def claim_run(
        self, run_id: str, lease: Lease, now: float, *, within_limits: bool = False
    ) -> Run:
        admit = self.queues.admits if within_limits else None
        while True:
            try:
                return self.runs.claim_run(run_id, lease, now, admit)
            except LimitedAfterAll:  # rolled back: again, the queue's row locked to count
                continue

    @translate
    def commit_transition(
        self, run_id: str, lease: Lease, transition: Transition, now: float
    ) -> TransitionResult:
        return self.runs.commit_transition(run_id, lease, transition, now)

    @translate
    def commit_transitions(
        self, items: Sequence[tuple[str, Lease, Transition, float]]
    ) -> list[TransitionResult | LeaseLost]:
        """Group commit (see `Runs.commit_group`): (run id, lease, transition, now) each
        `groupable`, in one transaction; per item its result or its LeaseLost."""
        return self.runs.commit_group(items)

    @translate
    def commit_and_claim(
        self,
        items: Sequence[tuple[str, Lease, Transition, float]],
        leases: Sequence[Lease],
        now: float,
        queues: Sequence[str] | None = None,
    ) -> tuple[list[TransitionResult | LeaseLost], list[Run], bool]:
        """SQLite: `commit_transitions(items)` and `claim_next_runs(leases, now, queues)` in
        ONE transaction (a group commit's flush: the claims of executors whose runs just
        ended share the steps' COMMIT instead of a transaction each, issue #15). Durable
        together or not at all; a claim lost with the flush leaves its run queued. A failed
        statement raises `RolledBack`."""
        group = self.runs.group_work(items)
        raised = False  # by the last attempt's statements: then nothing was committed

        def work(c: Connection) -> tuple[list[TransitionResult | LeaseLost], list[Run], bool]:
            nonlocal raised
            raised = False
            try:
                outcomes = group(c) if items else []
                runs, exhausted = self.queues.claim_in(c, leases, now, queues)
            except BaseException:
                raised = True
                raise
            return outcomes, runs, exhausted

        try:
            return self.db.transact(work, fsync=bool(items))
        except Exception as exc:
            if raised:  # rolled back: the caller may make the parts again, apart
                raise RolledBack(str(exc)) from exc
            raise  # at BEGIN or COMMIT, or after it: whether it committed is not known

    @translate
    def take_answer(
        self, run_id: str, step_key: str, attempt: int, now: float, *, timed_out: bool
    ) -> Answer | None:
        return self.inbox.take(run_id, step_key, attempt, now, timed_out=timed_out)

    @translate
    def child_answers(self, run_id: str, step_id: str, attempt: int) -> dict[int, Any]:
        with self.db.read() as c:
            return self.inbox.item_answers(c, run_id, step_id, attempt)

    @translate
    def heartbeat(self, run_id: str, lease: Lease, now: float, logs: Sequence[NewLog]) -> bool:
        return self.runs.heartbeat(run_id, lease, now, logs)

    @translate
    def release(self, run_id: str, lease: Lease, now: float) -> None:
        self.runs.release(run_id, lease, now)

    @translate
    def reopen_failed_run(
        self,
        run_id: str,
        step_key: str,
        lease: Lease,
        now: float,
        reopen: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Run:
        return self.runs.reopen_failed_run(run_id, step_key, lease, now, reopen)

    @translate
    def request_cancel(self, run_id: str, now: float) -> Run:
        return self.runs.request_cancel(run_id, now)

    # queues (see queueing.py) -----------------------------------------------------------------
    @translate
    def save_queue_limits(self, limits: Iterable[QueueLimits]) -> None:
        self.queues.save_queue_limits(limits)

    @translate
    def claim_next_run(
        self, lease: Lease, now: float, queues: Sequence[str] | None = None
    ) -> Run | None:
        return self.queues.claim_next_run(lease, now, queues)

    @translate
    def claim_next_runs(
        self, leases: Sequence[Lease], now: float, queues: Sequence[str] | None = None
    ) -> tuple[list[Run], bool]:
        return self.queues.claim_next_runs(leases, now, queues)

    @translate
    def next_due_at(self, queues: Sequence[str] | None = None) -> float | None:
        return self.queues.next_due_at(queues)

    @translate
    def next_claim_at(self, after: float, queues: Sequence[str] | None = None) -> float | None:
        return self.queues.next_claim_at(after, queues)

    @translate
    def announce_slot_freed(self, queue: str) -> bool:
        return self.queues.announce_slot_freed(queue)

    # workers (see workers.py) -----------------------------------------------------------------
    @translate
    def register_worker(self, worker: WorkerInfo, now: float) -> None:
        self.workers.register(worker, now)

    @translate
    def worker_heartbeat(self, worker_id: str, now: float) -> bool:
        return self.workers.heartbeat(worker_id, now)

    @translate
    def deregister_worker(self, worker_id: str) -> None:
        self.workers.deregister(worker_id)

    @translate
    def list_workers(self, now: float) -> list[dict[str, Any]]:
        return self.workers.list_workers(now)

    @translate
    def expire_dead_leases(self, now: float) -> list[str]:
        return self.workers.expire_dead_leases(now)

    @translate
    def queue_stats(self) -> list[dict[str, Any]]:
        return self.queues.queue_stats()

    @translate
    def metrics_snapshot(self, now: float) -> Snapshot:
        return self.stats.snapshot(now)

    # events and tokens (see events.py) --------------------------------------------------------
    @translate
    def send(
        self,
        new_runs: Sequence[NewRun],
        now: float,
        *,
        event: NewEvent | None = None,
        idempotency_key: str | None = None,
    ) -> Sent:
        return self.events.send(new_runs, now, event=event, idempotency_key=idempotency_key)

    @translate
    def complete_token(self, token: str, data: Any, now: float) -> str:
        return self.events.complete_token(token, data, now)

    @translate
    def purge_idempotency_keys(self, now: float) -> int:
        return self.events.purge_idempotency_keys(now)

    # cron (see schedules.py) ----------------------------------------------------------------
    @translate
    def fire_cron(
        self, workflow_id: str, fire_at: float, new: NewRun, now: float, *, skip_if_active: bool
    ) -> str | None:
        return self.schedules.fire_cron(
            workflow_id, fire_at, new, now, skip_if_active=skip_if_active
        )

    @translate
    def last_fires(self) -> dict[str, float]:
        return self.schedules.last_fires()

    @translate
    def fires_since(self, since: float, workflow_ids: Sequence[str]) -> dict[str, set[float]]:
        return self.schedules.fires_since(since, workflow_ids)

    @translate
    def fires(self, workflow_id: str, limit: int = 100) -> list[tuple[float, str | None]]:
        return self.schedules.fires(workflow_id, limit)

    # operating many runs (see search.py, control.py, retention.py) --------------------------
    @translate
    def search_runs(
        self, filter: RunFilter, limit: int = 50, before: tuple[float, str] | None = None
    ) -> list[Run]:
        return self.search.search_runs(filter, limit, before)

    @translate
    def count_runs(self, filter: RunFilter) -> int:
        return self.search.count_runs(filter)

    @translate
    def run_id_batches(self, filter: RunFilter, size: int = 500) -> Iterator[list[str]]:
        yield from self.search.batches(filter, size)

    @translate
    def cancel_runs_batch(self, run_ids: Sequence[str], now: float) -> int:
        return self.control.cancel_batch(run_ids, now)

    @translate
    def set_queue_paused(self, name: str, paused: bool, now: float) -> None:
        self.control.set_paused(name, paused, now)

    @translate
    def expire_runs(self, now: float, limit: int = 500) -> list[str]:
        return self.control.expire_due(now, limit)

    @translate
    def blocked_by(self, run: Run, now: float) -> dict[str, Any] | None:
        return self.control.blocked_by(run, now, self.workers.list_workers(now))

    @translate
    def purge_runs(
        self,
        before: float,
        statuses: Sequence[RunStatus],
        keep_definitions: Iterable[str] = (),
        batch: int = 200,
    ) -> Iterator[int]:
        yield from self.retention.purge(before, statuses, set(keep_definitions), batch)

    @translate
    def count_purgeable(self, before: float, statuses: Sequence[RunStatus]) -> int:
        return self.retention.count(before, statuses)

    # reading ------------------------------------------------------------------------------
    @translate
    def get_run(self, run_id: str) -> Run:
        with self.db.read_one() as c:
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
        with self.db.read() as c:
            return [run_from_row(r) for r in c.execute(q).mappings()]

    @translate
    def get_steps(self, run_id: str) -> list[StepState]:
        with self.db.read_one() as c:  # one SELECT, on the driver's cursor (issue #15)
            rows = self.db.direct_query(_RUN_STEPS, ("w_run",)).mappings(c, {"w_run": run_id})
            return [step_from_row(r) for r in rows]

    @translate
    def get_attempts(self, run_id: str) -> list[Attempt]:
        q = (
            select(t.attempts)
            .where(t.attempts.c.run_id == run_id)
            .order_by(t.attempts.c.step_key, t.attempts.c.attempt)
        )
        with self.db.read() as c:
            return [Attempt(**dict(r)) for r in c.execute(q).mappings()]

    @translate
    def waited_event_names(self, limit: int = 1000) -> list[str]:
        q = (
            select(t.steps.c.wait_event)
            .where(t.steps.c.wait_event.isnot(None))
            .distinct()
            .order_by(t.steps.c.wait_event)
            .limit(limit)
        )
        with self.db.read() as c:
            return [str(name) for name in c.execute(q).scalars()]

    @translate
    def get_logs(self, run_id: str, after_id: int = 0, limit: int = 1000) -> list[LogEntry]:
        # No stored id is beyond the column's 64 bits, so a larger `after_id` means "after
        # every line"; sent as is it was an error, not no lines.
        after_id = min(after_id, INT_MAX)
        q = (
            select(t.logs)
            .where(t.logs.c.run_id == run_id, t.logs.c.id > after_id)
            .order_by(t.logs.c.id)
            .limit(limit)
        )
        with self.db.read() as c:
            return [LogEntry(**dict(r)) for r in c.execute(q).mappings()]
