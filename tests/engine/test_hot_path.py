"""The lean hot path of issue #15 keeps what it replaced: statements executed on the driver
directly still raise SQLAlchemy's errors (so `translate` and the store's retries see them)
and still refuse a write without the lease; PostgreSQL connections are no longer pinged at
every checkout, yet one that the server dropped while it sat idle is replaced, unseen."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.errors import DatabaseError, LeaseLost
from engine.models import (
    Lease,
    NewRun,
    QueueLimits,
    RunStatus,
    StepRecord,
    StepStatus,
    Transition,
)
from engine.store import SqlStore, open_store
from engine.store import db as store_db
from engine.store import schema as t
from engine.store.sqlutil import upsert_statement
from tests.conftest import PG_REASON, PG_URL, _reset_postgres


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    s = open_store(db_url)
    yield s
    s.close()


def _claimed(store: SqlStore) -> tuple[str, Lease]:
    lease = Lease(owner="hot/0", host="here", pid=1, seconds=30.0)
    new = NewRun(
        id="hot-1",
        workflow_id="wf",
        version="1",
        definition_hash="h",
        payload={"x": 1},
        first_step="a",
        queue="q",
    )
    store.create_run(new, store.now())
    run = store.claim_next_run(lease, store.now())
    assert run is not None and run.id == "hot-1" and run.step_running
    return run.id, lease


def _step_done(output: object) -> Transition:
    record = StepRecord("a", StepStatus.COMPLETED, 1, time.time(), output=output)
    return Transition(RunStatus.RUNNING, record, current_step="b", begin_attempt=1)


def test_a_step_commits_its_output_once_encoded_and_reads_it_back(store: SqlStore) -> None:
    run_id, lease = _claimed(store)
    output = {"text": "é \u2603", "n": [1, 2.5, None, True], "nested": {"k": "v"}}
    result = store.commit_transition(run_id, lease, _step_done(output), store.now())
    assert result.output == output and not result.cancel_requested
    (step,) = store.get_steps(run_id)
    assert step.output == output and step.status == StepStatus.COMPLETED
    run = store.get_run(run_id)
    assert run.current_step == "b" and run.current_attempt == 1 and run.step_running


def test_a_step_without_the_lease_writes_nothing(store: SqlStore) -> None:
    run_id, _ = _claimed(store)
    other = Lease(owner="thief/0", host="there", pid=2, seconds=30.0)
    with pytest.raises(LeaseLost):
        store.commit_transition(run_id, other, _step_done("stolen"), store.now())
    assert store.get_steps(run_id) == []
    assert store.get_run(run_id).current_step == "a"


def test_a_driver_error_on_the_direct_path_is_sqlalchemys(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/state.db")
    keys = ("run_id", "step_key", "status", "attempts")
    statement = upsert_statement("sqlite", t.steps, ("run_id", "step_key"), ("status",))
    direct = store.db.direct(statement, keys)
    assert store.db.direct(statement, keys) is direct  # compiled once
    with pytest.raises(sa.exc.IntegrityError):  # status is NOT NULL
        store.db.transact(
            lambda c: direct.execute(
                c, {"run_id": "r", "step_key": "a", "status": None, "attempts": 1}
            )
        )
    with store.db.read() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(t.steps)).scalar_one() == 0
    store.close()


def test_the_claims_direct_reads_return_what_sqlalchemy_returns(store: SqlStore) -> None:
    """The claim's looks at its candidates and at a queue's row (the driver's cursor, both
    databases): every column, JSON decoded, NULLs and numbers as SQLAlchemy's own result
    gives them."""
    from engine.store.queueing import _SHARED_ONE, _candidates_statement

    store.migrate()
    for i, payload in enumerate(({"x": [1, 2.5, None, True], "s": "é"}, None, [], "text")):
        new = NewRun(
            id=f"c-{i}",
            workflow_id="wf",
            version="1",
            definition_hash="h",
            payload=payload,
            first_step="a",
            queue="q",
            tags=("t:1", "t 2") if i == 0 else (),
            priority=i,
        )
        store.create_run(new, store.now())
    store.save_queue_limits([QueueLimits("q", rate_limit=3, rate_period=1.5)])
    statement = _candidates_statement(store.dialect, False)
    params = {"now": store.now() + 1, "width": 8}
    Rows = list[dict[str, object]]

    def both(c: sa.Connection) -> tuple[Rows, Rows, Rows, Rows]:
        direct = store.db.direct_query(statement, ("now", "width")).mappings(c, params)
        expected = [dict(r) for r in c.execute(statement, params).mappings()]
        queue = store.db.direct_query(_SHARED_ONE, ("name",)).mappings(c, {"name": "q"})
        queue_expected = [dict(r) for r in c.execute(_SHARED_ONE, {"name": "q"}).mappings()]
        return direct, expected, queue, queue_expected

    direct, expected, queue, expected_queue = store.db.transact(both)
    assert len(direct) == 4 and direct == expected
    assert [r["id"] for r in direct] == ["c-3", "c-2", "c-1", "c-0"]  # priority first
    assert direct[3]["payload"] == {"x": [1, 2.5, None, True], "s": "é"}
    assert isinstance(direct[0]["created_at"], float)
    assert queue == expected_queue and queue[0]["rate_limit"] == 3 and not queue[0]["paused"]


def test_a_dead_idle_connection_is_replaced_without_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not PG_URL:
        pytest.skip(PG_REASON)
    _reset_postgres(PG_URL)
    monkeypatch.setattr(store_db, "PING_IDLE_SECONDS", 0.05)
    store = open_store(PG_URL)
    try:
        with store.engine.connect() as c:
            pid = c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        killer = sa.create_engine(store.engine.url)
        with killer.connect() as c:
            assert c.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        killer.dispose()
        time.sleep(0.2)  # idle longer than PING_IDLE_SECONDS: the checkout pings it
        assert store.list_runs() == []  # no DatabaseError: a fresh connection answered
        with store.engine.connect() as c:
            assert c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() != pid
    except DatabaseError as exc:  # pragma: no cover - what the ping prevents
        pytest.fail(f"the dead connection was used: {exc}")
    finally:
        store.close()


def _pg_store_with_one_connection() -> SqlStore:
    """A PostgreSQL store whose pool holds exactly one connection, idle."""
    store = _postgres_store()
    store.engine.dispose()
    with store.engine.connect() as c:
        c.execute(sa.text("SELECT 1"))
    assert store.engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    return store


_SLEEP = sa.select(sa.func.pg_sleep(sa.bindparam("s", type_=sa.Float)))
_CAST = sa.select(sa.cast(sa.bindparam("v", type_=sa.Text), sa.Integer))


def _autocommit_at_checkin(store: SqlStore) -> list[bool]:
    """Whether each connection came back to the pool in autocommit (an invalidated one,
    closed, comes back as None: not listed)."""
    seen: list[bool] = []

    def checkin(dbapi: Any, record: Any) -> None:
        if dbapi is not None:
            seen.append(dbapi.autocommit)

    sa.event.listen(store.engine, "checkin", checkin)
    return seen


def test_a_statement_alone_that_fails_returns_its_connection_out_of_autocommit() -> None:
    """`Db.alone` (a step's commit on PostgreSQL) switches the driver to autocommit: a
    statement that fails raises SQLAlchemy's error and leaves the connection in the pool as
    it was, so the next transaction on it is a transaction (its ROLLBACK undoes it)."""
    store = _pg_store_with_one_connection()
    try:
        seen = _autocommit_at_checkin(store)
        assert store.db.alone(_CAST, ("v",), {"v": "7"}) == [(7,)]
        with pytest.raises(sa.exc.DataError):
            store.db.alone(_CAST, ("v",), {"v": "seven"})
        assert seen == [False, False]
        with store.engine.connect() as c:  # the same connection, in a transaction again
            c.execute(sa.text("CREATE TEMP TABLE probe (x int)"))
            c.rollback()
            assert c.execute(sa.text("SELECT to_regclass('pg_temp.probe')")).scalar() is None
        assert store.engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    finally:
        store.close()


def test_a_statement_alone_interrupted_discards_its_connection() -> None:
    """A KeyboardInterrupt inside the statement: the connection's state is not known, so it
    is invalidated, never handed to the next caller; the next statement gets a new one."""
    import signal

    store = _pg_store_with_one_connection()
    with store.engine.connect() as c:
        pid = c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        seen = _autocommit_at_checkin(store)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            store.db.alone(_SLEEP, ("s",), {"s": 5.0})
        assert True not in seen
        assert store.db.alone(_CAST, ("v",), {"v": "1"}) == [(1,)]
        with store.engine.connect() as c:
            assert c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() != pid
            assert c.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        store.close()


def test_a_connection_left_in_autocommit_goes_back_to_the_pool_out_of_it() -> None:
    """However a connection came back in the driver's autocommit (an interrupt between
    `Db.alone`'s switch and its statement, found by the reviewer helper), the pool's
    checkin switches it back: the next transaction on it is one."""
    store = _pg_store_with_one_connection()
    try:
        with store.engine.connect() as c:
            c.connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]
        with store.engine.connect() as c:  # the one connection, in a transaction again
            assert c.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
            c.execute(sa.text("CREATE TEMP TABLE probe (x int)"))
            c.rollback()
            assert c.execute(sa.text("SELECT to_regclass('pg_temp.probe')")).scalar() is None
    finally:
        store.close()


def test_a_statement_alone_on_a_dropped_connection_invalidates_the_pool() -> None:
    """The server dropped every pooled connection (a restart; none idle long enough to be
    pinged): the first statement on the driver fails with SQLAlchemy's disconnect error
    and, as SQLAlchemy's own handling does, every connection of the pool is replaced, so
    the statements after it (steps' commits, reads of steps) all succeed. Before, each
    dead connection failed one statement in turn (found by the reviewer helper: workers
    recovered slower, and some runs failed as if their process had died six times)."""
    store = _postgres_store()
    try:
        held = [store.engine.connect() for _ in range(4)]
        pids = [c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() for c in held]
        for c in held:
            c.close()
        killer = sa.create_engine(store.engine.url)
        with killer.connect() as c:
            for pid in pids:
                assert c.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        killer.dispose()
        with pytest.raises(sa.exc.DBAPIError) as caught:
            store.db.alone(_CAST, ("v",), {"v": "1"})
        assert caught.value.connection_invalidated
        for i in range(4):
            assert store.db.alone(_CAST, ("v",), {"v": str(i)}) == [(i,)]
            assert store.get_steps("no-such-run") == []
    finally:
        store.close()


@contextmanager
def libpq_trace(store: SqlStore, path: Path) -> Iterator[list[str]]:
    """What the store's connections send to PostgreSQL meanwhile (libpq's protocol trace):
    on exit, the list holds one line per query sent (a `Query`, or an extended protocol
    `Parse`), each with its SQL."""
    sent: list[str] = []
    with path.open("w") as out:

        def traced(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            dbapi_connection.pgconn.trace(out.fileno())

        def untraced(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.pgconn.untrace()

        sa.event.listen(store.engine, "checkout", traced)
        sa.event.listen(store.engine, "checkin", untraced)
        try:
            yield sent
        finally:
            sa.event.remove(store.engine, "checkout", traced)
            sa.event.remove(store.engine, "checkin", untraced)
    records: list[str] = []  # a message's SQL may span lines; each message starts a line
    for line in path.read_text().splitlines():  # with its time stamp, then a tab
        if records and not re.match(r"\d{4}-\d\d-\d\d [\d:.]+\t", line):
            records[-1] += " " + line
        else:
            records.append(line)
    for record in records:
        fields = record.split("\t")
        if len(fields) > 3 and fields[1] == "F" and fields[3] in ("Query", "Parse"):
            sent.append(" ".join(fields[3:]))


def _postgres_store() -> SqlStore:
    if not PG_URL:
        pytest.skip(PG_REASON)
    _reset_postgres(PG_URL)
    return open_store(PG_URL)


def test_one_statement_reads_on_postgresql_send_no_begin_and_no_rollback(
    tmp_path: Path,
) -> None:
    """`get_steps` and `get_run` (a worker reads a claimed run's steps) are one SELECT each,
    sent in autocommit: no BEGIN or ROLLBACK round trips, and they still read what was
    committed."""
    store = _postgres_store()
    try:
        run_id, lease = _claimed(store)
        store.commit_transition(run_id, lease, _step_done({"k": 1}), store.now())
        with libpq_trace(store, tmp_path / "trace") as sent:
            (step,) = store.get_steps(run_id)
            run = store.get_run(run_id)
        assert step.output == {"k": 1} and run.current_step == "b"
        assert len(sent) == 2 and all("SELECT" in q for q in sent), sent
    finally:
        store.close()


def _queued(store: SqlStore, run_id: str, queue: str, **options: Any) -> None:
    new = NewRun(
        id=run_id,
        workflow_id="wf",
        version="1",
        definition_hash="h",
        payload={},
        first_step="a",
        queue=queue,
        **options,
    )
    store.create_run(new, store.now())


def test_a_claim_on_postgresql_takes_an_unlimited_queues_run_in_one_statement(
    tmp_path: Path,
) -> None:
    """A claim of an unlimited queue's run that never started: ONE statement in autocommit
    (no BEGIN, no COMMIT): the candidate locked, the queue's row FOR SHARE, the take (no read
    of its current step: none of its steps can be recorded yet). A limited queue's first
    claim in a process: that statement finds its candidate held back and takes nothing, then
    the full look finds the limits under the share, rolls back and claims with the row FOR
    UPDATE; later claims go straight there; and the limit holds."""
    store = _postgres_store()
    lease = Lease(owner="hot/0", host="here", pid=1, seconds=30.0)
    try:
        store.save_queue_limits([QueueLimits("one", concurrency=1)])
        for i, queue in enumerate(["free", "free", "one", "one", "one"]):
            _queued(store, f"r{i}", queue)
        with libpq_trace(store, tmp_path / "free") as sent:
            assert store.claim_next_run(lease, store.now(), ["free"]) is not None
        assert len(sent) == 1 and sent[0].startswith('Parse  "" "WITH cand AS'), sent
        assert "FOR UPDATE SKIP LOCKED" in sent[0] and "FOR SHARE" in sent[0], sent
        assert not any("FROM dy_steps" in q for q in sent), sent

        with libpq_trace(store, tmp_path / "first") as sent:
            first = store.claim_next_run(lease, store.now(), ["one"])
        assert first is not None and first.queue == "one"
        assert sent[0].startswith('Parse  "" "WITH cand AS') and "BEGIN" in sent[1], sent
        reads = [q for q in sent if q.startswith('Parse  "" "SELECT dy_queues.')]
        assert "FOR SHARE" in reads[0] and "FOR UPDATE" in reads[1], sent
        assert any(q.endswith('"ROLLBACK"') for q in sent), sent  # the look made again

        store.commit_transition(
            first.id, lease, Transition(RunStatus.COMPLETED, output=None), store.now()
        )
        with libpq_trace(store, tmp_path / "later") as sent:
            second = store.claim_next_run(lease, store.now(), ["one"])
        assert second is not None
        reads = [q for q in sent if q.startswith('Parse  "" "SELECT dy_queues.')]
        assert len(reads) == 1 and "FOR UPDATE" in reads[0], sent
        assert not any(q.endswith('"ROLLBACK"') for q in sent), sent
        assert store.claim_next_run(lease, store.now(), ["one"]) is None  # one at a time
    finally:
        store.close()


def test_limits_set_by_another_process_hold_for_a_claimer_that_saw_none() -> None:
    """A claimer that last found the queue unlimited (its hint) reads the row FOR SHARE,
    finds the limit another process saved since, and counts: the limit holds."""
    store = _postgres_store()
    other = open_store(PG_URL or "")
    lease = Lease(owner="hot/0", host="here", pid=1, seconds=30.0)
    try:
        for i in range(3):
            _queued(store, f"r{i}", "q")
        assert store.claim_next_run(lease, store.now(), ["q"]) is not None  # q: no limits
        other.save_queue_limits([QueueLimits("q", concurrency=1)])
        assert store.claim_next_run(lease, store.now(), ["q"]) is None  # one runs already
        other.save_queue_limits([QueueLimits("q", concurrency=2)])
        assert store.claim_next_run(lease, store.now(), ["q"]) is not None
        assert store.claim_next_run(lease, store.now(), ["q"]) is None
        other.save_queue_limits([QueueLimits("q")])  # unlimited again: the share suffices
        assert store.claim_next_run(lease, store.now(), ["q"]) is not None
    finally:
        other.close()
        store.close()


def test_a_sqlite_claim_commits_without_waiting_for_the_disk_and_a_step_waits(
    tmp_path: Path,
) -> None:
    """The claim's transaction runs with `synchronous=NORMAL` (its COMMIT is not fsync'd:
    Db.transact says why that loses nothing a claim needs); the step's commits after it run
    at FULL (on the write connection kept for fsync'd writes, whose setting never changes),
    and so does every other write."""
    store = open_store(f"sqlite:///{tmp_path}/state.db")
    statements: list[tuple[Any, str]] = []

    def trace(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.set_trace_callback(lambda s: statements.append((dbapi_connection, s)))

    def synchronous(connection: Any) -> int:
        return int(connection.execute("PRAGMA synchronous").fetchone()[0])  # 1 NORMAL, 2 FULL

    try:
        store.db._close_kept()  # connections made from now on are traced
        store.engine.pool.dispose()
        sa.event.listen(store.engine, "connect", trace)
        run_id, lease = _claimed(store)
        texts = [s for _, s in statements]
        claim = texts[texts.index("PRAGMA synchronous=NORMAL") :]
        assert claim[1] == "BEGIN IMMEDIATE" and "COMMIT" in claim
        assert not any(s.startswith("INSERT INTO dy_runs") for s in claim)  # not the create
        (claimer,) = {c for c, s in statements if s == "PRAGMA synchronous=NORMAL"}
        for k in (1, 2):
            statements.clear()
            store.commit_transition(run_id, lease, _step_done({"k": k}), store.now())
            assert statements[0][1] == "BEGIN IMMEDIATE", statements
            assert not any("synchronous" in s for _, s in statements)
            (committer,) = {c for c, s in statements if s == "COMMIT"}
            assert committer is not claimer and synchronous(committer) == 2
        assert synchronous(claimer) == 1
        (step,) = store.get_steps(run_id)
        assert step.output == {"k": 2}
    finally:
        store.close()


def test_a_limit_committed_while_a_claim_locks_the_limited_rows_holds() -> None:
    """PostgreSQL, the claim that locks limited rows first (its hint names L): queue X gets
    a concurrency limit of 1 from a transaction that commits while the claim waits for X's
    row. The share on X then reads the limit: the claim is made again with X's row locked
    to count, and X's second run does not start (before, X was taken as unlimited)."""
    import threading

    import psycopg

    store = _postgres_store()
    lease = Lease(owner="hot/0", host="here", pid=1, seconds=30.0)
    try:
        store.save_queue_limits([QueueLimits("L", concurrency=5), QueueLimits("X")])
        _queued(store, "x1", "X")
        _queued(store, "l1", "L")
        assert store.claim_next_run(lease, store.now(), ["X"]) is not None
        assert store.claim_next_run(lease, store.now(), ["L"]) is not None  # hint: L limited
        _queued(store, "x2", "X")
        with store.engine.begin() as c:  # x2 is the claim's first candidate
            c.execute(sa.update(t.runs).where(t.runs.c.id == "x2").values(priority=9))
        _queued(store, "l2", "L")
        saver = psycopg.connect(PG_URL or "")
        saver.execute("UPDATE dy_queues SET concurrency = 1 WHERE name = 'X'")  # held open
        claimed: list[Any] = []
        claimer = threading.Thread(
            target=lambda: claimed.append(store.claim_next_run(lease, store.now(), ["L", "X"]))
        )
        claimer.start()
        time.sleep(0.5)  # the claim waits for X's row
        saver.commit()
        saver.close()
        claimer.join(30)
        assert claimed and claimed[0] is not None and claimed[0].id == "l2", claimed
        assert store.get_run("x2").status == RunStatus.QUEUED
    finally:
        store.close()


def test_a_queued_three_step_run_on_postgresql_takes_four_round_trips(tmp_path: Path) -> None:
    """Claimed for its first start and driven as a worker's executor drives it: the claim
    (one statement: candidate, queue row, take) and one statement per step, each in
    autocommit. No read of its steps: a run that never started has none (`Run.fresh`)."""
    from engine import step
    from engine.runner import Runner
    from engine.service import Engine
    from engine.settings import resolve_settings

    @step("hot.noop")
    def noop(i: int) -> int:
        return i

    if not PG_URL:
        pytest.skip(PG_REASON)
    _reset_postgres(PG_URL)
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "noop3.yaml").write_text(
        'id: noop3\nversion: "1"\ntrigger: {event: hot.go}\nsteps:\n'
        + "".join(f"  - {{id: s{i}, call: hot.noop, with: {{i: {i}}}}}\n" for i in range(3))
    )
    engine = Engine(
        resolve_settings(db=PG_URL, workflows=str(tmp_path / "flows")), import_steps=False
    )
    try:
        engine.save_all_definitions()
        run_id = engine.send_event("hot.go", {}).run_ids[0]
        store = engine.store
        lease = Lease(owner="hot/0", host="here", pid=1, seconds=30.0)
        runner = Runner(store, lease, foreground=False, host=engine)
        runner.machine(store.get_run(run_id).definition_hash)  # the definition read first
        with libpq_trace(store, tmp_path / "run") as sent:
            run = store.claim_next_run(lease, store.now())
            assert run is not None and run.fresh
            assert runner.drive_claimed(run).output == 2
        assert len(sent) == 4, sent
        assert not any("FROM dy_steps" in q or "BEGIN" in q for q in sent), sent
        assert store.get_run(run_id).status == RunStatus.COMPLETED
    finally:
        engine.close()


