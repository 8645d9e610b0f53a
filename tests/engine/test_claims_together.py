"""Claims in fewer transactions (issue #15), on SQLite and PostgreSQL.

- `claim_next_runs`: one transaction takes a run per lease, in claim order; the runs it
  took count towards their queues' limits for the next; it says whether the candidates ran
  out (only then may a lease left without a run sleep).
- With group commit (SQLite), an executor's claim rides in the next flush with the steps
  handed over: one transaction, durable together or not at all. A worker SIGKILLed inside
  such a flush, before its COMMIT, leaves the run it was claiming queued and unleased, and
  the step it was committing unstored; both are taken again. Such a flush that fails is
  made again with its steps and its claims apart: neither fails the other.
- Under load a flusher yields to the executors that hold runs and have not handed over,
  while each yield brings one more: theirs join its flush. A yield that brings nothing,
  or nobody else busy, ends that at once.
- A run claimed for its first start is `fresh` (no step of it can be recorded: the runner
  reads none); claimed again later, it is not.
- SQLite keeps its write connections (one for fsync'd writes, one for claims): one that
  failed in the driver is replaced; a forked child never uses the parent's; `close`
  closes them (the write-ahead log is folded into the file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.errors import DatabaseError
from engine.models import Lease, NewRun, QueueLimits, RunStatus, StepRecord, StepStatus, Transition
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


def _lease(i: int) -> Lease:
    return Lease(owner=f"w/{i}", host="here", pid=1, seconds=30.0)


def _queue(store: SqlStore, run_id: str, queue: str = "q", age: float = 10.0) -> None:
    new = NewRun(
        id=run_id, workflow_id="wf", version="1", definition_hash="h", first_step="a",
        payload={}, queue=queue,
    )  # fmt: skip
    store.create_run(new, store.now() - age)


def _done(i: int) -> Transition:
    record = StepRecord("a", StepStatus.COMPLETED, 1, time.time(), output={"i": i})
    return Transition(RunStatus.RUNNING, record, current_step="b", begin_attempt=1)


def test_one_claim_takes_a_run_per_lease_in_claim_order(store: SqlStore) -> None:
    for i in range(3):
        _queue(store, f"r{i}", age=10 - i)  # r0 the oldest
    runs, exhausted = store.claim_next_runs([_lease(0), _lease(1)], store.now())
    assert [(r.id, r.lease_owner) for r in runs] == [("r0", "w/0"), ("r1", "w/1")]
    assert all(r.status == RunStatus.RUNNING and r.fresh for r in runs)
    assert not exhausted  # every lease got a run: nothing is known of the rest
    runs, exhausted = store.claim_next_runs([_lease(2), _lease(3)], store.now())
    assert [(r.id, r.lease_owner) for r in runs] == [("r2", "w/2")]
    assert exhausted  # w/3 may sleep: nothing else is claimable
    assert store.claim_next_runs([_lease(4)], store.now()) == ([], True)


def test_runs_taken_by_one_claim_count_towards_the_limits_of_the_next(store: SqlStore) -> None:
    store.save_queue_limits([QueueLimits("one", concurrency=1)])
    for i, queue in enumerate(["one", "one", "free", "one"]):
        _queue(store, f"r{i}", queue, age=10 - i)
    runs, exhausted = store.claim_next_runs([_lease(i) for i in range(3)], store.now())
    assert sorted(r.id for r in runs) == ["r0", "r2"]  # not r1: "one" is full
    assert not exhausted  # r3 lay past the look: the lease left over claims again ...
    assert store.claim_next_runs([_lease(2)], store.now()) == ([], True)  # ... and sleeps
    with store.engine.connect() as c:
        running = c.execute(
            sa.select(sa.func.count())
            .select_from(t.runs)
            .where(t.runs.c.queue == "one", t.runs.c.status == "running")
        ).scalar_one()
    assert running == 1


def test_a_run_is_fresh_only_when_claimed_for_its_first_start(store: SqlStore) -> None:
    _queue(store, "r0")
    lease = _lease(0)
    run = store.claim_next_run(lease, store.now())
    assert run is not None and run.fresh and store.get_steps("r0") == []
    store.commit_transition("r0", lease, _done(1), store.now())  # step a recorded
    release = Transition(RunStatus.QUEUED, current_step="b", release=True, next_at=store.now())
    store.commit_transition("r0", lease, release, store.now())
    again = store.claim_next_run(lease, store.now())
    assert again is not None and again.id == "r0" and not again.fresh
    assert again.current_step == "b" and [s.step_key for s in store.get_steps("r0")] == ["a"]
    assert again == run.__class__(**{**again.__dict__, "fresh": True})  # not part of its value


# -- claims in a group commit's flush (SQLite) --------------------------------------------------


def _sqlite_store(tmp_path: Path) -> SqlStore:
    return open_store(f"sqlite:///{tmp_path}/state.db")


def test_claims_ride_in_the_flush_with_the_steps_handed_over(tmp_path: Path) -> None:
    store = _sqlite_store(tmp_path)
    try:
        for i in range(2):
            _queue(store, f"r{i}", age=20 - i)
        running = [(r.id, _lease(i)) for i, r in enumerate(store.claim_next_runs(
            [_lease(0), _lease(1)], store.now())[0])]  # fmt: skip
        for i in range(2, 4):
            _queue(store, f"r{i}", age=10 - i)  # r2, r3: queued
        group = GroupCommit(store)
        counter = TransactionCounter(store.db)
        results: dict[str, Any] = {}

        def step(i: int, run_id: str, lease: Lease) -> None:
            results[run_id] = group.commit_transition(run_id, lease, _done(i), group.now())

        def claim(i: int) -> None:
            results[f"claim{i}"] = group.claim(_lease(i), None)

        def hold_until_all_handed() -> None:
            deadline = time.time() + 10
            while len(group._handed) < 3 and time.time() < deadline:
                time.sleep(0.005)

        threads = [
            threading.Thread(target=step, args=(0, *running[0])),
            threading.Thread(target=step, args=(1, *running[1])),
            threading.Thread(target=claim, args=(2,)),
            threading.Thread(target=claim, args=(3,)),
        ]
        first = threading.Event()

        def hold_first() -> None:
            if not first.is_set():
                first.set()
                hold_until_all_handed()

        with pause_at("group.flush", hold_first):
            threads[0].start()
            assert first.wait(10)
            for thread in threads[1:]:
                thread.start()
            for thread in threads:
                thread.join(10)
        counter.close()
        claimed = [results["claim2"], results["claim3"]]
        assert sorted(c.run.id for c in claimed) == ["r2", "r3"]
        assert all(c.run.lease_owner == c.lease.owner and not c.exhausted for c in claimed)
        assert (group.flushes, group.grouped) == (2, 2)  # r0's step alone, then r1's ...
        assert (group.claims, group.claimed, group.claims_alone) == (1, 2, 0)  # ... with both
        assert counter.count == 2  # two steps and two claims: two transactions
        assert [len(store.get_steps(r)) for r in ("r0", "r1")] == [1, 1]
    finally:
        store.close()


def _second_flush_carries_r1_and_a_claim(
    group: GroupCommit, step: Any, claim: Any, flushes: list[int]
) -> None:
    """`step(0)` flushes alone, held until `step(1)` and `claim()` have handed over, so
    those two share the second flush; `flushes` gets an item per flush (for the caller's
    hooks, which run meanwhile)."""

    def hold_first() -> None:
        flushes.append(1)
        deadline = time.time() + 10
        while len(flushes) == 1 and len(group._handed) < 2 and time.time() < deadline:
            time.sleep(0.005)

    threads = [threading.Thread(target=step, args=(0,))]
    with pause_at("group.flush", hold_first):
        threads[0].start()
        deadline = time.time() + 10
        while not flushes and time.time() < deadline:
            time.sleep(0.005)
        threads += [threading.Thread(target=step, args=(1,)), threading.Thread(target=claim)]
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join(10)


@pytest.mark.parametrize("failing", ["store.group.before_commit", "store.claim.queues_locked"])
def test_a_flush_carrying_claims_that_fails_is_made_again_apart(
    tmp_path: Path, failing: str
) -> None:
    """The flush of r1's step and w/2's claim fails before its COMMIT (in the steps' part,
    or in the claim's): nothing of it is stored, and it is made again as two transactions,
    so the part that did not fail succeeds and only the failing part's executor gets the
    error."""
    store = _sqlite_store(tmp_path)
    try:
        for i in range(2):
            _queue(store, f"r{i}", age=20 - i)
        runs, _ = store.claim_next_runs([_lease(0), _lease(1)], store.now())
        assert [r.id for r in runs] == ["r0", "r1"]
        _queue(store, "r2")
        group = GroupCommit(store)
        outcome: dict[str, Any] = {}

        def step(i: int) -> None:
            try:
                outcome[f"r{i}"] = group.commit_transition(
                    f"r{i}", _lease(i), _done(i), group.now()
                )
            except Exception as exc:
                outcome[f"r{i}"] = exc

        def claim() -> None:
            try:
                outcome["claim"] = group.claim(_lease(2), None)
            except Exception as exc:
                outcome["claim"] = exc

        flushes: list[int] = []

        def fail_after_the_first() -> None:
            if len(flushes) == 2:
                raise DatabaseError("disk gone")

        with pause_at(failing, fail_after_the_first):
            _second_flush_carries_r1_and_a_claim(group, step, claim, flushes)
        assert (group.flushes, group.claims) == (2, 1)
        assert outcome["r0"].output == {"i": 0}  # the first flush committed
        queued = store.get_run("r2")
        if failing == "store.group.before_commit":  # the steps' part fails again alone
            assert isinstance(outcome["r1"], DatabaseError)
            assert store.get_steps("r1") == []
            assert outcome["claim"].run.id == "r2" and queued.lease_owner == "w/2"
        else:  # the claim fails again alone; the step is committed
            assert outcome["r1"].output == {"i": 1}
            assert [s.step_key for s in store.get_steps("r1")] == ["a"]
            assert isinstance(outcome["claim"], DatabaseError)  # it claims again later
            assert queued.status == RunStatus.QUEUED and queued.lease_owner is None
    finally:
        store.close()


def test_an_error_after_the_commit_is_not_made_again(tmp_path: Path) -> None:
    """An error once a flush's COMMIT has happened (whether it committed is not known to
    the flusher): every executor in it gets the error and nothing is made again, so no
    claim is made twice (a second run leased to an executor that drives only one; found by
    the reviewer helper) and no step committed twice."""
    store = _sqlite_store(tmp_path)
    try:
        running = _three_running(store)
        for i in range(3, 5):
            _queue(store, f"r{i}", age=5 - i)
        group = GroupCommit(store)
        transact = store.db.transact
        flushes: list[int] = []

        def then_fail(work: Any, **kwargs: Any) -> Any:
            out = transact(work, **kwargs)  # committed
            if len(flushes) == 2:
                raise OSError(5, "Input/output error")
            return out

        store.db.transact = then_fail  # type: ignore[method-assign]
        outcome: dict[str, Any] = {}

        def step(i: int) -> None:
            try:
                run_id, lease = running[i]
                outcome[run_id] = group.commit_transition(run_id, lease, _done(i), store.now())
            except Exception as exc:
                outcome[run_id] = exc

        def claim() -> None:
            try:
                outcome["claim"] = group.claim(_lease(7), None)
            except Exception as exc:
                outcome["claim"] = exc

        _second_flush_carries_r1_and_a_claim(group, step, claim, flushes)
        store.db.transact = transact  # type: ignore[method-assign]
        assert outcome["r0"].output == {"i": 0}
        assert isinstance(outcome["r1"], OSError) and isinstance(outcome["claim"], OSError)
        assert [len(store.get_steps(r)) for r in ("r0", "r1")] == [1, 1]  # it did commit
        leased = [r for r in ("r3", "r4") if store.get_run(r).lease_owner == "w/7"]
        assert leased == ["r3"]  # made once, never again
    finally:
        store.close()


CHILD = """
import os, sys, threading, time
from engine.models import Lease, RunStatus, StepRecord, StepStatus, Transition
from engine.pauses import pause_at
from engine.store import open_store
from engine.store.group import GroupCommit

