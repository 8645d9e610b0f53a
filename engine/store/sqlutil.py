"""Helpers shared by the SQL store's modules: error translation, row mapping, statements
built once, SQLite connection set-up."""

from __future__ import annotations

__all__ = [
    "INSERT_RUN",
    "NO_LEASE",
    "Direct",
    "DirectQuery",
    "TransactionCounter",
    "move_and_record_statement",
    "move_statement",
    "pid_alive",
    "run_from_row",
    "sqlite_begin",
    "sqlite_connect",
    "step_from_row",
    "translate",
    "upsert_statement",
]

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import insert, update
from sqlalchemy.engine import Connection, make_url

from ..errors import DatabaseError, ValueNotStorable
from ..models import Run, RunStatus, StepState, StepStatus
from . import schema as t

P = ParamSpec("P")
R = TypeVar("R")


def translate(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn driver errors into DatabaseError with the (password-free) URL."""

    def translated(store: Any, exc: sa.exc.SQLAlchemyError) -> Exception:
        url = make_url(store.url).render_as_string(hide_password=True)
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        if isinstance(exc, sa.exc.DataError):
            return ValueNotStorable(f"database {url} cannot store a value: {detail}")
        return DatabaseError(f"database {url}: {detail}")

    if inspect.isgeneratorfunction(fn):  # errors raised while the caller iterates, too

        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)  # type: ignore[misc]
            except sa.exc.SQLAlchemyError as exc:
                raise translated(args[0], exc) from exc

        return generator  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except sa.exc.SQLAlchemyError as exc:
            raise translated(args[0], exc) from exc

    return wrapper


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


INSERT_RUN = insert(t.runs)


@functools.cache
def move_statement(run_keys: tuple[str, ...]) -> Any:
    """Move the run, only while `w_owner` holds its lease; returns its cancel flag."""
    set_: dict[str, Any] = {
        k: sa.bindparam(k, type_=t.runs.c[k].type) for k in run_keys if not k.startswith("w_")
    }
    set_["active_seconds"] = t.runs.c.active_seconds + sa.bindparam("w_active", type_=sa.Float)
    return (
        update(t.runs)
        .where(t.runs.c.id == sa.bindparam("w_id"), t.runs.c.lease_owner == sa.bindparam("w_owner"))
        .values(set_)
        .returning(t.runs.c.cancel_requested)
    )


@functools.cache
def move_and_record_statement(
    run_keys: tuple[str, ...], step_cols: tuple[str, ...], step_updates: tuple[str, ...]
) -> Any:
    """PostgreSQL: move the run (lease-checked) and upsert its step in one statement.

    `run_keys` are MOVE_RUN's parameter names; the step's values come as `s_<column>`.
    """
    set_: dict[str, Any] = {
        k: sa.bindparam(k, type_=t.runs.c[k].type) for k in run_keys if not k.startswith("w_")
    }
    set_["active_seconds"] = t.runs.c.active_seconds + sa.bindparam("w_active", type_=sa.Float)
    moved = (
        update(t.runs)
        .where(t.runs.c.id == sa.bindparam("w_id"), t.runs.c.lease_owner == sa.bindparam("w_owner"))
        .values(set_)
        .returning(t.runs.c.cancel_requested, t.runs.c.parent_run_id, t.runs.c.parent_step)
        .cte("moved")
    )
    source = sa.select(
        *[
            sa.cast(sa.bindparam(f"s_{k}", type_=t.steps.c[k].type), t.steps.c[k].type).label(k)
            for k in step_cols
        ]
    ).select_from(moved)
    record = dialect_insert("postgresql")(t.steps).from_select(list(step_cols), source)
    record = record.on_conflict_do_update(
        index_elements=["run_id", "step_key"], set_={k: record.excluded[k] for k in step_updates}
    )
    return sa.select(moved.c.cancel_requested, moved.c.parent_run_id, moved.c.parent_step).add_cte(
        record.cte("recorded")
    )


def dialect_insert(dialect: str) -> Callable[..., Any]:
    """The INSERT with ON CONFLICT of `dialect` (PostgreSQL's dialect is imported only when
    it is used: a SQLite process never loads it)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


@functools.cache
def upsert_statement(
    dialect: str, table: sa.Table, keys: tuple[str, ...], update_cols: tuple[str, ...]
) -> Any:
    stmt = dialect_insert(dialect)(table)
    return stmt.on_conflict_do_update(
        index_elements=list(keys), set_={k: stmt.excluded[k] for k in update_cols}
    )


class Direct:
    """A statement compiled once (for one dialect and one set of parameter names) and run on
    the connection's own DBAPI cursor, inside whatever the connection is in (its transaction,
    or the driver's autocommit: `Db.alone`): SQLAlchemy's per-call machinery (execution
    context, events, result objects) is skipped where the profile showed it cost more than
    the statement itself (issue #15: the runner's per-step writes and the claim's reads; on
    PostgreSQL a worker is bound by its own CPU, not by the round trip). Parameters go
    through the columns' own bind processors (JSON encoded once, by SQLAlchemy's serializer);
    a driver error goes through SQLAlchemy's own handling, so `translate` and
    `Db.transact`'s retries see what they always saw and a disconnect invalidates the pool."""

    def __init__(self, statement: Any, dialect: sa.engine.Dialect, keys: Sequence[str]) -> None:
        self.compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        self.sql = self.compiled.string
        self.dialect = dialect
        processors = self.compiled._bind_processors
        # qmark (SQLite) binds by position, pyformat (psycopg) by name
        self.positional = self.compiled.positiontup is not None
        names = self.compiled.positiontup or list(self.compiled.bind_names.values())
        self.order = [(name, processors.get(name)) for name in dict.fromkeys(names)]
        # known from the statement: psycopg builds `cursor.description` anew at each look
        self.returns_rows = bool(self.compiled._result_columns)

    def execute(self, c: Connection, params: dict[str, Any]) -> list[Any]:
        """The rows the statement returns (RETURNING), as driver tuples."""
        values = self.compiled.construct_params(params)
        args: Any
        if self.positional:
            args = [fn(values[name]) if fn else values[name] for name, fn in self.order]
        else:
            args = {name: fn(values[name]) if fn else values[name] for name, fn in self.order}
        cursor = c.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(self.sql, args)
            return self._fetch(cursor) if self.returns_rows else []
        except self.dialect.loaded_dbapi.Error as exc:
            # SQLAlchemy's own handling: its error class, and on a disconnect the
            # connection and every other of the pool invalidated (the server restarted:
            # all of them are dead), its `handle_error` events run
            c._handle_dbapi_exception(exc, self.sql, args, cursor, None)
        finally:
            with contextlib.suppress(Exception):  # (a dead connection's cursor)
                cursor.close()

    def _fetch(self, cursor: Any) -> list[Any]:
        return list(cursor.fetchall())


class DirectQuery(Direct):
    """A `Direct` SELECT whose rows come back as dicts by column key, each value through
    its column's own result processor (JSON decoded as SQLAlchemy decodes it): the claim's
    reads and `get_steps` (issue #15). No expanding (IN-list) parameters."""

    def __init__(self, statement: Any, dialect: sa.engine.Dialect, keys: Sequence[str]) -> None:
        super().__init__(statement, dialect, keys)
        self.columns: list[tuple[str, Any]] | None = None  # from the first rows' description

    def _fetch(self, cursor: Any) -> list[dict[str, Any]]:
        columns = self.columns
        if columns is None:
            # each column's processor as SQLAlchemy picks it: by the driver's type of the
            # column (psycopg's float oids need none, its numerics do)
            dialect = self.dialect
            columns = self.columns = [
                (entry.keyname, entry.type.dialect_impl(dialect).result_processor(dialect, d[1]))
                for entry, d in zip(self.compiled._result_columns, cursor.description, strict=True)
            ]
        return [
            {key: fn(value) if fn else value for (key, fn), value in zip(columns, row, strict=True)}
            for row in cursor.fetchall()
        ]

    def mappings(self, c: Connection, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self.execute(c, params)


NO_LEASE: dict[str, Any] = {
    "lease_owner": None,
    "lease_host": None,
    "lease_pid": None,
    "lease_expires_at": None,
}


def run_from_row(row: Any, *, fresh: bool = False) -> Run:
    r = dict(row)
    return Run(
        fresh=fresh,
        id=r["id"],
        workflow_id=r["workflow_id"],
        version=r["version"],
        definition_hash=r["definition_hash"],
        status=RunStatus(r["status"]),
        payload=r.get("payload"),
        output=r.get("output"),
        error=r.get("error"),
        current_step=r.get("current_step"),
        current_attempt=r.get("current_attempt") or 0,
        step_running=bool(r.get("step_running")),
        queue=r["queue"],
        concurrency_key=r.get("concurrency_key"),
        priority=r.get("priority") or 0,
        trigger=r.get("trigger") or {},
        parent_run_id=r.get("parent_run_id"),
        parent_step=r.get("parent_step"),
        idempotency_key=r.get("idempotency_key"),
        cancel_requested=bool(r.get("cancel_requested")),
        lease_owner=r.get("lease_owner"),
        lease_expires_at=r.get("lease_expires_at"),
        next_at=r.get("next_at"),
        active_seconds=r.get("active_seconds") or 0.0,
        created_at=r["created_at"],
        started_at=r.get("started_at"),
        finished_at=r.get("finished_at"),
        updated_at=r["updated_at"],
        tags=tuple(r.get("tags") or ()),
        metadata=dict(r.get("metadata") or {}),
        not_before=r.get("not_before"),
        expires_at=r.get("expires_at"),
    )


def step_from_row(row: Any) -> StepState:
    r = dict(row)
    r.pop("wait_event", None)
    r["status"] = StepStatus(r["status"])
    return StepState(**r)


def sqlite_connect(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    record.info["dy_synchronous"] = "FULL"
    cur.execute("PRAGMA busy_timeout=60000")
    # a large database's indexes stay in memory: pages read through a shared memory map and
    # a 16 MiB page cache per connection (the default 2 MiB makes every write at a million
    # runs read its index pages again)
    cur.execute("PRAGMA mmap_size=268435456")
    cur.execute("PRAGMA cache_size=-16384")
    cur.close()


def sqlite_begin(conn: Connection) -> None:
    """Take SQLite's write lock at BEGIN, so concurrent claimers queue up instead of
    deadlocking on a lock upgrade (sent to the driver directly: this runs per transaction)."""
    options = conn.get_execution_options()
    read = options.get("dy_read", False)
    statement = "BEGIN" if read else "BEGIN IMMEDIATE"
    dbapi = conn.dialect.loaded_dbapi
    driver = conn.connection.dbapi_connection
    try:
        if not read:  # each write says whether its COMMIT waits for the disk (Db.transact)
            synchronous = "NORMAL" if options.get("dy_no_fsync") else "FULL"
            info = conn.connection.info
            if info.get("dy_synchronous") != synchronous:
                statement = f"PRAGMA synchronous={synchronous}"
                driver.execute(statement)  # type: ignore[union-attr]
                info["dy_synchronous"] = synchronous
                statement = "BEGIN IMMEDIATE"
        driver.execute(statement)  # type: ignore[union-attr]
    except dbapi.Error as exc:
        # raised as SQLAlchemy raises a statement's driver error (SQLAlchemy does not wrap
        # one from this listener): a lock held past the busy timeout, by a writer outside
        # the `-writer` turn (the sqlite3 shell, a backup), is then retried by
        # `Db.transact` and reaches a user as a DatabaseError, not a traceback
        raise sa.exc.DBAPIError.instance(
            statement, (), exc, dbapi.Error, dialect=conn.dialect
        ) from exc


class TransactionCounter:
    """Counts the transactions a store's `Db` commits: explicit COMMITs, statements run in
    autocommit through SQLAlchemy, and `Db.alone`'s on the driver (each its own
    transaction). For tests and benchmarks."""

    def __init__(self, db: Any) -> None:
        self.db, self.engine = db, db.engine
        self._commits = 0
        self._alone_before = db.alone_statements
        sa.event.listen(self.engine, "commit", self._commit)
        sa.event.listen(self.engine, "after_cursor_execute", self._statement)

    @property
    def count(self) -> int:
        alone: int = self.db.alone_statements - self._alone_before
        return self._commits + alone

    def reset(self) -> None:
        self._commits, self._alone_before = 0, self.db.alone_statements

    def _commit(self, conn: Any) -> None:
        self._commits += 1

    def _statement(
        self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
    ) -> None:
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            self._commits += 1

    def close(self) -> None:
        sa.event.remove(self.engine, "commit", self._commit)
        sa.event.remove(self.engine, "after_cursor_execute", self._statement)
