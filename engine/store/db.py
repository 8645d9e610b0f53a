"""One connection and dialect helper shared by every part of the SQL store.

`Db` owns the SQLAlchemy engine and the few things that differ between SQLite and
PostgreSQL: how a transaction takes its locks, upserts, NOTIFY, and which driver errors mean
"try the whole transaction again" (a deadlock, a serialization failure, SQLite's busy lock).
It also owns the database's clock: every time that matters (leases, rate windows, timers,
cron fires, event order) is the database server's time, read through `Db.now()`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url

try:
    import fcntl
except ImportError:  # Windows: processes meet at SQLite's own lock
    fcntl = None  # type: ignore[assignment]

from ..errors import ConfigError, DatabaseError
from ..models import Lease
from .sqlutil import (
    Direct,
    DirectQuery,
    dialect_insert,
    sqlite_begin,
    sqlite_connect,
    upsert_statement,
)

__all__ = ["NOTIFY_CHANNEL", "Db", "DbClock"]

T = TypeVar("T")
log = logging.getLogger(__name__)
NOTIFY_CHANNEL = "durable_yaml"
RETRIES = 8  # a transaction that lost a deadlock or a busy lock is tried this many times
_WRITERS: dict[str, WriterLock] = {}  # per SQLite file: this process's writers queue here
_WRITERS_LOCK = threading.Lock()
_INHERITED: list[Any] = []  # a forked child's inherited SQLite connections (Db._forget_kept)


class WriterLock:
    """The turn of one writer of one SQLite file, among the threads of this process and
    among processes: held around each write transaction, before BEGIN IMMEDIATE.

    SQLite lets one writer in at a time, and a writer that finds the file locked sleeps in
    the busy handler's steps (1, 2, 5, 10 … 100 ms), not until the lock is free: eight
    executor threads of one worker spent their time asleep behind each other, and a worker
    process that lost the race a few times in a row waited a tenth of a second or more for
    a claim of a millisecond (#12: 0.1 to 0.2% of four busy workers' claims). Here the threads
    of a process queue on a reentrant lock and the processes on an exclusive `flock` of the
    file's `-writer` companion, both of which wake the next writer the moment the last one
    is done. The kernel drops the `flock` of a process that dies, so a killed worker
    leaves nothing held, and a forked child closes what it inherited. Where that file
    cannot be opened or locked (a read-only folder, another user's database, a file system
    without locks, no `fcntl`), processes meet at SQLite's own lock as before."""

    def __init__(self, companion: Path | None) -> None:
        self._threads = threading.RLock()
        self._companion = companion
        self._path = str(companion)
        self._mode: int | None = None  # the companion's, from the database's (on first use)
        self._fd: int | None = None  # open while this process holds the turn
        self._depth = 0  # how deep the holding thread is (flock is taken at depth 0 only)

    def __enter__(self) -> WriterLock:
        self._threads.acquire()
        if self._depth == 0:
            try:
                self._fd = self._lock_file()
            except BaseException:
                self._threads.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._fd is not None:
                fd, self._fd = self._fd, None
                # its only descriptor closed: the flock ends with it (a close that reports
                # an error closed it all the same, after the writer's COMMIT: never raised)
                with suppress(OSError):
                    os.close(fd)
        finally:
            self._threads.release()

    def idle(self, timeout: float) -> bool:
        """Hold this process's turn without the file's lock (no writer of this process
        writes until `done_idle`); False if it did not come within `timeout` seconds."""
        return self._threads.acquire(timeout=timeout)

    def done_idle(self) -> None:
        self._threads.release()

    def _forget(self) -> None:
        """In a forked child: nothing of the parent's is held here (its threads are gone).
        An inherited descriptor is closed, never unlocked: its `flock` is the parent's."""
        if self._fd is not None:
            with suppress(OSError):
                os.close(self._fd)
        self._threads = threading.RLock()
        self._fd, self._depth = None, 0

    def _lock_file(self) -> int | None:
        """The companion opened and locked (opened for each turn: a process keeps no
        descriptor between writes, however many databases it opens and closes)."""
        companion = self._companion
        if companion is None or fcntl is None:
            return None
        if self._mode is None:
            # the database's owner and group only: any user who could open it could lock
            # it, and so stall every writer
            self._mode = _companion_mode(companion)
        try:
            fd = os.open(self._path, _OPEN_FLAGS, self._mode)
        except OSError as exc:
            self._without(f"cannot open {companion}: {exc.strerror or exc}")
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks (some NFS and FUSE mounts)
            os.close(fd)
            self._without(f"cannot lock {companion}: {exc.strerror or exc}")
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _without(self, why: str) -> None:
        """From now on this process's writers meet other processes at SQLite's lock."""
        self._companion = None
        log.warning("%s; writers of other processes wait in SQLite's busy handler", why)


_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def _companion_mode(companion: Path) -> int:
    """The database file's read and write bits for its owner and group (0o600 if the
    database is not made yet)."""
    database = companion.with_name(companion.name.removesuffix("-writer"))
    try:
        return (database.stat().st_mode & 0o660) | 0o600
    except OSError:
        return 0o600


def _forget_writers() -> None:
    global _WRITERS_LOCK
    _WRITERS_LOCK = threading.Lock()  # another thread of the parent may have held it
    for lock in _WRITERS.values():
        lock._forget()
    for db in list(_OPEN):
        db._forget_kept()


if hasattr(os, "register_at_fork"):  # a child must not inherit a parent's turn (nor its flock)
    os.register_at_fork(after_in_child=_forget_writers)


def _writer_lock(database: str) -> WriterLock:
    """The `WriterLock` of one SQLite file, shared by every engine of this process."""
    if not database or database.startswith((":", "file:")):
        return WriterLock(None)  # a memory database (or a URI): its engine's own
    path = Path(database).resolve()
    with _WRITERS_LOCK:
        return _WRITERS.setdefault(str(path), WriterLock(path.with_name(path.name + "-writer")))


class DbClock:
    """The database server's clock, read without a round trip per use.

    The offset between this host's clock and the server's is measured (the midpoint of a
    round trip) on first use and every `refresh` seconds; `now()` is the local clock plus
    that offset. Hosts whose clocks disagree therefore agree on leases, timers and fires.
    `skew` shifts the local clock (tests simulate a host whose clock is wrong).
    """

    def __init__(
        self, measure: Callable[[], float], refresh: float = 10.0, skew: float = 0.0
    ) -> None:
        self._measure = measure
        self._refresh = refresh
        self.skew = skew
        self._offset: float | None = None
        self._measured_at = 0.0
        self._lock = threading.Lock()

    def local(self) -> float:
        return time.time() + self.skew

    def now(self) -> float:
        local = self.local()
        if self._offset is None or local - self._measured_at > self._refresh:
            self._remeasure()
        assert self._offset is not None
        return self.local() + self._offset

    __call__ = now

    def _remeasure(self) -> None:
        with self._lock:
            before = self.local()
            try:
                server = self._measure()
            except DatabaseError:
                if self._offset is None:
                    raise
                self._measured_at = before  # keep the last offset through an outage
                return
            after = self.local()
            self._offset = server - (before + after) / 2
            self._measured_at = after

    @property
    def offset(self) -> float:
        self.now()
        assert self._offset is not None
        return self._offset


_OPEN: weakref.WeakSet[Db] = weakref.WeakSet()  # every Db of this process not yet closed


def close_all() -> None:
    """Close every database this process opened (the `durable-yaml` command's exit, which
    then skips the interpreter's teardown: SQLite's last close folds the write-ahead log
    into the database file, PostgreSQL's connections end with a goodbye, not a dropped
    socket)."""
    for db in list(_OPEN):
        db.close()


class Db:
    def __init__(self, url: str, *, skew: float = 0.0) -> None:
        self.url = url
        self._direct: dict[tuple[Any, tuple[str, ...]], Direct] = {}
        self._queries: dict[tuple[Any, tuple[str, ...]], DirectQuery] = {}
        try:
            self._create_engine(url)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError, TypeError) as exc:
            # a URL that check_db_url did not see: SQLAlchemy's refusal is a setting's mistake
            raise ConfigError(f"database URL cannot be used: {_first_line(exc)}") from None
        self.clock = DbClock(self._server_time, skew=skew)
        self.alone_statements = 0  # PostgreSQL: how many `alone` ran (for tests and benchmarks)
        self._counting = threading.Lock()
        self._kept: dict[bool, Connection] = {}  # SQLite: see `_write_connection`
        self._in_kept = False
        _OPEN.add(self)

    def _create_engine(self, url: str) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if "\x00" in database:
                raise ValueError("the file name contains a NUL character")
            if database and database != ":memory:" and not database.startswith("file:"):
                # OSError if it cannot be made: the engine's caller names the setting
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = sa.create_engine(
                url, connect_args={"timeout": 60, "check_same_thread": False}
            )
            event.listen(self.engine, "connect", sqlite_connect)
            event.listen(self.engine, "begin", sqlite_begin)
            self._writers: WriterLock | None = _writer_lock(database)
            # a file's writers share kept connections; a memory database's pool gives each
            # thread a database of its own
            self._keeps = bool(database) and not database.startswith((":", "file:"))
        elif self.dialect == "postgresql":
            # no pool_pre_ping: a ping per checkout was a third of a worker's round trips
            # (issue #15); a connection idle for PING_IDLE_SECONDS is pinged (a restarted
            # server, a dropped idle connection), a busy one is not; a disconnect found by a
            # statement invalidates the pool (SQLAlchemy's own handling) and the caller
            # sees a DatabaseError, as for any failure of the database
            from . import schema

            schema.for_postgresql()
            self.engine = sa.create_engine(url, pool_size=10, max_overflow=20)
            self._writers = None  # row locks: writers of different rows go at once
            self._keeps = False
            dialect = self.engine.dialect

            def ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
                _ping_if_idle(dialect, dbapi_connection, record)

            event.listen(self.engine, "checkin", _mark_idle)
            event.listen(self.engine, "checkin", _out_of_autocommit)
            event.listen(self.engine, "checkout", ping_if_idle)
        else:
            raise ConfigError(
                f"unsupported database {parsed.drivername!r}; use sqlite:/// or postgresql://"
            )

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    def now(self) -> float:
        return self.clock.now()

    def _server_time(self) -> float:
        if not self.is_postgres:
            # SQLite is embedded: its clock is this host's (its `julianday('now')` reads the
            # same clock). Never a query here: a claim asks for the time inside its write
            # transaction, and a second connection would wait for that very lock.
            return time.time()
        query = "SELECT extract(epoch from clock_timestamp())"
        try:
            with self.engine.connect() as c:
                return float(c.execute(sa.text(query)).scalar_one())
        except sa.exc.SQLAlchemyError as exc:
            raise DatabaseError(f"database {self.safe_url}: {_first_line(exc)}") from exc

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    # transactions ---------------------------------------------------------------------------
    def transact(self, work: Callable[[Connection], T], *, fsync: bool = True) -> T:
        """Run `work` in one transaction, again from the start if the database chose it as a
        deadlock victim or (SQLite) could not take its lock in time. `work` must only touch
        the database: anything it does is undone with the transaction.

        `fsync=False` (SQLite; PostgreSQL ignores it): the COMMIT writes the write-ahead
        log without waiting for the disk (`PRAGMA synchronous=NORMAL` for this transaction
        alone). The commit survives any crash of processes; only the machine's crash can
        lose it, and only together with every commit after it that did not fsync: the log
        is one file, appended in commit order, so the next fsync'd commit makes it durable
        too, and nothing written after it is ever durable without it. A claim is such a
        write (`Queues.claim_next_run`): every process that could hold its lease dies with
        the machine, and a lost claim leaves the run queued, to be claimed again."""
        for attempt in range(RETRIES):
            try:
                with self.writing(), self._write_connection(fsync) as c, c.begin():
                    return work(c)
            except sa.exc.OperationalError as exc:
                if attempt + 1 == RETRIES or not self.retryable(exc):
                    raise
                time.sleep(min(0.5, 0.005 * 2**attempt))
        raise AssertionError("unreachable")

    @contextmanager
    def _write_connection(self, fsync: bool) -> Iterator[Connection]:
        """The connection of a write transaction (its turn held: `writing`).

        SQLite: one connection per kind of write (`fsync` or not) is kept for the Db's
        life, never returned to the pool: a checkout and a checkin (the pool's events, its
        reset's ROLLBACK) cost more than a step's statements (issue #15), and each kept
        connection's `synchronous` stays as its kind needs it. Writers of this process take
        turns (`WriterLock`), so one thread at a time uses them; a write nested in another
        (the same thread, its turn held twice) and PostgreSQL take one from the pool."""
        if not self._keeps or self._in_kept:
            with self.engine.connect() as c:
                if not fsync:
                    c.execution_options(dy_no_fsync=True)
                yield c
            return
        kept = self._kept.get(fsync)
        if kept is None or kept.closed or kept.invalidated:
            kept = self._kept[fsync] = self.engine.connect().execution_options(
                dy_no_fsync=not fsync
            )
        c = kept
        self._in_kept = True
        try:
            yield c
        except BaseException as exc:
            # A fresh connection next time after the driver's error, and after anything
            # (a KeyboardInterrupt at BEGIN or COMMIT, a listener's error) that left the
            # driver inside its transaction: a pool's connection is rolled back when it is
            # returned, a kept one would keep SQLite's write lock and fail the next BEGIN.
            if isinstance(exc, sa.exc.DBAPIError) or _in_transaction(c):
                self._kept.pop(fsync, None)
                with suppress(Exception):
                    c.close()  # (its checkin rolls the driver's transaction back)
            raise
        finally:
            self._in_kept = False

    def _close_kept(self) -> None:
        """Close the kept write connections, once no writer of this process uses them (a
        writer stuck in its transaction for seconds keeps its own)."""
        if self._writers is None or not self._kept:
            return  # (kept only where `_keeps`: SQLite files, whose writers take turns)
        if not self._writers.idle(timeout=5.0):
            return
        try:
            if self._in_kept:  # this very thread is inside a write: leave it its connection
                return
            kept, self._kept = self._kept, {}
            for c in kept.values():
                with suppress(Exception):
                    c.close()
        finally:
            self._writers.done_idle()

    def _forget_kept(self) -> None:
        """In a forked child: the parent's connections, kept and pooled, are never used
        nor closed by it (closing one could fold the parent's SQLite write-ahead log, or
        end its PostgreSQL session): the kept ones stay referenced for the child's life,
        the pool is replaced (SQLAlchemy's `dispose(close=False)`). SQLite itself does not
        support a child writing a database its parent has open (its lock records are
        per process): a child should open its databases anew, after exec."""
        _INHERITED.extend(self._kept.values())
        self._kept, self._in_kept = {}, False
        with suppress(Exception):
            self.engine.dispose(close=False)

    def retryable(self, exc: BaseException) -> bool:
        """A deadlock, a serialization failure or a busy/locked SQLite database."""
        orig = getattr(exc, "orig", exc)
        if self.is_postgres:
            return getattr(orig, "sqlstate", None) in ("40P01", "40001")
        text = str(orig).lower()
        return "locked" in text or "busy" in text

    def read(self) -> Connection:
        """A connection for reading: on SQLite a plain (deferred) BEGIN, so a reader sees a
        WAL snapshot and never waits for a writer, nor makes one wait."""
        return self.engine.connect().execution_options(dy_read=True)

    @contextmanager
    def read_one(self) -> Iterator[Connection]:
        """A connection for a read of one statement: on PostgreSQL in autocommit (a
        statement is its own snapshot, so it reads what the same statement would read in a
        transaction of its own, without the BEGIN and ROLLBACK round trips: two of the 13
        a queued three-step run took, issue #15); on SQLite `read`'s."""
        if self.is_postgres:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                yield c
        else:
            with self.read() as c:
                yield c

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """One statement that is a whole transaction (PostgreSQL: no BEGIN/COMMIT trips)."""
        if self.is_postgres:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                yield c
        else:
            with self.writing(), self.engine.begin() as c:
                yield c

    def alone(
        self,
        statement: Any,
        keys: Sequence[str],
        params: dict[str, Any],
        *,
        query: bool = False,
        late: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[Any]:
        """`statement` (compiled once: `direct`, or `direct_query` with `query`, whose rows
        come back as dicts) as a whole transaction of its own; the rows it returns. `late`
        fills `params` in once the connection is held, just before the statement is sent
        (a time stamped after any wait for the pool; it must not query: a second
        connection then could wait for the one held).
        PostgreSQL runs it in the driver's autocommit on a pooled connection:
        atomic and durable, without BEGIN and COMMIT round trips, and without SQLAlchemy's
        isolation-level switch and reset around it (issue #15: a worker's common step).
        The connection goes back to the pool out of autocommit; one interrupted inside the
        statement (a KeyboardInterrupt), whose state is not known, is discarded instead.
        SQLite: a write transaction."""
        direct = self.direct_query(statement, keys) if query else self.direct(statement, keys)
        if not self.is_postgres:

            def work(c: Connection) -> list[Any]:
                if late is not None:
                    late(params)
                return direct.execute(c, params)

            return self.transact(work)
        with self._counting:
            self.alone_statements += 1  # (seen by TransactionCounter)
        with self.engine.connect() as c:
            # out of autocommit again as the pool takes it back, however this block ends
            # (`_out_of_autocommit`: an interrupt can land between any two lines here)
            c.connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]
            try:
                if late is not None:
                    late(params)
                return direct.execute(c, params)
            except sa.exc.DBAPIError:
                raise  # the statement failed: the connection is idle (or invalidated, if gone)
            except BaseException:
                c.invalidate()  # interrupted inside the statement: its state is not known
                raise

    def writing(self) -> AbstractContextManager[Any]:
        """Held around a write transaction: on SQLite this process's writers take turns
        here (see `_writer_lock`); on PostgreSQL nothing."""
        return self._writers if self._writers is not None else nullcontext()

    # dialect hooks --------------------------------------------------------------------------
    def locked(self, q: sa.Select[Any], *, skip_locked: bool = False) -> sa.Select[Any]:
        """`q` taking row locks (PostgreSQL); SQLite's BEGIN IMMEDIATE already serialises."""
        return q.with_for_update(skip_locked=skip_locked) if self.is_postgres else q

    def lock_names(
        self, c: Connection, names: Iterable[str | tuple[str, ...] | None], now: float
    ) -> float:
        """Transaction-long locks on event names (PostgreSQL advisory locks, taken in sorted
        order so two transactions never wait for each other; SQLite's write lock is held
        already), then the database's time, read under them.

        Whatever records an event, or makes a run reach a `wait_for_event` of that name, takes
        this lock and stamps its write with the time read under it: for one name, those
        stamps are in commit order, so "recorded after the run reached the step" is exact.
        A tuple among `names` is a wait_for_any's names: each is locked."""
        if self.is_postgres:
            flat = {n for item in names for n in (item if isinstance(item, tuple) else (item,))}
            for name in sorted(n for n in flat if n):
                c.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": name})
        return max(now, self.now())  # (a caller's clock may run ahead: tests, virtual time)

    def direct(self, statement: Any, keys: Sequence[str]) -> Direct:
        """`statement` compiled once for these parameter names (see `Direct`)."""
        key = (statement, tuple(keys))  # statements built once (cached): the key is the object
        found = self._direct.get(key)
        if found is None:
            found = self._direct[key] = Direct(statement, self.engine.dialect, keys)
        return found

    def direct_query(self, statement: Any, keys: Sequence[str]) -> DirectQuery:
        """A SELECT compiled once, its rows as dicts (see `DirectQuery`)."""
        key = (statement, tuple(keys))
        found = self._queries.get(key)
        if found is None:
            found = self._queries[key] = DirectQuery(statement, self.engine.dialect, keys)
        return found

    def upsert(
        self,
        c: Connection,
        table: sa.Table,
        values: dict[str, Any],
        keys: list[str],
        update_cols: list[str],
    ) -> None:
        c.execute(upsert_statement(self.dialect, table, tuple(keys), tuple(update_cols)), values)

    def insert_ignore(
        self, c: Connection, table: sa.Table, values: dict[str, Any], keys: list[str]
    ) -> bool:
        """Insert unless the key exists; True if inserted. (RETURNING, because a driver's
        rowcount for ON CONFLICT DO NOTHING is not reliable: psycopg reports -1.)"""
        stmt = (
            dialect_insert(self.dialect)(table)
            .values(**values)
            .on_conflict_do_nothing(index_elements=keys)
        )
        return c.execute(stmt.returning(table.c[keys[0]])).first() is not None

    def notify(self, c: Connection) -> None:
        """Wake listening workers (PostgreSQL NOTIFY, delivered at commit)."""
        if self.is_postgres:
            c.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    @staticmethod
    def lease_values(lease: Lease, now: float) -> dict[str, Any]:
        expires = now + lease.seconds
        return {
            "lease_owner": lease.owner,
            "lease_host": lease.host,
            "lease_pid": lease.pid,
            "lease_expires_at": expires,
            "next_at": expires,
        }

    def close(self) -> None:
        _OPEN.discard(self)
        self._close_kept()
        self.engine.dispose()


