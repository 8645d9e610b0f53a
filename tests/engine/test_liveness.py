"""Workers that never die, never spin, and know who is alive (issue #10, causes 7, 9, 10).

In-process workers on both backends: the worker registry and lease liveness from it, idle
executors that sleep until something can change (and miss no wake-up that lands between a
claim and the sleep), and worker threads that survive any exception. Pause hooks at named
points make each interleaving happen every time."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine import step
from engine.errors import RunBusy
from engine.models import Lease, NewRun, QueueLimits, RunStatus, Transition, WorkerInfo
from engine.pauses import pause_at
from engine.service import Engine
from engine.settings import resolve_settings
from engine.store import SqlStore, open_store
from engine.store.workers import lease_owner
from engine.worker import Worker
from tests.conftest import cli

NOW = 2_147_155_200.0  # 2038-01-15T08:00:00Z: ahead of the real clock (claims stamp the later)
GATE = threading.Event()  # the `liveness.hold` step runs until this is set


@step("liveness.hold")
def hold(tag: str) -> dict[str, str]:
    GATE.wait(30)
    return {"tag": tag}


@step("liveness.quick")
def quick(tag: str) -> dict[str, str]:
    return {"tag": tag}


WORKFLOWS = {
    "single.yaml": """
id: single
version: "1"
trigger: {event: t.single}
queue: {name: single, concurrency: 1}
steps:
  - {id: work, call: liveness.hold, with: {tag: "{{ payload.tag }}"}}
""",
    "quick.yaml": """
id: quick
version: "1"
trigger: {event: t.quick}
steps:
  - {id: work, call: liveness.quick, with: {tag: "{{ payload.tag }}"}}