def test_a_one_statement_claim_waits_for_a_pause_held_open_then_takes_nothing() -> None:
    """PostgreSQL: another process has paused the queue in a transaction still open (its
    row locked) when a claim's one statement reaches that row: the claim waits for it, then
    reads the pause under its share and starts nothing; after the unpause it takes the run."""
    import threading

    import psycopg

    store = _postgres_store()
    lease = Lease(owner="hot/0", host="here", pid=1, seconds=30.0)
    try:
        store.save_queue_limits([QueueLimits("q")])  # unlimited, with a row
        _queued(store, "r1", "q")
        pauser = psycopg.connect(PG_URL or "")
        pauser.execute("UPDATE dy_queues SET paused = true WHERE name = 'q'")  # held open
        claimed: list[Any] = []
        claimer = threading.Thread(
            target=lambda: claimed.append(store.claim_next_run(lease, store.now()))
        )
        claimer.start()
        claimer.join(0.5)
        assert claimer.is_alive() and not claimed  # waiting for the queue's row
        pauser.commit()
        pauser.close()
        claimer.join(30)
        assert claimed == [None]
        assert store.get_run("r1").status == RunStatus.QUEUED
        store.set_queue_paused("q", False, store.now())
        run = store.claim_next_run(lease, store.now())
        assert run is not None and run.id == "r1"
    finally:
        store.close()


