"""Group commit (issue #15), on SQLite and PostgreSQL.

In process: steps handed over while a flush is under way share the next transaction (one
COMMIT); a lost lease fails its own run alone; until the flush's COMMIT no other connection
sees any of its steps and no executor has gone on.

Real processes: a worker is SIGKILLed inside a group commit's flush (every statement run,
the COMMIT not). None of that flush's steps is stored; no event was sent and no child run
was started for a run whose step was not committed; a second worker executes those steps
again (at least once) and every run completes with the right output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.errors import LeaseLost
from engine.models import Lease, NewRun, RunStatus, StepRecord, StepStatus, Transition
from engine.pauses import pause_at
from engine.store import SqlStore, open_store
from engine.store import schema as t
from engine.store.group import GroupCommit
from engine.store.sqlutil import TransactionCounter
from tests.conftest import ROOT


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    s = open_store(db_url)
    yield s
    s.close()


def _claimed(store: SqlStore, n: int) -> list[tuple[str, Lease]]:
    for i in range(n):
        new = NewRun(
            id=f"g{i}", workflow_id="wf", version="1", definition_hash="h", first_step="a",
            payload={}, queue="q",
        )  # fmt: skip
        store.create_run(new, store.now() - 10 + i)
    out = []
    for i in range(n):
        lease = Lease(owner=f"w/{i}", host="here", pid=1, seconds=30.0)
        run = store.claim_next_run(lease, store.now())
        assert run is not None
        out.append((run.id, lease))
    return out


def _done(i: int) -> Transition:
    record = StepRecord("a", StepStatus.COMPLETED, 1, time.time(), output={"i": i})
    return Transition(RunStatus.RUNNING, record, current_step="b", begin_attempt=1)


def _hand_over(
    group: GroupCommit, items: list[tuple[str, Lease]]
) -> tuple[list[threading.Thread], dict[str, Any]]:
    results: dict[str, Any] = {}

    def one(i: int, run_id: str, lease: Lease) -> None:
        try:
            results[run_id] = group.commit_transition(run_id, lease, _done(i), group.now())
        except Exception as exc:
            results[run_id] = exc

    threads = [
        threading.Thread(target=one, args=(i, run_id, lease))
        for i, (run_id, lease) in enumerate(items)
    ]
    return threads, results


def _stored_steps(store: SqlStore) -> int:
    with store.engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count()).select_from(t.steps)).scalar_one())


def test_steps_handed_over_during_a_flush_share_the_next_commit(store: SqlStore) -> None:
    items = _claimed(store, 4)
    group = GroupCommit(store)
    counter = TransactionCounter(store.db)
    first_flush = threading.Event()

    def hold_first_flush() -> None:  # the first flush waits until the 3 others handed over
        if not first_flush.is_set():
            first_flush.set()
            deadline = time.time() + 10
            while len(group._handed) < 3 and time.time() < deadline:
                time.sleep(0.005)

    threads, results = _hand_over(group, items)
    with pause_at("group.flush", hold_first_flush):
        threads[0].start()
        assert first_flush.wait(10)
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join(10)
    counter.close()
    assert sorted(results) == ["g0", "g1", "g2", "g3"]
    assert all(r.output == {"i": i} for i, r in enumerate(results[k] for k in sorted(results)))
    assert (group.flushes, group.grouped) == (2, 4)  # the first alone, then the three together
    assert counter.count == 2  # two transactions for four steps
    assert _stored_steps(store) == 4
    assert {s.step_key for r, _ in items for s in store.get_steps(r)} == {"a"}
    assert all(store.get_run(r).current_step == "b" for r, _ in items)


def test_a_lost_lease_fails_its_own_run_alone(store: SqlStore) -> None:
    items = _claimed(store, 3)
    stolen = Lease(owner="thief/0", host="there", pid=2, seconds=30.0)
    items[1] = (items[1][0], stolen)
    outcomes = store.commit_transitions(
        [(r, lease, _done(i), store.now()) for i, (r, lease) in enumerate(items)]
    )
    assert isinstance(outcomes[1], LeaseLost)
    assert [o.output for o in (outcomes[0], outcomes[2])] == [{"i": 0}, {"i": 2}]  # type: ignore[union-attr]
    assert [len(store.get_steps(r)) for r, _ in items] == [1, 0, 1]


def test_nothing_is_seen_and_nobody_goes_on_before_the_commit(store: SqlStore) -> None:
    items = _claimed(store, 3)
    group = GroupCommit(store)
    group._alone_is_cheaper = False  # this flush goes through the group transaction
    at_commit, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def before_commit() -> None:
        at_commit.set()
        assert release.wait(10)

    def hold_until_all_handed() -> None:
        deadline = time.time() + 10
        while len(group._handed) < 2 and time.time() < deadline:
            time.sleep(0.005)

    threads, results = _hand_over(group, items)
    with pause_at("store.group.before_commit", before_commit):
        with pause_at("group.flush", hold_until_all_handed):
            for thread in threads:
                thread.start()
            assert at_commit.wait(10)
        # every statement of a flush has run, its COMMIT has not
        seen.append(len(results))
        if store.dialect == "postgresql":  # another connection sees nothing of it
            seen.append(_stored_steps(store))
        release.set()
        for thread in threads:
            thread.join(10)
    assert seen[0] == 0  # no executor had its result (none could go on)
    assert seen[1:] in ([], [0])
    assert len(results) == 3 and _stored_steps(store) >= 1


# -- real processes, SIGKILL inside a flush ---------------------------------------------------

WORKFLOWS = {
    "grouped.yaml": """id: grouped
