"""The store contract, run against every backend: SQLite and real PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from engine.errors import DatabaseError, LeaseLost, NotFound, RunBusy
from engine.models import Lease, NewRun, RunStatus, StepRecord, StepStatus, Transition
from engine.runner import new_run_id
from engine.store import SqlStore, open_store
from engine.store import schema as t
from engine.store.workers import pid_namespace

NOW = 2_147_155_200.0  # 2038-01-15T08:00:00Z: ahead of the real clock (claims stamp the later)
HOST = socket.gethostname()


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    s = open_store(db_url)
    s.save_definition("h1", "wf", "1", {"any": "machine"}, "wf.yaml")
    yield s
    s.close()


def lease(name: str, host: str = HOST, pid: int | None = None, seconds: float = 30) -> Lease:
    return Lease(owner=name, host=host, pid=pid or os.getpid(), seconds=seconds)


def new_run(run_id: str | None = None, parent: str | None = None, created: float = NOW) -> NewRun:
    return NewRun(
        id=run_id or new_run_id(),
        workflow_id="wf",
        version="1",
        definition_hash="h1",
        payload={"a": 1},
        first_step="s1",
        queue="q",
        parent_run_id=parent,
        parent_step="child" if parent else None,
    )


def test_migrate_is_idempotent_and_refuses_a_newer_schema(store: SqlStore) -> None:
    store.migrate()
    store.migrate()
    with store.engine.begin() as c:
        c.execute(sa.update(t.meta).values(value="99"))
    with pytest.raises(DatabaseError, match="schema is version 99, newer than this durable-yaml"):
        store.migrate()


def test_definitions_are_stored_once(store: SqlStore) -> None:
    store.save_definition("h1", "wf", "1", {"other": True}, "x.yaml")
    assert store.load_definition("h1") == {"any": "machine"}
    with pytest.raises(NotFound):
        store.load_definition("nope")


def test_create_get_and_list_with_keyset_pages(store: SqlStore) -> None:
    ids = [store.create_run(new_run(f"r{i:02d}"), NOW + i).id for i in range(5)]
    assert store.get_run("r03").payload == {"a": 1}
    first = store.list_runs(limit=2)
    assert [r.id for r in first] == ["r04", "r03"]
    after = store.list_runs(limit=2, before=(first[-1].created_at, first[-1].id))
    assert [r.id for r in after] == ["r02", "r01"]
    assert len(store.list_runs(status=RunStatus.QUEUED)) == len(ids)
    assert store.list_runs(status=RunStatus.COMPLETED) == []
    with pytest.raises(NotFound, match="no run has id nope"):
        store.get_run("nope")


def test_claim_begins_the_first_attempt(store: SqlStore) -> None:
    store.create_run(new_run("r1"), NOW)
    run = store.claim_run("r1", lease("a"), NOW)
    assert run.status == RunStatus.RUNNING and run.current_attempt == 1 and run.step_running
    assert run.lease_owner == "a" and run.next_at == NOW + 30


def test_a_live_lease_is_respected_and_an_expired_one_taken(store: SqlStore) -> None:
    store.create_run(new_run("r1"), NOW)
    store.claim_run("r1", lease("a", host="elsewhere"), NOW)
    with pytest.raises(RunBusy, match="being executed by process"):
        store.claim_run("r1", lease("b"), NOW + 10)
    taken = store.claim_run("r1", lease("b"), NOW + 31)
    assert taken.lease_owner == "b"
    assert taken.current_attempt == 2
    crashed = store.get_attempts("r1")
    assert [(a.attempt, a.status, a.error_type) for a in crashed] == [(1, "crashed", "WorkerDied")]


def test_a_dead_process_on_this_host_loses_its_lease_at_once(store: SqlStore) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.create_run(new_run("r1"), NOW)
    # a foreground process (`run`/`resume`) of this host's PID namespace that is gone
    owner = f"fg:{pid_namespace()}:{dead.pid}:abcd1234"
    store.claim_run("r1", Lease(owner=owner, host=HOST, pid=dead.pid), NOW)
    assert store.claim_run("r1", lease("b"), NOW + 1).lease_owner == "b"


def test_a_foreground_lease_of_another_pid_namespace_is_respected(store: SqlStore) -> None:
    """Containers may share a hostname and not a PID namespace: a pid is not comparable."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.create_run(new_run("r1"), NOW)
    owner = f"fg:otherboot.4026531836:{dead.pid}:abcd1234"
    store.claim_run("r1", Lease(owner=owner, host=HOST, pid=dead.pid), NOW)
    with pytest.raises(RunBusy):
        store.claim_run("r1", lease("b"), NOW + 1)


