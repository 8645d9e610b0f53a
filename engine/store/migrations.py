"""Upgrading a database in place, one version at a time, so users keep their runs.

`MIGRATIONS[n]` brings a database from version n-1 to n, inside the migrating transaction
(PostgreSQL runs DDL transactionally; SQLite too). A fresh database is created at the latest
version directly. tests/engine/fixtures/v1-state.db was written by the version-1 code.
"""

from __future__ import annotations

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
        ("dy_steps", "resume_data"),
        ("dy_steps", "output"),
        ("dy_steps", "wait"),
        ("dy_runs", "output"),
    ):
        c.execute(sa.text(f"UPDATE {table} SET {column} = NULL WHERE {column} = {json_null}"))


MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _v2}
