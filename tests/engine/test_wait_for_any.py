"""wait_for_any on SQLite and PostgreSQL: the first alternative wins atomically, the others
are withdrawn for good (a later event is not consumed, a withdrawn token is refused), the
output names the winner; and two matching events and a timeout racing 1,000 times."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.errors import TokenError
from engine.models import RunStatus
from engine.pauses import pause_at
from engine.runner import Runner
from engine.service import Engine
from engine.settings import resolve_settings
from engine.store import schema as t
from engine.views import run_detail

FLOWS = Path(__file__).parent / "anyflows"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    e = Engine(resolve_settings(db=db_url, workflows=str(FLOWS)), import_steps=False)
    assert e.catalog.problems == []
    yield e
    e.close()


def worker(engine: Engine, clock: Any = None) -> Runner:
    return Runner(engine.store, foreground=False, host=engine, clock=clock)


def start(engine: Engine, payload: dict[str, Any], workflow: str = "decision") -> str:
    machine = engine.workflow(workflow)
    new = engine.new_run(machine, payload, {"kind": "manual"})
    return worker(engine).start(machine, payload, new=new).id


def token_of(engine: Engine, run_id: str) -> str:
    step = next(s for s in engine.store.get_steps(run_id) if s.step_key == "decide")
    return next(a["token"] for a in step.wait["alternatives"] if a["kind"] == "token")


def consumed(engine: Engine, event_id: str) -> int:
    with engine.store.db.engine.connect() as c:  # type: ignore[attr-defined]
        q = sa.select(sa.func.count()).select_from(t.inbox).where(t.inbox.c.event_id == event_id)
        return int(c.execute(q).scalar_one())


def index_rows(engine: Engine, run_id: str) -> list[str]:
    return [s.step_key for s in engine.store.get_steps(run_id) if "@" in s.step_key]


def test_the_first_event_wins_and_the_others_are_withdrawn_for_good(engine: Engine) -> None:
    run_id = start(engine, {"doc": "d1"})
    assert engine.store.get_run(run_id).status == RunStatus.WAITING
    assert sorted(index_rows(engine, run_id)) == ["decide@approved", "decide@rejected"]
    assert engine.send_event("review.rejected", {"doc": "other"}).resumed == ()
    assert engine.send_event("review.rejected", {"doc": "d1"}).resumed == (run_id,)
    later = engine.send_event("review.approved", {"doc": "d1"})
    assert later.resumed == () and consumed(engine, str(later.event_id)) == 0
    assert index_rows(engine, run_id) == []  # withdrawn: no event can find the wait again
    with pytest.raises(TokenError, match="was withdrawn: the wait_for_any's alternative `rejec"):
        engine.complete_token(token_of(engine, run_id), {"by": "ana"})
    done = worker(engine).drive(run_id)
    assert done.status == RunStatus.COMPLETED
    assert done.output == {"winner": "rejected", "data": {"doc": "d1"}}
    logs = [entry.message for entry in engine.store.get_logs(run_id)]
    assert "decided rejected" in logs


def test_the_token_wins_then_is_used_up_and_events_find_nothing(engine: Engine) -> None:
    run_id = start(engine, {"doc": "d2"})
    token = token_of(engine, run_id)
    assert engine.complete_token(token, {"by": "ana"}) == run_id
    with pytest.raises(TokenError, match="already completed"):
        engine.complete_token(token, {"by": "bob"})
    late = engine.send_event("review.approved", {"doc": "d2"})
    assert late.resumed == () and consumed(engine, str(late.event_id)) == 0
    done = worker(engine).drive(run_id)
    assert done.output == {"winner": "human", "data": {"by": "ana"}}
    assert index_rows(engine, run_id) == []


def test_the_wait_wins_on_the_virtual_clock(engine: Engine) -> None:
    run_id = start(engine, {"doc": "d3"})
    step = next(s for s in engine.store.get_steps(run_id) if s.step_key == "decide")
    assert step.wake_at is not None
    early = worker(engine, clock=lambda: step.wake_at - 1).drive(run_id)
    assert early.status == RunStatus.WAITING  # not due: parked again
    done = worker(engine, clock=lambda: step.wake_at + 1).drive(run_id)
    assert done.output == {"winner": "reminder", "data": None}
    late = engine.send_event("review.approved", {"doc": "d3"})
    assert late.resumed == () and consumed(engine, str(late.event_id)) == 0
    with pytest.raises(TokenError, match="alternative `reminder` happened first"):
        engine.complete_token(token_of(engine, run_id), {})


def test_an_event_sent_while_the_run_was_busy_is_found_when_it_parks(engine: Engine) -> None:
    """The event comes between reaching the step and parking: the park takes it."""
    machine = engine.workflow("decision")
    new = engine.new_run(machine, {"doc": "d4"}, {"kind": "manual"})
    sent: list[Any] = []
    with pause_at(
        "runner.before_commit.waiting",
        lambda: sent or sent.append(engine.send_event("review.approved", {"doc": "d4"})),
    ):
        run = worker(engine).start(machine, {"doc": "d4"}, new=new)
    assert sent[0].resumed == ()  # nothing was parked yet
    assert run.status == RunStatus.COMPLETED  # the park found it and went on at once
    assert run.output == {"winner": "approved", "data": {"doc": "d4"}}
    assert consumed(engine, str(sent[0].event_id)) == 1


def test_cancel_withdraws_every_alternative(engine: Engine) -> None:
    run_id = start(engine, {"doc": "d5"})
    assert engine.store.request_cancel(run_id, engine.store.now()).status == RunStatus.CANCELLED
    assert index_rows(engine, run_id) == []
    with pytest.raises(TokenError, match="cancelled"):
        engine.complete_token(token_of(engine, run_id), {})
    assert engine.send_event("review.approved", {"doc": "d5"}).resumed == ()


def test_runs_show_describes_each_alternative(engine: Engine) -> None:
    run_id = start(engine, {"doc": "d6"})
    waiting = run_detail(engine.store, engine.store.get_run(run_id))["waiting"]
    assert waiting["kind"] == "any" and waiting["step"] == "decide"
    names = [(a["name"], a["kind"]) for a in waiting["alternatives"]]
    assert names == [
        ("approved", "event"),
        ("rejected", "event"),
        ("human", "token"),
        ("reminder", "timer"),
    ]
    approved, _, human, reminder = waiting["alternatives"]
    assert approved["match"] == {"doc": "d6"}
    assert approved["command"].startswith("durable-yaml send review.approved --payload ")
    assert human["command"].startswith(f"durable-yaml complete {token_of(engine, run_id)} ")
    assert reminder["wake_at"] is not None and waiting["wake_at"] == reminder["wake_at"]


def test_the_worst_interleaving_an_event_matched_then_a_timeout_first(engine: Engine) -> None:
    """An event's transaction has found the parked wait when the timeout is written: on
    PostgreSQL the timeout commits first and the event's answer loses (it waits on the
    inbox key); on SQLite the event holds the write lock, so it wins. Either way one winner,
    and the output names it."""
    run_id = start(engine, {"doc": "d7"})
    step = next(s for s in engine.store.get_steps(run_id) if s.step_key == "decide")
    timed_out = threading.Event()
    ended: list[Any] = []

    def timeout() -> None:
        ended.append(worker(engine, clock=lambda: step.wake_at + 1).drive(run_id))
        timed_out.set()

    def hook() -> None:
        threading.Thread(target=timeout).start()
        timed_out.wait(1.0)  # on SQLite the timeout waits for this transaction's lock

    with pause_at("inbox.deliver_event.matched", hook):
        sent = engine.send_event("review.approved", {"doc": "d7"})
    timed_out.wait(10)
    (run,) = ended
    if engine.store.db.is_postgres:  # type: ignore[attr-defined]
        assert sent.resumed == () and consumed(engine, str(sent.event_id)) == 0
        assert run.output == {"winner": "reminder", "data": None}
    else:
        assert sent.resumed == (run_id,)
        assert run.output == {"winner": "approved", "data": {"doc": "d7"}}


RACES = 1000
GROUP = 10  # runs one pair of events answers (their match is the group)


def test_two_events_and_a_timeout_race_1000_times(engine: Engine) -> None:
    """Per group of 10 parked runs, an `approved` and a `rejected` event for the group and
    workers taking each run's timeout (claim, take the timeout, commit the answer) start at
    once (a barrier), from four threads; every writer reports what it won. Each run has
    exactly one winner, the writers' own reports agree with it, and the run's output names
    it."""
    machine = engine.workflow("race")
    created: list[list[str]] = []

    def create(slot: int, makers: int) -> None:
        runner = worker(engine)
        for group in range(slot, RACES // GROUP, makers):
            ids = []
            for _ in range(GROUP):
                payload = {"group": group}
                new = engine.new_run(machine, payload, {"kind": "manual"})
                ids.append(runner.start(machine, payload, new=new).id)
            created.append(ids)

    # SQLite writes one transaction at a time: more threads would only wait for its lock
    count = 4 if engine.store.db.is_postgres else 1  # type: ignore[attr-defined]
    makers = [threading.Thread(target=create, args=(i, count)) for i in range(count)]
    for th in makers:
        th.start()
    for th in makers:
        th.join()
    groups = {engine.store.get_run(ids[0]).payload["group"]: ids for ids in created}
    with engine.store.db.engine.connect() as c:  # type: ignore[attr-defined]
        wake = c.execute(sa.select(sa.func.max(t.steps.c.wake_at))).scalar_one()
    late = lambda: wake + 1  # noqa: E731 - every run's timer is due
    won: dict[str, list[str]] = {"approved": [], "rejected": [], "reminder": []}
    outputs: dict[str, Any] = {}
    timeout_threads = 2
    barrier = threading.Barrier(2 + timeout_threads)
    errors: list[BaseException] = []

    def send(name: str, winner: str) -> None:
        try:
            for group in sorted(groups):
                barrier.wait()
                won[winner] += engine.send_event(name, {"group": group}).resumed
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    def time_out(slot: int) -> None:
        runner = worker(engine, clock=late)
        try:
            for group in sorted(groups):
                barrier.wait()
                for run_id in groups[group][slot::timeout_threads]:
                    run = runner.drive(run_id)
                    outputs[run_id] = run.output
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    def widen() -> None:
        time.sleep(0.0005)  # an event has matched its waits and not yet answered them

    threads = [
        threading.Thread(target=send, args=("race.approved", "approved")),
        threading.Thread(target=send, args=("race.rejected", "rejected")),
        *(threading.Thread(target=time_out, args=(i,)) for i in range(timeout_threads)),
    ]
    with pause_at("inbox.deliver_event.matched", widen):
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert errors == []
    all_ids = [run_id for ids in created for run_id in ids]
    assert len(all_ids) == RACES and len(outputs) == RACES
    with engine.store.db.engine.connect() as c:  # type: ignore[attr-defined]
        answers = {
            row.run_id: row
            for row in c.execute(sa.select(t.inbox).where(t.inbox.c.step_key == "decide"))
        }
        runs = {row.id: row for row in c.execute(sa.select(t.runs))}
        leftover = c.execute(sa.select(sa.func.count()).where(t.steps.c.step_key.like("%@%")))
        assert leftover.scalar_one() == 0  # every alternative withdrawn
    approved, rejected = set(won["approved"]), set(won["rejected"])
    assert len(approved) + len(rejected) == len(won["approved"]) + len(won["rejected"])
    assert not approved & rejected  # no run was resumed by both events
    for run_id in all_ids:
        output = outputs[run_id]
        winner = output["winner"]
        assert runs[run_id].status == RunStatus.COMPLETED.value
        assert runs[run_id].output == output
        assert (run_id in approved) == (winner == "approved")
        assert (run_id in rejected) == (winner == "rejected")
        kind = "timeout" if winner == "reminder" else "event"
        assert answers[run_id].kind == kind
        assert output["data"] == (None if kind == "timeout" else runs[run_id].payload)
    # (how they split is up to the race: every outcome is allowed, one per run is not)
    counts = {k: sum(1 for o in outputs.values() if o["winner"] == k) for k in won}
    assert sum(counts.values()) == RACES, counts


def test_runs_show_and_the_dashboard_say_what_it_waits_for(engine: Engine, db_url: str) -> None:
    from engine.server.ui import waiting_for
    from tests.conftest import cli

    run_id = start(engine, {"doc": "d8"})
    token = token_of(engine, run_id)
    shown = cli("runs", "show", run_id, env={"DURABLE_YAML_DB": db_url})
    assert shown.returncode == 0, shown.stderr
    assert "waiting at step decide since" in shown.stdout
    assert "for the first of: approved (event review.approved matching" in shown.stdout
    assert f"human (token {token})" in shown.stdout
    assert f"  human: durable-yaml complete {token} --data " in shown.stdout
    step = next(s for s in engine.store.get_steps(run_id) if s.step_key == "decide")
    text = waiting_for(step.wait, None, "decide")["text"]
    assert text == (
        "the first of approved (event review.approved), rejected (event review.rejected), "
        "human (a token), reminder (a timer)"
    )


def test_sigkill_while_the_winner_is_committed_resumes_with_the_same_winner(
    tmp_path: Path, db_url: str
) -> None:
    """The event has won; the process taking the answer is killed inside the commit that
    would end the step; the next resume ends it with that winner, once."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from engine.store import open_store
    from tests.conftest import ROOT, cli

    env = {"DURABLE_YAML_DB": db_url, "DURABLE_YAML_WORKFLOWS": str(FLOWS)}
    started = cli("run", "decision", "--payload", json.dumps({"doc": "k1"}), env=env)
    assert "waiting" in started.stdout + started.stderr, started.stdout + started.stderr
    store = open_store(db_url)
    try:
        (run,) = store.list_runs()
        sent = cli("send", "review.approved", "--payload", json.dumps({"doc": "k1"}), env=env)
        assert sent.returncode == 0, sent.stderr
        assert index_rows_of(store, run.id) == []  # the winning event withdrew the others
        killed = subprocess.Popen(
            [sys.executable, "-m", "engine", "resume", run.id],
            cwd=tmp_path,
            env={
                **os.environ,
                **env,
                "PYTHONPATH": str(ROOT),
                "DURABLE_YAML_PAUSE": "store.commit.written=60",
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while time.time() < deadline and store.get_run(run.id).lease_owner is None:
            time.sleep(0.05)
        time.sleep(1.0)  # it has taken the answer and sleeps inside the step's commit
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert store.get_run(run.id).status != RunStatus.COMPLETED
        decide = next(s for s in store.get_steps(run.id) if s.step_key == "decide")
        assert decide.status.value == "waiting"  # nothing of that commit was kept
        resumed = cli("resume", run.id, env=env)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        done = store.get_run(run.id)
        assert done.status == RunStatus.COMPLETED
        assert done.output == {"winner": "approved", "data": {"doc": "k1"}}
        logs = [e.message for e in store.get_logs(run.id) if e.message.startswith("decided")]
        assert logs == ["decided approved"]
    finally:
        store.close()


def index_rows_of(store: Any, run_id: str) -> list[str]:
    return [s.step_key for s in store.get_steps(run_id) if "@" in s.step_key]
