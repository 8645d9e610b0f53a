"""Upgrading a database in place, one version at a time, so users keep their runs.

`MIGRATIONS[n]` brings a database from version n-1 to n, inside the migrating transaction
(PostgreSQL runs DDL transactionally; SQLite too). A fresh database is created at the latest
version directly. tests/engine/fixtures/v1-state.db was written by the version-1 code.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as t

__all__ = ["MIGRATIONS"]


def _index(name: str) -> sa.Index:
    return next(i for table in t.metadata.tables.values() for i in table.indexes if i.name == name)


def _v2(c: Connection) -> None:
    """Claim indexes in claim order; queue, start-time and idempotency indexes; JSON null
    stored as SQL NULL (the store tests `resume_data IS NULL`)."""
    for old in ("dy_runs_claim", "dy_runs_queue_status"):
        c.execute(sa.text(f"DROP INDEX IF EXISTS {old}"))
    for name in (
        "dy_runs_claim",
        "dy_runs_claim_queue",
        "dy_runs_queue_status",
        "dy_runs_queue_started",
        "dy_runs_idempotency",
    ):
        _index(name).create(c, checkfirst=True)
    json_null = "'null'::jsonb" if c.dialect.name == "postgresql" else "'null'"
    for table, column in (
        ("dy_steps", "resume_data"),  # moved to dy_inbox and dropped in v3
        ("dy_steps", "output"),
        ("dy_steps", "wait"),
        ("dy_runs", "output"),
    ):
        c.execute(sa.text(f"UPDATE {table} SET {column} = NULL WHERE {column} = {json_null}"))


def _v3(c: Connection) -> None:
    """The inbox of answers; when a run reached its step; a child's parent attempt; a
    token's attempt. Answers already handed to waiting steps move into the inbox."""
    for table, column, kind in (
        ("dy_runs", "parent_attempt", "INTEGER"),
        (
            "dy_runs",
            "step_since",
            "DOUBLE PRECISION" if c.dialect.name == "postgresql" else "FLOAT",
        ),
        ("dy_tokens", "attempt", "INTEGER NOT NULL DEFAULT 1"),
    ):
        c.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
    t.inbox.create(c, checkfirst=True)
    if c.dialect.name == "postgresql":  # keys are scoped by event or workflow now: longer
        c.execute(sa.text("ALTER TABLE dy_idempotency_keys ALTER COLUMN key TYPE text"))
    c.execute(sa.text("UPDATE dy_runs SET step_since = updated_at"))
    rows = c.execute(
        sa.text(
            "SELECT run_id, step_key, attempts, resume_data FROM dy_steps "
            "WHERE status = 'waiting' AND resume_data IS NOT NULL"
        )
    ).all()
    for row in rows:
        data = json.loads(row.resume_data) if isinstance(row.resume_data, str) else row.resume_data
        if not isinstance(data, dict):
            data = {"output": data}
        # v2 kept the whole answer here; the inbox keeps the answer's own data
        kind = "child" if "run_id" in data else "token" if "token" in data else "event"
        c.execute(
            sa.insert(t.inbox).values(
                run_id=row.run_id,
                step_key=row.step_key,
                attempt=row.attempts,
                kind=kind,
                data=data if kind == "child" else data.get("output"),
                event_id=data.get("event_id"),
                created_at=0.0,
            )
        )
    c.execute(sa.text("ALTER TABLE dy_steps DROP COLUMN resume_data"))


def _v4(c: Connection) -> None:
    """Workers register with their lease time: liveness comes from the workers table."""
    kind = "DOUBLE PRECISION" if c.dialect.name == "postgresql" else "FLOAT"
    c.execute(
        sa.text(f"ALTER TABLE dy_workers ADD COLUMN lease_seconds {kind} NOT NULL DEFAULT 30")
    )


def _v5(c: Connection) -> None:
    """Operating many runs: tags (and their search table), metadata, a delayed run's start,
    a TTL, paused queues; indexes retention deletes by."""
    real = "DOUBLE PRECISION" if c.dialect.name == "postgresql" else "FLOAT"
    json_type = "JSONB" if c.dialect.name == "postgresql" else "JSON"
    for table, column, kind in (
        ("dy_runs", "tags", json_type),
        ("dy_runs", "metadata", json_type),
        ("dy_runs", "not_before", real),
        ("dy_runs", "expires_at", real),
        ("dy_queues", "paused", "BOOLEAN NOT NULL DEFAULT false"),
    ):
        c.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
    t.run_tags.create(c, checkfirst=True)
    _index("dy_runs_expiry").create(c, checkfirst=True)
    for name in ("dy_inbox_event_id", "dy_tokens_run", "dy_cron_fires_run"):
        _index(name).create(c, checkfirst=True)


def _v6(c: Connection) -> None:
    """An index covering the metrics' count of runs by workflow and status."""
    _index("dy_runs_workflow_status").create(c, checkfirst=True)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _v2, 3: _v3, 4: _v4, 5: _v5, 6: _v6}