def test_a_one_statement_claim_returns_the_run_the_full_look_returns() -> None:
    """PostgreSQL: two identical queued runs, one taken by the one-statement claim and one
    by the full look (what a limited queue's claim, or one after it, takes): the same Run,
    every field, apart from the id and the claim's time; and the rows stored alike."""
    import dataclasses

    store = _postgres_store()
    lease = Lease(owner="hot/0", host="here", pid=1, seconds=30.0)
    try:
        for run_id in ("fast", "full"):
            new = NewRun(
                id=run_id,
                workflow_id="wf",
                version="1",
                definition_hash="h",
                payload={"x": [1, 2.5, None], "s": "é"},
                first_step="a",
                queue="q",
                concurrency_key="k",
                tags=("t:1",),
                priority=3 if run_id == "fast" else 2,
            )
            store.create_run(new, store.now())
        fast = store.claim_next_run(lease, store.now())
        store.queues._fresh_off_until = float("inf")  # as after a claim that needed the look
        full = store.claim_next_run(lease, store.now())
        assert fast is not None and full is not None and (fast.id, full.id) == ("fast", "full")
        assert fast.fresh and full.fresh and fast.step_running and fast.current_attempt == 1
        clock = ("id", "priority", "lease_expires_at", "next_at", "created_at", "started_at")
        clock += ("updated_at",)

        def same(run: Any) -> dict[str, Any]:
            fields = dataclasses.asdict(run)
            return {k: v for k, v in fields.items() if k not in clock}

        assert same(fast) == same(full)
        assert same(store.get_run("fast")) == same(store.get_run("full"))
        assert fast.lease_expires_at == fast.next_at == pytest.approx(fast.started_at + 30.0)
        stored = store.get_run("fast")
        assert (stored.started_at, stored.lease_expires_at) == (fast.started_at, fast.next_at)
    finally:
        store.close()


