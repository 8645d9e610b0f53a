"""The database schema: SQLAlchemy Core tables shared by SQLite and PostgreSQL.

Times are seconds since the epoch (UTC) in double-precision columns: the same on every
backend, cheap to compare, and free of timezone ambiguity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

__all__ = ["SCHEMA_VERSION", "metadata"]

SCHEMA_VERSION = 6  # bump with a function in migrations.py for the step up


class _Json(sa.types.TypeDecorator[object]):
    """JSON (SQL NULL for None); JSONB on PostgreSQL, whose dialect is imported only when a
    PostgreSQL database is used (importing it costs a SQLite command ~50 ms of start-up)."""

    impl = JSON
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(none_as_null=True)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[object]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB(none_as_null=True))
        return dialect.type_descriptor(JSON(none_as_null=True))


Json = _Json()
metadata = MetaData()
_PG_WHERE: list[tuple[Index, Callable[[], Any]]] = []


def _partial(name: str, *cols: Any, where: Callable[[], Any]) -> None:
    """A partial index. Its PostgreSQL predicate is set by `for_postgresql`, when a
    PostgreSQL database is opened: naming it here would import PostgreSQL's dialect in
    every SQLite process."""
    _PG_WHERE.append((Index(name, *cols, sqlite_where=where()), where))


def for_postgresql() -> None:
    """Give the partial indexes their PostgreSQL predicates (again: the same ones)."""
    for index, where in _PG_WHERE:
        index.dialect_options["postgresql"]["where"] = where()


def _due() -> Any:
    return runs.c.next_at.isnot(None)


meta = Table(
    "dy_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

definitions = Table(
    "dy_definitions",
    metadata,
    Column("hash", String(64), primary_key=True),
    Column("workflow_id", String(200), nullable=False),
    Column("version", String(100), nullable=False),
    Column("machine", Json, nullable=False),
    Column("source_path", Text, nullable=False, server_default=""),
    Column("created_at", Float, nullable=False),
)

runs = Table(
    "dy_runs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("workflow_id", String(200), nullable=False),
    Column("version", String(100), nullable=False),
    Column("definition_hash", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("payload", Json),
    Column("output", Json),
    Column("error", Text),
    Column("current_step", String(200)),
    Column("current_attempt", Integer, nullable=False, server_default="0"),
    Column("step_running", Boolean, nullable=False, server_default=text("false")),
    Column("step_started_at", Float),
    # When the run reached its current step (the commit that began it): events recorded
    # from then on (less the wait's `lookback`) answer a wait_for_event there.
    Column("step_since", Float),
    Column("queue", String(200), nullable=False),
    Column("concurrency_key", String(500)),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("trigger", Json),
    Column("parent_run_id", String(40)),
    Column("parent_step", String(200)),
    Column("parent_attempt", Integer),  # the parent's attempt that started this child
    Column("idempotency_key", String(500)),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    Column("lease_owner", String(100)),
    Column("lease_host", String(255)),
    Column("lease_pid", Integer),
    Column("lease_expires_at", Float),
    # When the run next needs attention: queued -> available, waiting -> wake/timeout,
    # leased -> lease expiry. NULL: nothing to do until something external happens.
    Column("next_at", Float),
    Column("active_seconds", Float, nullable=False, server_default="0"),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("updated_at", Float, nullable=False),
    Column("tags", Json),  # ["key:value", ...]; searched through dy_run_tags
    Column("metadata", Json),  # what steps set on ctx.metadata
    Column("not_before", Float),  # a delayed run's start time
    Column("expires_at", Float),  # TTL: queued past this -> expired
)
# Claiming reads runs in exactly this order (priority first, then FIFO by next_at), so the
# scan stops after the first few due rows however many runs are queued.
_partial("dy_runs_claim", runs.c.priority.desc(), runs.c.next_at, runs.c.id, where=_due)
_partial(
    "dy_runs_claim_queue",
    runs.c.queue,
    runs.c.priority.desc(),
    runs.c.next_at,
    runs.c.id,
    where=_due,
)
_partial("dy_runs_next", runs.c.next_at, where=_due)
Index("dy_runs_created", runs.c.created_at, runs.c.id)
Index("dy_runs_status", runs.c.status, runs.c.created_at)
Index("dy_runs_workflow", runs.c.workflow_id, runs.c.created_at)
# the metrics' runs-by-workflow-and-status count reads only this index (10x less than the table)
Index("dy_runs_workflow_status", runs.c.workflow_id, runs.c.status)
Index("dy_runs_parent", runs.c.parent_run_id)
Index("dy_runs_queue_status", runs.c.queue, runs.c.status, runs.c.concurrency_key)
Index("dy_runs_queue_started", runs.c.queue, runs.c.started_at)
Index("dy_runs_idempotency", runs.c.idempotency_key)
# the TTL sweep reads only queued runs with a TTL
_partial(
    "dy_runs_expiry",
    runs.c.expires_at,
    where=lambda: sa.and_(runs.c.status == "queued", runs.c.expires_at.isnot(None)),
)

# One row per tag of a run, stamped with the run's created_at: a tag-filtered, newest-first
# page is a range scan of the primary key, however many runs there are.
run_tags = Table(
    "dy_run_tags",
    metadata,
    Column("tag", String(500), primary_key=True),
    Column("created_at", Float, primary_key=True),
    Column("run_id", String(40), primary_key=True),
)
Index("dy_run_tags_run", run_tags.c.run_id)

steps = Table(
    "dy_steps",
    metadata,
    Column("run_id", String(40), primary_key=True),
    Column("step_key", String(220), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("output", Json),
    Column("error", Text),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("wake_at", Float),
    Column("wait", Json),
    Column("wait_event", String(200)),
)
_partial("dy_steps_wait_event", steps.c.wait_event, where=lambda: steps.c.wait_event.isnot(None))

attempts = Table(
    "dy_attempts",
    metadata,
    Column("run_id", String(40), primary_key=True),
    Column("step_key", String(220), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("error_type", String(200)),
    Column("error_message", Text),
    Column("traceback", Text),
)

logs = Table(
    "dy_logs",
    metadata,
    # 64 bits: a log line per step at a million runs a day passes 2**31 in a few years, and
    # ids are never reused (SQLite's INTEGER PRIMARY KEY is its 64-bit rowid already). A
    # PostgreSQL database made before keeps its 32-bit SERIAL: widening it rewrites the table
    # under an exclusive lock, which no migration should do unasked (README, "Upgrading").
    # Parameters are bound as BIGINT either way, so `id > 2**40` is no error on either.
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("run_id", String(40), nullable=False),
    Column("step_key", String(220)),
    Column("attempt", Integer),
    Column("level", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("extra", Json),
    Column("created_at", Float, nullable=False),
)
Index("dy_logs_run", logs.c.run_id, logs.c.id)

events = Table(
    "dy_events",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("payload", Json),
    Column("idempotency_key", String(500)),
    Column("source_run_id", String(40)),
    Column("source_step", String(220)),
    Column("created_at", Float, nullable=False),
)
Index("dy_events_name", events.c.name, events.c.created_at)
# send_event is exactly once per run step: the database refuses a second one.
Index("dy_events_source", events.c.source_run_id, events.c.source_step, unique=True)

tokens = Table(
    "dy_tokens",
    metadata,
    Column("token", String(64), primary_key=True),
    Column("run_id", String(40), nullable=False),
    Column("step_key", String(220), nullable=False),
    Column("attempt", Integer, nullable=False, server_default="1"),
    Column("created_at", Float, nullable=False),
    Column("completed_at", Float),
    Column("data", Json),
)
Index("dy_tokens_run", tokens.c.run_id)  # retention deletes a run's tokens

# The answer to one wait: (run, step, attempt) is answered at most once, by whichever of an
# event, a token, a child's result, a timeout or a cancel is written first. The commit that
# parks a run reads it in the same transaction, so no answer is ever missed.
inbox = Table(
    "dy_inbox",
    metadata,
    Column("run_id", String(40), primary_key=True),
    Column("step_key", String(220), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),  # event | token | child | timeout | cancel
    Column("data", Json),
    Column("event_id", String(40)),
    Column("created_at", Float, nullable=False),
)
# an event is consumed by at most one wait of a run
Index("dy_inbox_event", inbox.c.run_id, inbox.c.event_id, unique=True)
Index("dy_inbox_event_id", inbox.c.event_id)  # retention: does any run still need an event?

idempotency_keys = Table(
    "dy_idempotency_keys",
    metadata,
    # scoped: "event:<name>:<key>" or "trigger:<workflow>:<key>"
    Column("key", Text, primary_key=True),
    Column("run_ids", Json, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

cron_fires = Table(
    "dy_cron_fires",
    metadata,
    Column("workflow_id", String(200), primary_key=True),
    Column("fire_at", Float, primary_key=True),  # one run per scheduled instant
    Column("run_id", String(40)),
    Column("created_at", Float, nullable=False),
)
Index("dy_cron_fires_run", cron_fires.c.run_id)  # retention finds a run's fire

queues = Table(
    "dy_queues",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("concurrency", Integer),
    Column("rate_limit", Integer),
    Column("rate_period", Float),
    Column("updated_at", Float, nullable=False),
    # a paused queue keeps its runs and starts none (claims read this under the row's lock)
    Column("paused", Boolean, nullable=False, server_default=text("false")),
)

workers = Table(
    "dy_workers",
    metadata,
    Column("id", String(100), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", Json),
    Column("concurrency", Integer, nullable=False),
    # its leases outlive a silent worker this long: a row staler than this is a dead worker
    Column("lease_seconds", Float, nullable=False, server_default="30"),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
)
