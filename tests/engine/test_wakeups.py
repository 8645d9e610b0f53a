"""No lost wake-up, on SQLite and PostgreSQL: each interleaving that used to strand a run is
forced with a pause hook at a named point (`engine.pauses`), so it happens every time.

The rule under test: whatever ends a wait (event, token, child result, timeout, cancel) is a
row of the inbox written once; the commit that parks a run reads it under the run's lock;
the first answer wins and every loser learns it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import TokenError
from engine.models import RunStatus
from engine.pauses import pause_at
from engine.registry import import_modules
from engine.runner import Runner
from engine.service import Engine
from engine.settings import resolve_settings

WAKE = Path(__file__).parent / "wakeups"


@pytest.fixture
def engine(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setenv("WAKE_COUNT", str(tmp_path / "calls.txt"))
    import_modules(["wakesteps"], str(WAKE))
    e = Engine(resolve_settings(db=db_url, workflows=str(WAKE)), import_steps=False)
    assert e.catalog.problems == []
    yield e
    e.close()


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls.txt"
    return path.read_text().split() if path.exists() else []


def worker(engine: Engine) -> Runner:
    return Runner(engine.store, foreground=False, host=engine)


def start(engine: Engine, workflow: str, payload: object) -> str:
    """Create a run and drive it as a worker would, until it ends or parks."""
    machine = engine.workflow(workflow)
    new = engine.new_run(machine, payload, {"kind": "manual"})
    return worker(engine).start(machine, payload, new=new).id


def drain(engine: Engine, rounds: int = 50) -> None:
    """Act as a worker until nothing is claimable now or within half a second."""
    runner = worker(engine)
    for _ in range(rounds):
        run = engine.store.claim_next_run(runner.lease, engine.store.now())
        if run is None:
            due = engine.store.next_due_at()
            if due is None or due - engine.store.now() > 0.5:
                return
            time.sleep(max(0.0, due - engine.store.now()) + 0.01)
            continue
        runner.drive_claimed(run)


def in_thread(fn: object) -> None:
    """Run `fn` in another thread and wait for it: a second process's transaction."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join(30)
    if errors:
        raise errors[0]


# 2: an event sent between the wait step beginning and its WAITING commit ---------------------
def test_an_event_sent_while_the_wait_step_is_being_parked_is_taken(engine: Engine) -> None:
    sent: list[object] = []

    def send_now() -> None:
        if not sent:
            in_thread(lambda: sent.append(engine.send_event("ping", {"k": "a"})))

    with pause_at("runner.before_commit.waiting", send_now):
        run_id = start(engine, "waiter", {"k": "a"})
    assert sent and sent[0].resumed == ()  # type: ignore[attr-defined]  # nothing parked yet
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.COMPLETED, run
    assert run.output == {"k": "a"}


# 4: an answer arriving while another process holds the waiting run's lease -------------------
def test_an_event_sent_while_a_holder_is_about_to_park_is_not_lost(engine: Engine) -> None:
    run_id = start(engine, "waiter", {"k": "b"})
    assert engine.store.get_run(run_id).status == RunStatus.WAITING
    sent: list[object] = []

    def send_now() -> None:
        if not sent:
            in_thread(lambda: sent.append(engine.send_event("ping", {"k": "b", "n": 1})))

    with pause_at("runner.before_park", send_now):
        done = worker(engine).drive(run_id)  # claims it (lease held), finds nothing, parks
    assert sent and sent[0].resumed == (run_id,)  # type: ignore[attr-defined]
    if not done.finished:  # the park saw the answer or made the run claimable at once
        drain(engine)
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.COMPLETED and run.output == {"k": "b", "n": 1}


# 1: a child that ends while its parent is leased -----------------------------------------------
def test_a_child_that_ends_while_its_parent_is_held_wakes_it(engine: Engine) -> None:
    parent_id = start(engine, "parent", {"n": 3})
    parent = engine.store.get_run(parent_id)
    assert parent.status == RunStatus.WAITING
    (child,) = engine.store.list_runs(parent_run_id=parent_id)
    finished: list[str] = []

    def run_child() -> None:
        if not finished:
            in_thread(lambda: finished.append(worker(engine).drive(child.id).status.value))

    with pause_at("runner.before_park", run_child):
        worker(engine).drive(parent_id)
    assert finished == ["completed"]
    drain(engine)
    parent = engine.store.get_run(parent_id)
    assert parent.status == RunStatus.COMPLETED, parent
    assert parent.output == "kid 3"