def test_a_one_statement_claim_leaves_to_the_full_look_what_needs_it() -> None:
    """PostgreSQL: a first candidate that the one statement must not take - a run whose
    lease expired (recovered: its crashed attempt recorded), a queued run past its TTL
    (expired: it never starts) - is left to the full look, which does what it always did."""
    store = _postgres_store()
    lease = Lease(owner="hot/0", host="here", pid=1, seconds=30.0)
    try:
        _queued(store, "crashed", "q")
        dead = Lease(owner="dead/0", host="gone", pid=1, seconds=0.01)
        assert store.claim_next_run(dead, store.now()) is not None  # fast path: leased
        time.sleep(0.05)  # its lease expires
        recovered = store.claim_next_run(lease, store.now())
        assert recovered is not None and recovered.id == "crashed"
        assert recovered.current_attempt == 2 and recovered.lease_owner == "hot/0"
        (attempt,) = store.get_attempts("crashed")
        assert attempt.status == "crashed" and attempt.error_type == "WorkerDied"

        _queued(store, "late", "q", ttl=0.01)
        time.sleep(0.05)
        store.queues._fresh_off_until = 0.0  # (the recovery above turned it off a while)
        assert store.claim_next_run(lease, store.now()) is None
        assert store.get_run("late").status == RunStatus.EXPIRED
    finally:
        store.close()