output: "{{ steps.work.output }}"
""",
}


@pytest.fixture
def engine(tmp_path: Path, db_url: str) -> Iterator[Engine]:
    folder = tmp_path / "workflows"
    folder.mkdir()
    for name, text in WORKFLOWS.items():
        (folder / name).write_text(text)
    e = Engine(resolve_settings(db=db_url, workflows=str(folder)), import_steps=False)
    e.save_all_definitions()
    GATE.clear()
    yield e
    GATE.set()
    e.close()


@pytest.fixture
def start_worker(engine: Engine) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(**options: object) -> Worker:
        settings: dict[str, object] = {"grace": 5, "lease_seconds": 6, "poll_interval": 1.0}
        w = Worker(engine, **{**settings, **options})  # type: ignore[arg-type]
        w.start()
        started.append(w)
        return w

    yield start
    GATE.set()
    for w in started:
        w.stop()
        w.shutdown()


def wait_for(predicate: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def status(engine: Engine, run_id: str) -> RunStatus:
    return engine.store.get_run(run_id).status


def count_at(name: str) -> tuple[list[float], object]:
    """A pause hook that only records when the point is reached."""
    seen: list[float] = []
    return seen, pause_at(name, lambda: seen.append(time.time()))


# -- the registry and lease liveness (cause 10) ----------------------------------------------


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    s = open_store(db_url)
    s.save_definition("h", "wf", "1", {}, "")
    yield s
    s.close()


def queued(store: SqlStore, run_id: str, at: float = NOW) -> None:
    new = NewRun(
        id=run_id,
        workflow_id="wf",
        version="1",
        definition_hash="h",
        payload={},
        first_step="s",
        queue="q",
    )
    store.send([new], at)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_worker_keeps_its_lease_whatever_its_pid_looks_like_here(store: SqlStore) -> None:
    """A worker in another container shares our hostname, and its pid means nothing here
    (here that pid is gone): its lease is alive because its row is fresh."""
    pid = dead_pid()
    w = WorkerInfo("host:1:aaaaaa", "vm", pid, lease_seconds=30)
    store.register_worker(w, NOW)
    queued(store, "r1")
    store.claim_run("r1", Lease(lease_owner(w.id, 0), "vm", pid, 30), NOW)
    assert store.expire_dead_leases(NOW + 20) == []
    store.worker_heartbeat(w.id, NOW + 20)
    with pytest.raises(RunBusy):  # the lease (NOW + 30) outlives... nothing: it is alive
        store.claim_run("r1", Lease("other", "vm", 1), NOW + 25)


def test_a_stale_worker_loses_its_leases_at_once(store: SqlStore) -> None:
    w = WorkerInfo("host:2:bbbbbb", "vm", 2, lease_seconds=10)
    store.register_worker(w, NOW)
    queued(store, "r1")
    store.claim_run("r1", Lease(lease_owner(w.id, 0), "vm", 2, 60), NOW)  # lease to NOW+60
    assert store.expire_dead_leases(NOW + 9) == []
    assert store.expire_dead_leases(NOW + 11) == ["r1"]  # no heartbeat for > 10 s
    assert store.list_workers(NOW + 11) == []  # the stale row is gone
    taken = store.claim_next_run(Lease("b", "vm", 3), NOW + 11)
    assert taken is not None and taken.id == "r1" and taken.current_attempt == 2
    # the old worker comes back: its heartbeat finds no row; it registers again
    assert store.worker_heartbeat(w.id, NOW + 12) is False


def test_a_deregistered_worker_loses_its_leases_and_claim_run_sees_it(store: SqlStore) -> None:
    w = WorkerInfo("host:3:cccccc", "vm", 3, lease_seconds=30)
    store.register_worker(w, NOW)
    queued(store, "r1")
    queued(store, "r2")
    store.claim_run("r1", Lease(lease_owner(w.id, 0), "vm", 3), NOW)
    store.claim_run("r2", Lease(lease_owner(w.id, 1), "vm", 3), NOW)
    store.deregister_worker(w.id)
    # `resume` (claim_run) takes over at once ...
    assert store.claim_run("r1", Lease("fg", "vm", 4), NOW + 1).lease_owner == "fg"
    # ... and the sweeper frees the others for claimers
    assert store.expire_dead_leases(NOW + 1) == ["r2"]


def test_the_sweeper_and_a_late_heartbeat_one_wins(store: SqlStore) -> None:
    """The interleaving: a sweeper has found worker W stale and locked its row when W's
    heartbeat arrives. The heartbeat waits for the sweeper's commit, then finds no row
    (W registers again; its run was freed and is taken over by the next claim)."""
    w = WorkerInfo("host:4:dddddd", "vm", 4, lease_seconds=10)
    store.register_worker(w, NOW)
    queued(store, "r1")
    store.claim_run("r1", Lease(lease_owner(w.id, 0), "vm", 4, 60), NOW)
    other = open_store(store.url, migrate=False)
    locked, results = threading.Event(), {}

    def hook() -> None:
        locked.set()
        time.sleep(0.5)  # the heartbeat is sent meanwhile and must wait

    def beat() -> None:
        locked.wait(10)
        results["beat"] = other.worker_heartbeat(w.id, NOW + 12)
        results["beat_at"] = time.time()

    t = threading.Thread(target=beat)
    t.start()
    with pause_at("workers.expire.locked", hook):
        assert store.expire_dead_leases(NOW + 12) == ["r1"]
    swept_at = time.time()
    t.join(10)
    other.close()
    assert results["beat"] is False and results["beat_at"] >= swept_at - 0.05
    store.register_worker(w, NOW + 12)
    run = store.claim_next_run(Lease("b", "vm", 5), NOW + 12)
    assert run is not None and run.id == "r1"


def test_worker_registers_its_leases_name_it_and_a_stop_deregisters(
    engine: Engine, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    w = start_worker(concurrency=2)
    (run_id,) = engine.send_event("t.single", {"tag": "a"}).run_ids
    wait_for(lambda: status(engine, run_id) == RunStatus.RUNNING)
    run = engine.store.get_run(run_id)
    assert run.lease_owner is not None and run.lease_owner.startswith(w.id + "/")
    listed = cli("workers", "list", "--json", "--db", engine.store.url, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["id"], row["concurrency"], row["running"]) == (w.id, 2, 1)
    assert row["heartbeat_at"] and row["pid"] and row["host"]
    GATE.set()
    wait_for(lambda: status(engine, run_id) == RunStatus.COMPLETED)
    w.stop()
    w.shutdown()
    assert engine.store.list_workers(engine.store.now()) == []


# -- idle workers sleep (cause 7) -------------------------------------------------------------


def test_next_claim_at_ignores_runs_held_back_by_a_full_queue(store: SqlStore) -> None:
    store.save_queue_limits([QueueLimits("q", concurrency=1)])
    queued(store, "held")
    queued(store, "blocked", at=NOW + 0.1)
    assert store.claim_next_run(Lease("a", "vm", 1, 30), NOW + 1) is not None
    assert store.claim_next_run(Lease("b", "vm", 1, 30), NOW + 2) is None
    # only the holder's lease expiry can change anything by itself
    assert store.next_claim_at(NOW + 2, ["q"]) == NOW + 31


def test_next_claim_at_is_now_for_a_due_run_the_claim_left_behind(store: SqlStore) -> None:
    """A due run in a queue neither paused nor limited that an empty claim did not take (on
    PostgreSQL: another transaction held it locked) makes `next_claim_at` say: now."""
    queued(store, "due")
    assert store.next_claim_at(NOW + 2) == NOW + 2
    assert store.next_claim_at(NOW + 2, ["q"]) == NOW + 2
    assert store.next_claim_at(NOW + 2, ["elsewhere"]) is None
    store.save_queue_limits([QueueLimits("q", concurrency=5)])  # limited: a NOTIFY frees it
    assert store.next_claim_at(NOW + 2) is None
    store.save_queue_limits([QueueLimits("q")])
    store.set_queue_paused("q", True, NOW)  # paused: its resume NOTIFYs
    assert store.next_claim_at(NOW + 2) is None


def test_a_due_run_a_claim_passed_by_while_it_was_locked_is_taken_soon(
    tmp_path: Path,
) -> None:
    """PostgreSQL, a real worker whose notifications flow: a due run is held locked by a
    transaction that lets it go without taking it or sending a NOTIFY, while a wake-up makes
    the worker claim (SKIP LOCKED passes the run by: the claim is empty). The worker takes
    the run within a second of its release, not after the poller's MAX_IDLE (found by the
    reviewer helper: 4.2-4.7 s)."""
    import os
    import signal

    import psycopg

    from tests.conftest import PG_REASON, PG_URL, _reset_postgres

    if not PG_URL:
        pytest.skip(PG_REASON)
    _reset_postgres(PG_URL)
    folder = tmp_path / "flows"
    folder.mkdir()
    (folder / "quick.yaml").write_text(WORKFLOWS["quick.yaml"])
    (tmp_path / "missedsteps.py").write_text(
        "from engine import step\n\n\n@step('liveness.quick')\n"
        "def quick(tag: str) -> dict:\n    return {'tag': tag}\n"
    )
    engine = Engine(resolve_settings(db=PG_URL, workflows=str(folder)), import_steps=False)
    engine.save_all_definitions()
    worker = subprocess.Popen(
        [sys.executable, "-m", "engine", "worker", "--concurrency", "2", "--no-schedules"],
        cwd=tmp_path,
        env={
            **os.environ,
            "DURABLE_YAML_DB": PG_URL,
            "DURABLE_YAML_MODULES": "missedsteps",
            "DURABLE_YAML_WORKFLOWS": str(folder),
            "PYTHONPATH": f"{Path(__file__).resolve().parents[2]}:{tmp_path}",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        first = engine.send_event("t.quick", {"tag": "first"}).run_ids[0]
        deadline = time.time() + 60
        while not engine.store.get_run(first).finished and time.time() < deadline:
            time.sleep(0.05)
        assert engine.store.get_run(first).finished  # the worker is up, notifications flow
        time.sleep(0.5)  # its executors idle again
        machine = engine.workflow("quick")
        new = engine.new_run(machine, {"tag": "locked"}, {"kind": "manual"})
        locker = psycopg.connect(PG_URL)
        engine.store.create_run(new, engine.store.now())  # committed, no NOTIFY
        locker.execute("SELECT id FROM dy_runs WHERE id = %s FOR UPDATE", (new.id,))
        with engine.store.db.autocommit() as c:  # some other commit wakes the worker
            engine.store.db.notify(c)
        time.sleep(0.3)  # its claim passes the locked run by
        locker.rollback()  # let go: due, unlocked, and nobody says so
        locker.close()
        released = time.time()
        while engine.store.get_run(new.id).started_at is None and time.time() < released + 30:
            time.sleep(0.02)
        assert time.time() - released < 1.0, time.time() - released
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        engine.close()


def test_next_claim_at_is_the_end_of_the_rate_window(store: SqlStore) -> None:
    store.save_queue_limits([QueueLimits("q", rate_limit=1, rate_period=10)])
    queued(store, "first")
    queued(store, "second", at=NOW + 0.1)
    assert store.claim_next_run(Lease("a", "vm", 1, 30), NOW + 1) is not None
    assert store.claim_next_run(Lease("b", "vm", 1, 30), NOW + 2) is None
    assert store.next_claim_at(NOW + 2) == pytest.approx(NOW + 11)


def test_an_idle_worker_with_a_full_queue_sleeps_until_the_slot_frees(
    engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    claims, hook = count_at("worker.claim")
    with hook:  # type: ignore[attr-defined]
        start_worker(concurrency=4)
        held = engine.send_event("t.single", {"tag": "held"}).run_ids[0]
        wait_for(lambda: status(engine, held) == RunStatus.RUNNING)
        behind = [engine.send_event("t.single", {"tag": f"b{i}"}).run_ids[0] for i in range(3)]
        time.sleep(0.5)
        before = len(claims)
        time.sleep(3.0)
        idle_claims = len(claims) - before
        GATE.set()  # the held run finishes: its slot frees, the next run starts at once
        released = time.time()
        wait_for(lambda: status(engine, behind[0]) != RunStatus.QUEUED, timeout=5)
        started_after = time.time() - released
    # 3 idle executors over 3 s: a few wake-ups (heartbeats commit), never a spin
    assert idle_claims <= 20, idle_claims
    assert started_after < 1.0
    wait_for(lambda: all(status(engine, r) == RunStatus.COMPLETED for r in behind))


def test_a_wake_up_between_an_empty_claim_and_the_sleep_is_not_lost(
    engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    """The interleaving: the executor's claim found the queue full; before it goes to sleep
    another process finishes the run holding the slot, and its wake-up (NOTIFY / the SQLite
    watcher) is delivered. Nothing else will happen: the executor must not sleep."""
    machine = engine.catalog.workflows["single"]
    holder = Lease("another-process", "vm", 1, 60)
    held = engine.store.create_run(
        engine.new_run(machine, {"tag": "held"}, {"kind": "manual"}), engine.store.now()
    )
    engine.store.claim_run(held.id, holder, engine.store.now())
    (behind,) = engine.send_event("t.single", {"tag": "behind"}).run_ids
    finished: dict[str, float] = {}

    def finish_the_holder_before_sleeping() -> None:
        if finished:
            return
        engine.store.commit_transition(
            held.id, holder, Transition(RunStatus.COMPLETED), engine.store.now()
        )
        engine.store.announce_slot_freed("single")
        finished["at"] = time.time()
        time.sleep(0.5)  # the wake-up is delivered while the executor has not slept yet

    GATE.set()
    with pause_at("worker.after_empty_claim", finish_the_holder_before_sleeping):
        w = start_worker(concurrency=1, schedules=False, poll_interval=5.0)
        wait_for(lambda: bool(finished), timeout=10)
        wait_for(lambda: status(engine, behind) == RunStatus.COMPLETED, timeout=10)
    started = engine.store.get_run(behind).started_at
    assert started is not None and started - finished["at"] < 1.5
    assert w._notified.is_set()


# -- threads survive anything (cause 9) ---------------------------------------------------------


def test_a_raw_driver_error_while_claiming_kills_no_executor(
    engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    raised: list[int] = []

    def busy_once() -> None:
        if not raised:
            raised.append(1)
            raise sqlite3.OperationalError("database is locked")

    with pause_at("worker.claim", busy_once):
        start_worker(concurrency=1, schedules=False)
        wait_for(lambda: bool(raised))
    (run_id,) = engine.send_event("t.quick", {"tag": "after"}).run_ids
    wait_for(lambda: status(engine, run_id) == RunStatus.COMPLETED)


def test_a_poison_run_fails_with_a_clear_error_and_the_executor_goes_on(
    engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    (poison,) = engine.send_event("t.quick", {"tag": "poison"}).run_ids
    calls: list[int] = []

    def explode() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug in the engine")

    with pause_at("worker.drive", explode):
        start_worker(concurrency=1, schedules=False)
        wait_for(lambda: status(engine, poison) == RunStatus.FAILED)
        (after,) = engine.send_event("t.quick", {"tag": "after"}).run_ids
        wait_for(lambda: status(engine, after) == RunStatus.COMPLETED)
    error = engine.store.get_run(poison).error or ""
    assert "KeyError" in error and "a bug in the engine" in error
    assert len(calls) == 2, "the poison run was driven once, not again and again"


def test_the_worker_heartbeat_survives_an_exception(
    engine: Engine, start_worker: Callable[..., Worker]
) -> None:
    beats: list[int] = []

    def flaky() -> None:
        beats.append(1)
        if len(beats) == 1:
            raise RuntimeError("unexpected")

    with pause_at("workers.heartbeat", flaky):
        w = start_worker(concurrency=1, schedules=False)  # beats every 2 s
        wait_for(lambda: len(beats) >= 3, timeout=10)
    assert [x["id"] for x in engine.store.list_workers(engine.store.now())] == [w.id]