version: "1"
trigger: {event: grouped.go}
steps:
  - {id: a, call: g.together, with: {n: "{{ payload.n }}"}}
  - id: tell
    send_event: grouped.told
    payload: {n: "{{ payload.n }}"}
  - {id: kid, run_workflow: grouped-child, payload: {n: "{{ payload.n }}"}}
output: "{{ steps.kid.output }}"
""",
    "grouped-child.yaml": """id: grouped-child
version: "1"
trigger: {manual: true}
steps:
  - {id: echo, call: g.echo, with: {n: "{{ payload.n }}"}}
""",
}
STEPS = '''import json, os, time
from engine import StepContext, step

def _log(name, ctx):
    with open(os.environ["CALLS"], "a") as f:
        f.write(json.dumps({"name": name, "run": ctx.run_id, "attempt": ctx.attempt}) + "\\n")

@step("g.together")
def together(n: int, ctx: StepContext) -> int:
    """The first attempts return together (all four are under way), so they group."""
    _log("a", ctx)
    deadline = time.time() + 10
    while ctx.attempt == 1 and time.time() < deadline:
        if sum(1 for line in open(os.environ["CALLS"]) if '"a"' in line) >= 4:
            break
        time.sleep(0.01)
    return int(n)

@step("g.echo")
def echo(n: int, ctx: StepContext) -> int:
    _log("echo", ctx)
    return int(n) * 10
'''


def _project(tmp_path: Path, db_url: str) -> dict[str, str]:
    (tmp_path / "workflows").mkdir()
    for name, text in WORKFLOWS.items():
        (tmp_path / "workflows" / name).write_text(text)
    (tmp_path / "groupsteps.py").write_text(STEPS)
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("DURABLE_YAML_")},
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "groupsteps",
        "DURABLE_YAML_WORKFLOWS": str(tmp_path / "workflows"),
        "PYTHONPATH": f"{ROOT}:{tmp_path}",
        "CALLS": str(tmp_path / "calls.log"),
    }


def _worker(tmp_path: Path, env: dict[str, str], name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine", "worker", "--concurrency", "4", "--lease-seconds", "2",
         "--grace", "2", "--no-schedules", "--group-commit"],
        cwd=tmp_path, env=env, text=True,
        stdout=open(tmp_path / f"{name}.out", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def _calls(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "calls.log"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkill_inside_a_flush_loses_its_steps_only_and_they_run_again(
    db_url: str, tmp_path: Path
) -> None:
    from engine.service import Engine
    from engine.settings import resolve_settings

    env = _project(tmp_path, db_url)
    engine = Engine(
        resolve_settings(db=db_url, workflows=str(tmp_path / "workflows")), import_steps=False
    )
    engine.save_all_definitions()
    runs = [engine.send_event("grouped.go", {"n": n}).run_ids[0] for n in range(4)]
    # the first flush waits 0.5 s (the other steps hand over meanwhile); a flush through the
    # group transaction stops before its COMMIT, where the worker is killed
    paused = {**env, "DURABLE_YAML_PAUSE": "group.flush=0.5,store.group.before_commit=120"}
    first = _worker(tmp_path, paused, "first")
    try:
        _wait(lambda: sum(c["name"] == "a" for c in _calls(tmp_path)) >= 4, 30)
        time.sleep(2.0)  # the lone first flush ends; the group's flush reaches its pause
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    store = engine.store
    with store.engine.connect() as c:
        told = set(c.execute(sa.select(t.events.c.source_run_id)).scalars())
        kids = set(c.execute(sa.select(t.runs.c.parent_run_id)).scalars()) - {None}
    lost = [r for r in runs if not any(s.step_key == "a" for s in store.get_steps(r))]
    assert lost, "no flush was interrupted: the test did not test anything"
    for run_id in lost:  # the step's result was not committed: nothing that depends on it
        assert run_id not in told and run_id not in kids
        assert store.get_run(run_id).status == RunStatus.RUNNING  # leased to the dead worker
    second = _worker(tmp_path, env, "second")
    try:
        _wait(lambda: all(store.get_run(r).finished for r in runs), 60)
    finally:
        second.terminate()
        second.wait(30)
    for n, run_id in enumerate(runs):
        run = store.get_run(run_id)
        assert run.status == RunStatus.COMPLETED and run.output == n * 10, run
    executed = [c for c in _calls(tmp_path) if c["name"] == "a"]
    for run_id in runs:  # at least once; twice exactly where the flush was lost
        times = sum(c["run"] == run_id for c in executed)
        assert times == (2 if run_id in lost else 1), (run_id, times)
    with store.engine.connect() as c:
        sent = list(c.execute(sa.select(t.events.c.source_run_id)).scalars())
    assert sorted(s for s in sent if s in runs) == sorted(runs)  # one event per run
    engine.close()