def test_a_one_statement_claim_is_stamped_once_it_holds_the_queue_row() -> None:
    """PostgreSQL: a claim that waited for its queue's row (another transaction held it a
    second) is stamped with the time it took the row, as the full look is: its lease runs
    from then (stamped before the wait, it expired as soon as it was given, and another
    worker recovered the run while it was executing: found by the reviewer helper), and a
    run whose TTL passed during the wait is expired, not started."""
    import threading

    import psycopg

    store = _postgres_store()
    lease = Lease(owner="hot/0", host="here", pid=1, seconds=3.0)
    try:
        store.save_queue_limits([QueueLimits("q")])  # unlimited, with a row
        _queued(store, "r1", "q")
        _queued(store, "late", "q", priority=-1, ttl=0.5)  # after r1

        def held(claim: Any) -> tuple[Any, float]:
            holder = psycopg.connect(PG_URL or "")
            holder.execute("SELECT name FROM dy_queues WHERE name = 'q' FOR UPDATE")
            claimed: list[Any] = []
            claimer = threading.Thread(target=lambda: claimed.append(claim()))
            claimer.start()
            time.sleep(1.0)
            released = store.now()
            holder.commit()
            holder.close()
            claimer.join(30)
            return claimed[0], released

        run, released = held(lambda: store.claim_next_run(lease, store.now()))
        assert run is not None and run.id == "r1"
        assert run.started_at >= released - 0.05, (run.started_at, released)
        assert run.lease_expires_at == pytest.approx(run.started_at + 3.0)
        stored = store.get_run("r1")
        assert (stored.started_at, stored.lease_expires_at) == (run.started_at, run.next_at)
        other = Lease(owner="other/0", host="there", pid=2, seconds=3.0)
        assert store.claim_next_run(other, store.now()) is None  # r1's lease holds

        store.queues._fresh_off_until = 0.0
        nothing, _ = held(lambda: store.claim_next_run(other, store.now()))
        assert nothing is None
        assert store.get_run("late").status == RunStatus.EXPIRED
    finally:
        store.close()


