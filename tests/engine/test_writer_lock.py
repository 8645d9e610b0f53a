"""SQLite lets one writer in at a time, and its busy handler makes a writer that finds the
file locked sleep in growing steps (1, 2, 5 … 100 ms) rather than until the lock is free.
A worker's executor threads therefore queue for SQLite's lock on a lock of this process
(`Db.writing`) and never meet the busy handler among themselves (issue #15: a worker's
eight executors spent their time asleep behind each other). Processes queue on a `flock`
of the file's `-writer` companion (issue #12: a worker process that lost SQLite's race a
few times in a row waited over 100 ms for a claim). On PostgreSQL writers of different rows
go at once: no such lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import nullcontext
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


WRITER = textwrap.dedent(
    """
    import sys
    import sqlalchemy as sa
    from engine.store import open_store
    from engine.store import schema as t

    store = open_store(sys.argv[1])
    store.migrate()
    sa.event.listen(
        store.engine, "connect", lambda conn, _rec: conn.execute("PRAGMA busy_timeout=0")
    )
    store.engine.dispose()
    refused = []
    original = store.db.retryable

    def retryable(exc):
        refused.append(exc)
        return original(exc)

    store.db.retryable = retryable
    while not __import__("os").path.exists(sys.argv[3]):  # all start together
        pass
    for i in range(int(sys.argv[4])):
        store.db.transact(
            lambda c, key=f"{sys.argv[2]}-{i}": c.execute(
                sa.insert(t.meta).values(key=key, value="x")
            )
        )
    print(len(refused))
    """
)


def test_writers_of_four_processes_never_find_the_file_locked(tmp_path: Path) -> None:
    """Four processes, each with SQLite's busy handler off, write at once: every write
    succeeds first time, because they take turns on the companion file's flock."""
    url = f"sqlite:///{tmp_path}/p.db"
    open_store(url).migrate()
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, f"p{n}", str(go), "150"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    time.sleep(1.5)  # all four have opened the database and wait for the go
    go.write_text("")
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert outs == ["0", "0", "0", "0"]
    store = open_store(url)
    with store.db.read() as c:
        written = c.execute(
            sa.select(sa.func.count()).select_from(t.meta).where(t.meta.c.key.like("p%-%"))
        ).scalar_one()
    store.close()
    assert written == 4 * 150
    assert (tmp_path / "p.db-writer").exists()


HOLDER = textwrap.dedent(
    """
    import sys, time
    import sqlalchemy as sa
    from engine.store import open_store
    from engine.store import schema as t

    store = open_store(sys.argv[1])
    with store.db.writing():
        print("holding", flush=True)
        time.sleep(600)
    """
)


def test_a_killed_writer_leaves_no_lock_held(tmp_path: Path) -> None:
    """A process killed (SIGKILL) while it holds the writers' lock: the next writer, in
    another process, goes on at once (the kernel drops a dead process's flock)."""
    url = f"sqlite:///{tmp_path}/k.db"
    store = open_store(url)
    store.migrate()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "holding"
    wrote = threading.Event()

    def write() -> None:
        store.db.transact(lambda c: c.execute(sa.insert(t.meta).values(key="after", value="x")))
        wrote.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert not wrote.wait(0.5)  # it waits its turn behind the holder
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert wrote.wait(10)
    store.close()


def test_a_forked_child_takes_its_own_turn(tmp_path: Path) -> None:
    """A process forked while its parent holds the writers' lock starts with nothing held:
    its write waits for the parent's turn to end (no inherited RLock, no shared flock)."""
    store = open_store(f"sqlite:///{tmp_path}/f.db")
    store.migrate()
    with store.db.writing():
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: its write must wait for the parent's turn, then succeed
            code = 1
            try:
                child = open_store(f"sqlite:///{tmp_path}/f.db")
                child.db.transact(
                    lambda c: c.execute(sa.insert(t.meta).values(key="child", value="x"))
                )
                code = 0 if time.monotonic() - started >= 0.4 else 2
            finally:
                os._exit(code)
        time.sleep(0.5)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.close()


FORKER = textwrap.dedent(
    """
    import os, sys, time
    import sqlalchemy as sa
    from engine.store import open_store
    from engine.store import schema as t

    store = open_store(sys.argv[1])
    store.db.transact(lambda c: c.execute(sa.insert(t.meta).values(key="first", value="x")))
    if os.fork() == 0:  # a step's child process (multiprocessing's fork), alive for long
        time.sleep(60)
        os._exit(0)
    with store.db.writing():
        if os.fork() == 0:  # and one forked during the turn
            time.sleep(60)
            os._exit(0)
        print("holding", flush=True)
        time.sleep(600)
    """
)


