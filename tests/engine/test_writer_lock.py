"""SQLite lets one writer in at a time, and its busy handler makes a writer that finds the
file locked sleep in growing steps (1, 2, 5 … 100 ms) rather than until the lock is free.
A worker's executor threads therefore queue for SQLite's lock on a lock of this process
(`Db.writing`) and never meet the busy handler among themselves (issue #15: a worker's
eight executors spent their time asleep behind each other). Other processes still meet at
SQLite's own lock. On PostgreSQL writers of different rows go at once: no such lock."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.store import db as store_db
from engine.store import open_store
from engine.store import schema as t
from tests.conftest import PG_REASON, PG_URL

THREADS, WRITES = 8, 40


def test_a_processes_writers_never_find_the_file_locked(tmp_path: Path) -> None:
    """With SQLite's busy handler off (busy_timeout 0, so a writer that found the file
    locked would fail at once), eight threads writing at once all succeed first time."""
    store = open_store(f"sqlite:///{tmp_path}/w.db")
    sa.event.listen(
        store.engine, "connect", lambda conn, _rec: conn.execute("PRAGMA busy_timeout=0")
    )
    store.engine.dispose()  # new connections, with the listener
    refused: list[BaseException] = []
    original = store.db.retryable

    def retryable(exc: BaseException) -> bool:
        refused.append(exc)
        return original(exc)

    store.db.retryable = retryable  # type: ignore[method-assign]
    barrier = threading.Barrier(THREADS)

    def writer(n: int) -> None:
        barrier.wait()
        for i in range(WRITES):
            store.db.transact(
                lambda c, key=f"w{n}-{i}": c.execute(sa.insert(t.meta).values(key=key, value="x"))
            )

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    with store.db.read() as c:
        written = c.execute(
            sa.select(sa.func.count()).select_from(t.meta).where(t.meta.c.key.like("w%"))
        ).scalar_one()
    store.close()
    assert written == THREADS * WRITES
    assert refused == []


def test_two_stores_of_one_file_share_the_lock_and_memory_stores_do_not(tmp_path: Path) -> None:
    a = open_store(f"sqlite:///{tmp_path}/same.db")
    b = open_store(f"sqlite:///{tmp_path}/./same.db")
    assert a.db.writing() is b.db.writing()
    assert store_db._writer_lock(":memory:") is not store_db._writer_lock(":memory:")
    a.close()
    b.close()


@pytest.mark.skipif(PG_URL is None, reason=PG_REASON)
def test_postgresql_writers_take_no_process_lock_and_keep_partial_indexes() -> None:
    """On PostgreSQL nothing is serialised in the process, and the claim's partial indexes
    (their predicates given when a PostgreSQL database is opened) have their WHERE."""
    assert PG_URL is not None
    store = open_store(PG_URL)
    assert not isinstance(store.db.writing(), type(threading.RLock()))
    with store.db.read() as c:
        defs = dict(
            c.execute(
                sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'dy_runs'")
            ).all()
        )
    store.close()
    assert "WHERE (next_at IS NOT NULL)" in defs["dy_runs_claim"], defs["dy_runs_claim"]
    assert "WHERE" in defs["dy_runs_expiry"]