store = open_store(sys.argv[1])
marker = sys.argv[2]
group = GroupCommit(store)

def lease(i):
    return Lease(owner=f"w/{i}", host="here", pid=1, seconds=30.0)

def step(i):
    record = StepRecord("a", StepStatus.COMPLETED, 1, time.time(), output={"i": i})
    done = Transition(RunStatus.RUNNING, record, current_step="b", begin_attempt=1)
    group.commit_transition(f"r{i}", lease(i), done, group.now())

flushes = []

def hold_first():  # r0's step alone, until r1's step and w/2's claim wait for the next
    flushes.append(1)
    while len(flushes) == 1 and len(group._handed) < 2:
        time.sleep(0.005)

def stop_in_the_second():
    if len(flushes) == 2:
        open(marker, "w").close()
        time.sleep(120)

with pause_at("group.flush", hold_first), pause_at("store.group.before_commit", stop_in_the_second):
    first = threading.Thread(target=step, args=(0,))
    first.start()
    while not flushes:
        time.sleep(0.005)
    threading.Thread(target=step, args=(1,)).start()
    threading.Thread(target=group.claim, args=(lease(2), None)).start()
    first.join()
    time.sleep(120)
"""


def test_sigkill_inside_a_flush_carrying_a_claim_leaves_the_run_queued(tmp_path: Path) -> None:
    """A real process SIGKILLed inside a flush that carries a step and a claim (every
    statement run, the COMMIT not): the step is not stored, the run being claimed is still
    queued and unleased, and another process claims it at once."""
    url = f"sqlite:///{tmp_path}/state.db"
    store = open_store(url)
    try:
        for i in range(2):
            _queue(store, f"r{i}", age=20 - i)
        runs, _ = store.claim_next_runs([_lease(0), _lease(1)], store.now())
        assert [r.id for r in runs] == ["r0", "r1"]  # w/0 and w/1 execute them
        _queue(store, "r2")
        marker = tmp_path / "at-commit"
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CHILD), url, str(marker)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            deadline = time.time() + 30
            while not marker.exists():
                assert child.poll() is None and time.time() < deadline, "never reached"
                time.sleep(0.02)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        assert [len(store.get_steps(r)) for r in ("r0", "r1")] == [1, 0]  # r1's flush lost
        queued = store.get_run("r2")
        assert queued.status == RunStatus.QUEUED and queued.lease_owner is None
        again = store.claim_next_run(_lease(3), store.now())
        assert again is not None and again.id == "r2" and again.fresh
    finally:
        store.close()


def _three_running(store: SqlStore) -> list[tuple[str, Lease]]:
    for i in range(3):
        _queue(store, f"r{i}", age=20 - i)
    runs, _ = store.claim_next_runs([_lease(i) for i in range(3)], store.now())
    assert [r.id for r in runs] == ["r0", "r1", "r2"]
    return [(r.id, _lease(i)) for i, r in enumerate(runs)]


def test_a_flusher_yields_to_busy_executors_while_each_yield_brings_a_step(
    tmp_path: Path,
) -> None:
    store = _sqlite_store(tmp_path)
    try:
        running = _three_running(store)
        group = GroupCommit(store, busy=lambda: 3)  # three executors hold runs
        counter = TransactionCounter(store.db)
        threads = [
            threading.Thread(
                target=group.commit_transition, args=(run_id, lease, _done(i), store.now())
            )
            for i, (run_id, lease) in enumerate(running)
        ]
        yields: list[int] = []

        def one_more_runs() -> None:  # while the flusher yields, the next executor hands over
            yields.append(len(group._handed))
            thread = threads[len(yields)]
            thread.start()
            deadline = time.time() + 10
            while len(group._handed) <= yields[-1] and time.time() < deadline:
                time.sleep(0.001)

        group._yield = one_more_runs
        threads[0].start()
        threads[0].join(10)  # the flusher: it started the others while it yielded
        for thread in threads[1:]:
            thread.join(10)
        counter.close()
        assert yields == [1, 2]  # two yields, each brought a step; then all three were there
        assert (group.flushes, group.grouped) == (1, 3) and counter.count == 1
        assert all(len(store.get_steps(r)) == 1 for r, _ in running)
    finally:
        store.close()


@pytest.mark.parametrize("busy", [1, 5])
def test_a_flusher_does_not_wait_for_nothing(tmp_path: Path, busy: int) -> None:
    """Nobody else busy: no yield. Others busy but a yield brings nobody (their steps wait
    on I/O, or compute): one yield, then the flush goes."""
    store = _sqlite_store(tmp_path)
    try:
        running = _three_running(store)
        group = GroupCommit(store, busy=lambda: busy)
        yields: list[int] = []
        group._yield = lambda: yields.append(1)
        run_id, lease = running[0]
        assert group.commit_transition(run_id, lease, _done(0), store.now()).output == {"i": 0}
        assert len(yields) == (0 if busy == 1 else 1)
        assert (group.flushes, group.grouped) == (1, 1)
    finally:
        store.close()


@pytest.mark.parametrize("raised", [RuntimeError, KeyboardInterrupt])
def test_an_exception_while_gathering_answers_everyone_and_leaves_no_flush_open(
    tmp_path: Path, raised: type[BaseException]
) -> None:
    """Gathering is an optimisation: whatever it raises (here in the yield, after another
    executor handed over during it), every item handed over is answered, and the next
    hand-over flushes as usual (found by the reviewer helper: before, every later hand-over
    of the worker waited forever)."""
    store = _sqlite_store(tmp_path)
    try:
        running = _three_running(store)
        group = GroupCommit(store, busy=lambda: 3)
        outcome: dict[str, Any] = {}

        def step(i: int) -> None:
            run_id, lease = running[i]
            try:
                outcome[run_id] = group.commit_transition(run_id, lease, _done(i), store.now())
            except BaseException as exc:
                outcome[run_id] = exc

        other = threading.Thread(target=step, args=(1,))

        def one_hands_over_then_raise() -> None:
            other.start()
            deadline = time.time() + 10
            while len(group._handed) < 2 and time.time() < deadline:
                time.sleep(0.001)
            raise raised("interrupted while gathering")

        group._yield = one_hands_over_then_raise
        step(0)
        other.join(10)
        assert isinstance(outcome["r0"], raised)
        assert isinstance(outcome["r1"], DatabaseError)  # answered: its executor goes on
        assert not group._flushing and group._handed == []
        group.busy = None
        assert group.commit_transition(*running[2], _done(2), store.now()).output == {"i": 2}
    finally:
        store.close()


# -- SQLite's kept write connections ----------------------------------------------------------


def test_a_kept_connection_that_failed_in_the_driver_is_replaced(tmp_path: Path) -> None:
    store = _sqlite_store(tmp_path)
    try:
        _queue(store, "r0")
        _queue(store, "r1")
        assert store.claim_next_run(_lease(0), store.now()) is not None  # a kept connection
        kept = store.db._kept[False]  # the claims' (not fsync'd)
        kept.connection.dbapi_connection.close()  # type: ignore[union-attr]
        with pytest.raises(DatabaseError):
            store.claim_next_run(_lease(1), store.now())
        again = store.claim_next_run(_lease(1), store.now())  # on a new connection
        assert again is not None and again.id == "r1"
    finally:
        store.close()


def _driver(c: Any) -> Any:
    return c.connection.dbapi_connection


def test_a_forked_child_writes_through_connections_of_its_own(tmp_path: Path) -> None:
    """The child neither uses nor closes the parent's connections (kept or pooled); the
    parent's go on working. (SQLite does not support the child's writes to a database the
    parent still has open beyond this: see `Db._forget_kept`.)"""
    store = _sqlite_store(tmp_path)
    try:
        for i in range(3):
            _queue(store, f"r{i}", age=10 - i)
        assert store.claim_next_run(_lease(0), store.now()) is not None  # a kept connection
        parents = dict(store.db._kept)
        assert parents
        pid = os.fork()
        if pid == 0:  # the child: nothing of the parent's is used, its own write works
            code = 1
            try:
                if store.db._kept == {}:
                    assert store.claim_next_run(_lease(1), store.now()) is not None
                    mine = {_driver(c) for c in store.db._kept.values()}
                    code = 0 if mine.isdisjoint(_driver(c) for c in parents.values()) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        run = store.claim_next_run(_lease(2), store.now())  # the parent's own still work
        assert run is not None and run.id == "r2" and store.get_run("r1").lease_owner == "w/1"
    finally:
        store.close()


def test_close_closes_the_kept_connections(tmp_path: Path) -> None:
    store = _sqlite_store(tmp_path)
    _queue(store, "r0")
    assert store.claim_next_run(_lease(0), store.now()) is not None
    store.commit_transition("r0", _lease(0), _done(0), store.now())
    kept = list(store.db._kept.values())
    assert len(kept) == 2  # the fsync'd writes' and the claims'
    store.close()
    assert all(c.closed for c in kept)
    assert not (tmp_path / "state.db-wal").exists()  # the last close folded the log in


@pytest.mark.parametrize("where", ["begin", "commit"])
def test_an_interrupt_at_begin_or_commit_does_not_keep_the_write_lock(
    tmp_path: Path, where: str
) -> None:
    """A KeyboardInterrupt (Ctrl-C in a foreground `run`, whose runner then releases its
    run) that lands right after the driver's BEGIN IMMEDIATE, or just before its COMMIT,
    on a kept connection: the connection is given up (its transaction rolled back), so
    another process can write at once and this process's next write works."""
    import sqlite3

    store = _sqlite_store(tmp_path)
    try:
        _queue(store, "r0")
        run = store.claim_next_run(_lease(0), store.now())
        assert run is not None
        armed = [True]

        def interrupt(conn: Any) -> None:
            if armed[0]:
                armed[0] = False
                raise KeyboardInterrupt

        sa.event.listen(store.engine, where, interrupt)  # after sqlite_begin's BEGIN
        with pytest.raises(KeyboardInterrupt):
            store.release(run.id, _lease(0), store.now())
        other = sqlite3.connect(f"{tmp_path}/state.db", timeout=1)
        try:
            other.execute("BEGIN IMMEDIATE")  # not 'database is locked'
            other.rollback()
            store.release(run.id, _lease(0), store.now())  # the runner's release, again
            row = other.execute("SELECT status, lease_owner FROM dy_runs WHERE id='r0'")
            assert row.fetchone() == ("running", None)  # released: no lease
        finally:
            other.close()
    finally:
        store.close()