def test_no_child_exists_before_its_parent_parks(engine: Engine) -> None:
    seen: list[int] = []

    def look() -> None:
        seen.append(len(engine.store.list_runs(workflow_id="kid")))

    with pause_at("runner.before_commit.waiting", look):
        start(engine, "parent", {"n": 1})
    assert seen == [0]
    assert len(engine.store.list_runs(workflow_id="kid")) == 1


def test_no_event_exists_before_the_emitting_step_commits(engine: Engine) -> None:
    seen: list[int] = []

    def look() -> None:
        seen.append(len(engine.store.list_runs(workflow_id="answerer")))

    with pause_at("runner.before_commit.running", look):
        start(engine, "asker", {})
    assert seen and seen[0] == 0  # before the send_event step committed: no triggered run
    drain(engine)
    (asker,) = engine.store.list_runs(workflow_id="asker")
    assert engine.store.get_run(asker.id).output == {"rid": asker.id, "answer": 42}


# 3: a timeout racing a completion ---------------------------------------------------------------
def _token_of(engine: Engine, run_id: str) -> str:
    (step,) = [s for s in engine.store.get_steps(run_id) if s.step_key == "approve"]
    assert step.wait is not None
    return str(step.wait["token"])


def test_a_completion_acknowledged_during_the_timeout_check_wins(engine: Engine) -> None:
    run_id = start(engine, "token", {})
    token = _token_of(engine, run_id)
    time.sleep(2.1)  # the wait's deadline passes
    answered: list[str] = []

    def complete_now() -> None:
        if not answered:
            in_thread(lambda: answered.append(engine.complete_token(token, {"ok": True})))

    with pause_at("inbox.before_take", complete_now):
        done = worker(engine).drive(run_id)
    assert answered == [run_id]  # acknowledged...
    assert done.status == RunStatus.COMPLETED and done.output == {"ok": True}  # ...and kept


def test_a_completion_after_the_timeout_won_is_refused(engine: Engine) -> None:
    run_id = start(engine, "token", {})
    token = _token_of(engine, run_id)
    time.sleep(2.1)
    done = worker(engine).drive(run_id)
    assert done.status == RunStatus.FAILED and "TimeoutError" in (done.error or "")
    with pytest.raises(TokenError, match="timed out"):
        engine.complete_token(token, {"ok": True})


# 5: a retried run_workflow cancels its first child, whose result cannot answer the retry -----
def test_a_retried_child_wait_cancels_the_first_child(engine: Engine) -> None:
    run_id = start(engine, "retrychild", {})
    (first,) = engine.store.list_runs(workflow_id="slowkid")
    time.sleep(1.1)  # attempt 1 times out
    drain(engine)
    kids = {r.id: r for r in engine.store.list_runs(workflow_id="slowkid")}
    assert len(kids) == 2 and kids[first.id].status == RunStatus.CANCELLED
    (second,) = [r for r in kids.values() if r.id != first.id]
    # the first child's token answers nothing now
    (hold,) = [s for s in engine.store.get_steps(first.id) if s.step_key == "hold"]
    with pytest.raises(TokenError):
        engine.complete_token(str((hold.wait or {})["token"]), {"late": True})
    (hold2,) = [s for s in engine.store.get_steps(second.id) if s.step_key == "hold"]
    engine.complete_token(str((hold2.wait or {})["token"]), {"from": "second"})
    drain(engine)
    parent = engine.store.get_run(run_id)
    assert parent.status == RunStatus.COMPLETED and parent.output == {"from": "second"}


# 12: cancelled runs' waits are withdrawn ---------------------------------------------------------
def test_a_cancelled_waiting_run_is_not_resumed_by_later_answers(engine: Engine) -> None:
    run_id = start(engine, "waiter", {"k": "c"})
    engine.store.request_cancel(run_id, engine.store.now())
    assert engine.send_event("ping", {"k": "c"}).resumed == ()
    token_run = start(engine, "token", {})
    token = _token_of(engine, token_run)
    engine.store.request_cancel(token_run, engine.store.now())
    with pytest.raises(TokenError, match="cancelled"):
        engine.complete_token(token, {})