def test_a_killed_writers_forked_children_hold_nothing(tmp_path: Path) -> None:
    """A worker that forked children (before and during its turn) is killed while it holds
    the writers' lock: the next writer goes on at once, the children still alive (they
    share no descriptor of the companion, so the kernel drops the dead worker's flock)."""
    url = f"sqlite:///{tmp_path}/fk.db"
    store = open_store(url)
    store.migrate()
    holder = subprocess.Popen(
        [sys.executable, "-c", FORKER, url],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "holding"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        started = time.monotonic()
        store.db.transact(lambda c: c.execute(sa.insert(t.meta).values(key="after", value="x")))
        assert time.monotonic() - started < 5
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the children
    store.close()


def test_a_process_keeps_no_descriptor_between_writes_and_others_cannot_lock(
    tmp_path: Path,
) -> None:
    """The companion is open only during a turn (a process opening many databases in turn
    runs out of nothing), and only the database's owner and group may open it (anyone who
    could would stall every writer by locking it)."""

    def companions() -> list[str]:
        fds = Path("/proc/self/fd")
        links = [os.readlink(f) for f in fds.iterdir() if f.is_symlink()]
        return [x for x in links if x.endswith("-writer")]

    for n in range(20):
        store = open_store(f"sqlite:///{tmp_path}/m{n}.db")
        store.migrate()
        with store.db.writing():
            assert len(companions()) == 1
        store.close()
    assert companions() == []
    assert (tmp_path / "m0.db-writer").stat().st_mode & 0o007 == 0


def test_a_file_system_without_locks_leaves_sqlites_own_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """flock refused (ENOLCK: some NFS and FUSE mounts): the write goes on, once warned."""
    import errno

    def refuse(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    lock = store_db.WriterLock(tmp_path / "n.db-writer")
    monkeypatch.setattr(store_db.fcntl, "flock", refuse)
    with lock:
        pass
    with lock:
        pass
    assert lock._companion is None
    assert [r.getMessage() for r in caplog.records if "No locks available" in r.getMessage()]
    assert len([r for r in caplog.records if "busy handler" in r.getMessage()]) == 1


def test_a_writer_outside_the_turn_is_waited_out_and_then_named(tmp_path: Path) -> None:
    """A writer that takes no turn (the sqlite3 shell, a backup) holds SQLite's lock past
    the busy timeout: BEGIN IMMEDIATE's failure is retried like any busy statement, and
    once the retries are spent it reaches the caller as a DatabaseError, not the driver's
    raw exception."""
    import sqlite3

    from engine.errors import DatabaseError
    from engine.models import Lease, NewRun

    path = tmp_path / "o.db"
    store = open_store(f"sqlite:///{path}")
    store.migrate()
    new = NewRun(
        id="r1", workflow_id="w", version="1", definition_hash="h", payload=None,
        first_step="a", queue="q",
    )  # fmt: skip
    store.create_run(new, store.now())
    sa.event.listen(
        store.engine, "connect", lambda conn, _r: conn.execute("PRAGMA busy_timeout=50")
    )
    store.engine.dispose()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.4, lambda: other.execute("ROLLBACK")).start()
    run = store.claim_next_run(Lease("me/0", "here", 1, 30.0), store.now())
    assert run is not None and run.id == "r1"  # retried until the other writer let go
    other.execute("BEGIN IMMEDIATE")  # and now for longer than all the retries
    try:
        with pytest.raises(DatabaseError, match="locked"):
            store.claim_next_run(Lease("me/1", "here", 1, 30.0), store.now())
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.close()


def test_a_companion_file_that_cannot_be_opened_leaves_sqlites_own_lock(
    tmp_path: Path,
) -> None:
    """Where the companion cannot be opened (say, a folder the process may not write), the
    lock is the process's threads' only and writers of other processes meet at SQLite's."""
    lock = store_db.WriterLock(tmp_path / "missing" / "r.db-writer")  # no such folder
    with lock, lock:  # reentrant, and no flock to take
        pass
    assert lock._companion is None


@pytest.mark.skipif(PG_URL is None, reason=PG_REASON)
def test_postgresql_writers_take_no_process_lock_and_keep_partial_indexes() -> None:
    """On PostgreSQL nothing is serialised in the process, and the claim's partial indexes
    (their predicates given when a PostgreSQL database is opened) have their WHERE."""
    assert PG_URL is not None
    store = open_store(PG_URL)
    assert isinstance(store.db.writing(), nullcontext)
    with store.db.read() as c:
        defs = dict(
            c.execute(
                sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'dy_runs'")
            ).all()
        )
    store.close()
    assert "WHERE (next_at IS NOT NULL)" in defs["dy_runs_claim"], defs["dy_runs_claim"]
    assert "WHERE" in defs["dy_runs_expiry"]