@pytest.mark.parametrize("offset", [-1000.0, 0.0, 1_000_000.0])
def test_a_one_statement_claim_stamps_the_stores_clock_as_the_full_look(offset: float) -> None:
    """PostgreSQL: with the store's clock behind or ahead of the server's (a virtual clock,
    `engine.testing`), the one-statement claim stamps the start and the lease with the
    store's time, as the full look does, not the server's (found by the reviewer helper:
    1,000 s behind, it stamped 1,000 s late)."""
    from engine.testing import VirtualClock

    store = _postgres_store()
    lease = Lease(owner="hot/0", host="here", pid=1, seconds=30.0)
    try:
        store.db.clock = VirtualClock(store.now() + offset)  # type: ignore[assignment]
        _queued(store, "fast", "q")
        _queued(store, "full", "q")
        at = store.now()
        fast = store.claim_next_run(lease, at)
        store.queues._fresh_off_until = float("inf")  # the full look
        full = store.claim_next_run(lease, at)
        assert fast is not None and full is not None and (fast.id, full.id) == ("fast", "full")
        assert fast.started_at == pytest.approx(at, abs=0.05)
        assert fast.started_at == pytest.approx(full.started_at, abs=0.05)
        assert fast.lease_expires_at == pytest.approx(at + 30.0, abs=0.05)
    finally:
        store.close()