def test_transition_needs_the_lease_and_writes_nothing_without_it(store: SqlStore) -> None:
    store.create_run(new_run("r1"), NOW)
    store.claim_run("r1", lease("a"), NOW)
    record = StepRecord("s1", StepStatus.COMPLETED, 1, NOW, output={"x": 1})
    move = Transition(RunStatus.RUNNING, record, current_step="s2", begin_attempt=1)
    with pytest.raises(LeaseLost):
        store.commit_transition("r1", lease("intruder"), move, NOW + 1)
    assert store.get_steps("r1") == []
    result = store.commit_transition("r1", lease("a"), move, NOW + 1)
    assert result.cancel_requested is False
    (step,) = store.get_steps("r1")
    assert step.output == {"x": 1} and step.status == StepStatus.COMPLETED
    run = store.get_run("r1")
    assert run.current_step == "s2" and run.current_attempt == 1 and run.step_running


def test_finishing_a_child_wakes_its_waiting_parent(store: SqlStore) -> None:
    store.create_run(new_run("parent"), NOW)
    store.claim_run("parent", lease("p"), NOW)
    wait = StepRecord("child", StepStatus.WAITING, 1, NOW, wait={"kind": "child"})
    store.commit_transition(
        "parent",
        lease("p"),
        Transition(RunStatus.WAITING, wait, current_step="child", release=True, next_at=None),
        NOW,
    )
    store.create_run(new_run("kid", parent="parent"), NOW)
    store.claim_run("kid", lease("k"), NOW)
    done = StepRecord("s1", StepStatus.COMPLETED, 1, NOW, output=5)
    store.commit_transition(
        "kid", lease("k"), Transition(RunStatus.COMPLETED, done, output=5), NOW + 1
    )
    parent = store.get_run("parent")
    assert parent.next_at == NOW + 1
    answer = store.take_answer("parent", "child", 1, NOW + 2, timed_out=True)
    assert answer is not None and answer.kind == "child"  # the child's result beat the timeout
    assert answer.data == {"status": "completed", "output": 5, "error": None, "run_id": "kid"}


def test_cancel_cascades_to_children_and_flags_executing_runs(store: SqlStore) -> None:
    store.create_run(new_run("parent"), NOW)
    store.create_run(new_run("kid", parent="parent"), NOW)
    store.create_run(new_run("busy", parent="parent"), NOW)
    store.claim_run("busy", lease("w"), NOW)
    parent = store.request_cancel("parent", NOW + 1)
    assert parent.status == RunStatus.CANCELLED
    assert store.get_run("kid").status == RunStatus.CANCELLED
    busy = store.get_run("busy")
    assert busy.status == RunStatus.RUNNING and busy.cancel_requested
    result = store.commit_transition(
        "busy", lease("w"), Transition(RunStatus.RUNNING, current_step="s1"), NOW + 2
    )
    assert result.cancel_requested


def test_heartbeat_fails_once_the_lease_is_taken(store: SqlStore) -> None:
    store.create_run(new_run("r1"), NOW)
    store.claim_run("r1", lease("a", host="elsewhere", seconds=5), NOW)
    assert store.heartbeat("r1", lease("a", host="elsewhere", seconds=5), NOW + 1, [])
    store.claim_run("r1", lease("b"), NOW + 10)
    assert not store.heartbeat("r1", lease("a", host="elsewhere", seconds=5), NOW + 11, [])


def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(
        DatabaseError, match=r"database postgresql\+psycopg://nobody:\*\*\*@127\.0\.0\.1:1/x"
    ):
        open_store("postgresql://nobody:secret@127.0.0.1:1/x")