def test_an_event_racing_a_cancel_has_one_winner(engine: Engine) -> None:
    for i in range(20):
        run_id = start(engine, "waiter", {"k": f"r{i}"})
        threads = [
            threading.Thread(target=engine.send_event, args=("ping", {"k": f"r{i}"})),
            threading.Thread(target=engine.store.request_cancel, args=(run_id, engine.store.now())),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        drain(engine)
        run = engine.store.get_run(run_id)
        assert run.status in (RunStatus.CANCELLED, RunStatus.COMPLETED)
        assert run.lease_owner is None and run.next_at is None


# lookback: an event recorded before the wait, within the window ------------------------------
def test_lookback_takes_an_earlier_event_once(engine: Engine) -> None:
    engine.send_event("ping", {"k": "early", "n": 1})
    run_id = start(engine, "early", {"k": "early"})
    run = engine.store.get_run(run_id)
    # the first wait took the stored event; the second may not take the same one again
    assert run.status == RunStatus.WAITING and run.current_step == "again"
    (first,) = [s for s in engine.store.get_steps(run_id) if s.step_key == "ping"]
    assert first.output == {"k": "early", "n": 1}
    engine.send_event("ping", {"k": "early", "n": 2})
    drain(engine)
    (second,) = [s for s in engine.store.get_steps(run_id) if s.step_key == "again"]
    assert second.output == {"k": "early", "n": 2}


# 8: a result the database cannot store fails the step, which never runs again ----------------
def test_a_result_that_cannot_be_stored_fails_the_step_once(engine: Engine, tmp_path: Path) -> None:
    run_id = start(engine, "nul", {})
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.FAILED and "StepOutputInvalid" in (run.error or ""), run
    drain(engine)
    assert calls(tmp_path) == ["nul"]
    assert any(log.message.startswith("failed:") for log in engine.store.get_logs(run_id))


# 11: idempotency keys ------------------------------------------------------------------------
def test_concurrent_first_uses_of_a_key_make_one_set_of_runs(engine: Engine) -> None:
    results: list[object] = []
    errors: list[BaseException] = []

    def send() -> None:
        try:
            results.append(engine.send_event("order.placed", {"fail": False}, "key-1"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    fresh = [r for r in results if not r.duplicate]  # type: ignore[attr-defined]
    assert len(fresh) == 1 and len(fresh[0].run_ids) == 2  # type: ignore[attr-defined]
    assert len(engine.store.list_runs()) == 2


def test_reusing_a_key_restarts_only_the_runs_that_failed(engine: Engine, tmp_path: Path) -> None:
    first = engine.send_event("order.placed", {"fail": True}, "key-2")
    drain(engine)
    statuses = {
        engine.store.get_run(r).workflow_id: engine.store.get_run(r).status for r in first.run_ids
    }
    assert statuses == {"pair": RunStatus.FAILED, "pair2": RunStatus.COMPLETED}
    again = engine.send_event("order.placed", {"fail": False}, "key-2")
    assert not again.duplicate and len(again.run_ids) == 1
    assert engine.store.get_run(again.run_ids[0]).workflow_id == "pair"
    drain(engine)
    assert len(engine.store.list_runs(workflow_id="pair2")) == 1
    assert engine.send_event("order.placed", {"fail": False}, "key-2").duplicate


# 13: runners leave no thread behind; the foreground obeys queue limits ------------------------
def test_many_foreground_runs_leave_no_threads_behind(engine: Engine) -> None:
    before = threading.active_count()
    for _ in range(30):
        engine.run(engine.workflow("kid"), {"n": 1})
    assert threading.active_count() <= before + 1  # at most the one shared heartbeat thread


def test_a_foreground_run_waits_for_room_in_its_queue(engine: Engine) -> None:
    machine = engine.workflow("limited")
    holder = worker(engine)
    blocking = engine.new_run(machine, {}, {"kind": "manual"})
    engine.store.create_run(blocking, engine.store.now())
    claimed = engine.store.claim_next_run(holder.lease, engine.store.now())
    assert claimed is not None and claimed.id == blocking.id  # the queue's one slot is taken
    done: list[str] = []
    t = threading.Thread(target=lambda: done.append(engine.run(machine, {}).status.value))
    t.start()
    time.sleep(1.0)
    assert done == []  # waiting for the slot, not running beside the held run
    holder.drive_claimed(claimed)
    t.join(20)
    assert done == ["completed"]


# Found by the adversarial review ------------------------------------------------------------
def test_an_event_sent_while_the_run_reaches_its_wait_is_taken(engine: Engine) -> None:
    """The event's time is read under the lock of its name, which the commit reaching a
    wait_for_event of that name also takes: stamps follow commit order."""
    senders: list[threading.Thread] = []

    def send_meanwhile() -> None:
        if not senders:  # the reach of `ping` holds the name lock (or SQLite's write lock)
            senders.append(threading.Thread(target=engine.send_event, args=("ping", {"k": "d"})))
            senders[0].start()

    with pause_at("store.commit.locked", send_meanwhile):
        run_id = start(engine, "waiter", {"k": "d"})
    senders[0].join(30)
    drain(engine)
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.COMPLETED and run.output == {"k": "d"}


def test_a_cancel_while_a_child_wait_is_being_parked_withdraws_it(engine: Engine) -> None:
    cancelled: list[str] = []

    def cancel_now() -> None:
        if not cancelled:
            run = engine.store.list_runs(workflow_id="retrychild")[0]
            in_thread(lambda: engine.store.request_cancel(run.id, engine.store.now()))
            cancelled.append(run.id)

    with pause_at("runner.before_commit.waiting", cancel_now):
        run_id = start(engine, "retrychild", {})
    assert engine.store.get_run(run_id).status == RunStatus.CANCELLED
    (child,) = engine.store.list_runs(workflow_id="slowkid")
    assert engine.store.get_run(child.id).status == RunStatus.CANCELLED  # no orphan
    (step,) = [s for s in engine.store.get_steps(run_id) if s.step_key == "child"]
    assert step.status.value == "cancelled"


def test_a_cancel_while_a_token_wait_is_being_parked_refuses_the_token(engine: Engine) -> None:
    def cancel_now() -> None:
        run = engine.store.list_runs(workflow_id="token")[0]
        in_thread(lambda: engine.store.request_cancel(run.id, engine.store.now()))

    with pause_at("runner.before_commit.waiting", cancel_now):
        run_id = start(engine, "token", {})
    assert engine.store.get_run(run_id).status == RunStatus.CANCELLED
    with pytest.raises(TokenError, match="cancelled"):
        engine.complete_token(_token_of(engine, run_id), {})


def test_a_run_is_not_answered_by_its_own_trigger_event(engine: Engine) -> None:
    first = engine.send_event("order.created", {"order": 1})
    drain(engine)
    (run_id,) = first.run_ids
    assert engine.store.get_run(run_id).status == RunStatus.WAITING
    second = engine.send_event("order.created", {"order": 2})
    assert run_id in second.resumed
    drain(engine)
    assert engine.store.get_run(run_id).output == {"order": 2}


def test_trigger_and_event_keys_do_not_collide(engine: Engine) -> None:
    waiting = start(engine, "waiter", {"k": "e"})
    engine.trigger("kid", {"n": 1}, idempotency_key="order-42")
    sent = engine.send_event("ping", {"k": "e"}, idempotency_key="order-42")
    assert not sent.duplicate and sent.resumed == (waiting,)
    assert engine.send_event("ping", {"k": "e"}, idempotency_key="order-42").duplicate


def test_a_result_the_database_refuses_fails_the_step_once(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the input boundary (switched off here), a value the database itself refuses
    (PostgreSQL and NUL) still fails the step once, instead of a crash loop."""
    monkeypatch.setattr("engine.executor.check_json", lambda value, field: None)
    run_id = start(engine, "nul", {})
    drain(engine)
    run = engine.store.get_run(run_id)
    if engine.store.dialect == "sqlite":  # SQLite stores the NUL character
        assert run.status == RunStatus.COMPLETED
    else:
        assert run.status == RunStatus.FAILED and "cannot be stored" in (run.error or ""), run
    assert calls(tmp_path) == ["nul"]


def test_foreground_run_whose_child_waits_exits_3_with_the_childs_token(tmp_path: Path) -> None:
    from tests.conftest import cli

    done = cli(
        "run",
        "tokenparent",
        "--db",
        f"sqlite:///{tmp_path}/s.db",
        "--workflows",
        str(WAKE),
        "-m",
        "wakesteps",
        cwd=WAKE,
        timeout=60,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "which waits for token" in done.stdout and "durable-yaml complete" in done.stdout


# Found by the second review ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unprintable", "surrogate", "nul", "huge"])
def test_a_step_failing_with_an_odd_exception_fails_its_run(engine: Engine, kind: str) -> None:
    run_id = start(engine, "oddfail", {"kind": kind})
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.FAILED, run  # recorded, never left `running`
    (step,) = [s for s in engine.store.get_steps(run_id) if s.step_key == "fail"]
    assert step.error is not None and len(step.error) < 70_000


def test_for_each_outputs_together_are_bounded(engine: Engine) -> None:
    run_id = start(engine, "bigitems", {})
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.FAILED and "together exceed" in (run.error or ""), run