def test_a_one_statement_claim_is_stamped_after_waiting_for_a_connection() -> None:
    """PostgreSQL: a claim that waited for a pooled connection (all 30 held a second) is
    stamped once it holds one: a run whose TTL passed meanwhile is expired, not started,
    and a run's lease is whole (found by the reviewer helper: stamped before the wait, a
    run started 1.1 s past its TTL, its lease that much short)."""
    import threading

    store = _postgres_store()
    lease = Lease(owner="hot/0", host="here", pid=1, seconds=30.0)
    try:
        _queued(store, "late", "q", priority=1, ttl=0.5)  # first in claim order
        _queued(store, "r1", "q")

        def after_the_pool_waited() -> Any:
            held = [store.engine.connect() for _ in range(30)]  # pool_size + max_overflow
            claimed: list[Any] = []
            claimer = threading.Thread(
                target=lambda: claimed.append(store.claim_next_run(lease, store.now()))
            )
            claimer.start()
            time.sleep(1.0)
            released = store.now()
            for c in held:
                c.close()
            claimer.join(30)
            return claimed[0], released

        first, _ = after_the_pool_waited()  # `late` past its TTL: left to the full look,
        assert first is not None and first.id == "r1"  # which expires it and takes r1
        assert store.get_run("late").status == RunStatus.EXPIRED
        _queued(store, "r2", "q")
        store.queues._fresh_off_until = 0.0
        run, released = after_the_pool_waited()
        assert run is not None and run.id == "r2"
        assert run.started_at >= released - 0.05, (run.started_at, released)
        assert run.lease_expires_at == pytest.approx(run.started_at + 30.0)
    finally:
        store.close()