def _in_transaction(c: Connection) -> bool:
    """Whether the driver's connection under `c` is inside a transaction (True if that
    cannot be told)."""
    try:
        return bool(c.connection.dbapi_connection.in_transaction)  # type: ignore[union-attr]
    except Exception:
        return True


PING_IDLE_SECONDS = 1.0


def _mark_idle(dbapi_connection: Any, record: Any) -> None:
    record.info["dy_idle_since"] = time.monotonic()


def _out_of_autocommit(dbapi_connection: Any, record: Any) -> None:
    """Checkin (PostgreSQL): a connection that `Db.alone` switched to the driver's
    autocommit goes back to the pool out of it, so the next transaction on it is one; one
    the driver will not switch (a statement still in flight) is closed instead."""
    if dbapi_connection is None or not dbapi_connection.autocommit:
        return
    try:
        dbapi_connection.autocommit = False
    except Exception:
        record.invalidate()


def _ping_if_idle(dialect: sa.engine.Dialect, dbapi_connection: Any, record: Any) -> None:
    """Checkout: ping a connection that sat idle a while (as `pool_pre_ping` pings every
    one); if it is dead the pool replaces it (DisconnectionError: SQLAlchemy's documented
    way for a checkout listener to refuse a connection)."""
    since = record.info.get("dy_idle_since")
    if since is None or time.monotonic() - since < PING_IDLE_SECONDS:
        return
    try:
        dialect.do_ping(dbapi_connection)
    except Exception as exc:
        raise sa.exc.DisconnectionError(f"an idle connection was found dead: {exc}") from exc


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
