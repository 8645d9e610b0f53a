"""The lean hot path of issue #15 keeps what it replaced: statements executed on the driver
directly still raise SQLAlchemy's errors (so `translate` and the store's retries see them)
and still refuse a write without the lease; PostgreSQL connections are no longer pinged at
every checkout, yet one that the server dropped while it sat idle is replaced, unseen."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.errors import DatabaseError, LeaseLost
from engine.models import Lease, NewRun, RunStatus, StepRecord, StepStatus, Transition
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


def test_the_claims_direct_read_returns_what_sqlalchemy_returns(tmp_path: Path) -> None:
    """The claim's look at its candidates (SQLite, the driver's cursor): every column of a
    run, JSON decoded, NULLs and numbers as SQLAlchemy's own result gives them."""
    from engine.store.queueing import _candidates_statement

    store = open_store(f"sqlite:///{tmp_path}/state.db")
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
    statement = _candidates_statement("sqlite", False)
    params = {"now": store.now() + 1, "width": 8}

    def both(c: sa.Connection) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        direct = store.db.direct_query(statement, ("now", "width")).mappings(c, params)
        return direct, [dict(r) for r in c.execute(statement, params).mappings()]

    direct, expected = store.db.transact(both)
    assert len(direct) == 4 and direct == expected
    assert [r["id"] for r in direct] == ["c-3", "c-2", "c-1", "c-0"]  # priority first
    assert direct[3]["payload"] == {"x": [1, 2.5, None, True], "s": "é"}
    store.close()


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
