"""parallel on SQLite and PostgreSQL: each branch a child run of the same definition (so
different workers can execute them), the step's output maps branch -> its last step's
output, every branch's steps are readable after it; a failing branch fails the step and
its brothers are cancelled; SIGKILL inside a branch resumes there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsl import Machine
from engine.models import RunStatus
from engine.registry import import_modules
from engine.runner import Runner
from engine.service import Engine
from engine.settings import resolve_settings
from engine.store import open_store
from engine.views import run_detail
from tests.conftest import ROOT

FLOWS = Path(__file__).parent / "parflows"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["parsteps"], str(FLOWS))
    e = Engine(resolve_settings(db=db_url, workflows=str(FLOWS)), import_steps=False)
    assert e.catalog.problems == []
    yield e
    e.close()


def worker(engine: Engine) -> Runner:
    return Runner(engine.store, foreground=False, host=engine)


def start(engine: Engine, payload: dict[str, Any], foreground: bool = False) -> str:
    machine = engine.workflow("checks")
    new = engine.new_run(machine, payload, {"kind": "manual"})
    runner = engine.runner() if foreground else worker(engine)
    return runner.start(machine, payload, new=new).id


def branches(engine: Engine, run_id: str) -> dict[str, Any]:
    return {k.trigger["branch"]: k for k in engine.store.list_runs(parent_run_id=run_id)}


EXPECTED = {
    "checks": {"thumbs": 11, "text": "text of u1", "meta": None},
    "thumb": "thumb of u1",
}


def test_each_branch_is_a_run_any_worker_can_take_and_the_output_maps_them(
    engine: Engine,
) -> None:
    run_id = start(engine, {"url": "u1"})
    parent = engine.store.get_run(run_id)
    assert parent.status == RunStatus.WAITING and parent.lease_owner is None
    kids = branches(engine, run_id)
    assert sorted(kids) == ["meta", "text", "thumbs"]
    for name, first in (("thumbs", "thumb"), ("text", "where"), ("meta", "skip_me")):
        kid = kids[name]
        assert kid.status == RunStatus.QUEUED and kid.next_at is not None  # claimable
        assert kid.definition_hash == parent.definition_hash  # pinned like the parent
        assert kid.current_step == first and kid.payload == parent.payload
    for name in ("text", "meta", "thumbs"):  # a worker each, in any order
        assert worker(engine).drive(kids[name].id).status == RunStatus.COMPLETED
    done = worker(engine).drive(run_id)
    assert done.status == RunStatus.COMPLETED and done.output == EXPECTED
    steps = {s.step_key: s for s in engine.store.get_steps(run_id)}
    assert steps["checks"].output == EXPECTED["checks"]
    assert {k: steps[k].status.value for k in ("thumb", "thumb_size", "ocr", "skip_me")} == {
        "thumb": "completed",
        "thumb_size": "completed",
        "ocr": "completed",
        "skip_me": "skipped",
    }
    logs = [entry.message for entry in engine.store.get_logs(run_id)]
    assert "thumb=thumb of u1 ocr=text of u1" in logs
    # templates in a branch see the run it is a branch of, not the branch run
    assert steps["where"].output == f"branch of {run_id}, started by manual"
    detail = run_detail(engine.store, done)
    assert sorted(detail["children"]) == sorted(k.id for k in kids.values())
    shown = {s["id"]: s["status"] for s in detail["steps"]}
    assert shown["thumb_size"] == "completed" and shown["after"] == "completed"


def test_the_foreground_run_runs_the_branches_inline(engine: Engine) -> None:
    run_id = start(engine, {"url": "u1"}, foreground=True)
    assert engine.store.get_run(run_id).output == EXPECTED


def test_a_failing_branch_cancels_the_others_and_fails_the_step(engine: Engine) -> None:
    run_id = start(engine, {"url": "u2", "fail": True})
    kids = branches(engine, run_id)
    text = worker(engine).drive(kids["text"].id)
    assert text.status == RunStatus.FAILED
    assert text.error == "step ocr failed: NonRetryableError: could not read text of u2"
    parent = worker(engine).drive(run_id)
    assert parent.status == RunStatus.FAILED
    assert parent.error == (
        f"step checks failed: ChildFailed: branch text: child run {kids['text'].id} failed: "
        "step ocr failed: NonRetryableError: could not read text of u2"
    )
    after = {name: k.status for name, k in branches(engine, run_id).items()}
    assert after == {
        "text": RunStatus.FAILED,
        "thumbs": RunStatus.CANCELLED,
        "meta": RunStatus.CANCELLED,
    }
    steps = {s.step_key: s for s in engine.store.get_steps(run_id)}
    assert steps["ocr"].status.value == "failed"  # the failed branch's steps, copied
    assert "after" not in steps


def test_the_machine_holds_the_branches_and_round_trips(engine: Engine) -> None:
    machine = engine.workflow("checks")
    state = machine.state("checks")
    assert state.config["branches"] == [
        {"name": "thumbs", "first": "thumb", "last": "thumb_size"},
        {"name": "text", "first": "where", "last": "ocr"},
        {"name": "meta", "first": "skip_me", "last": "skip_me"},
    ]
    assert [(s.id, s.parent, s.branch, s.next) for s in machine.states if s.parent] == [
        ("thumb", "checks", "thumbs", "thumb_size"),
        ("thumb_size", "checks", "thumbs", "checks"),
        ("where", "checks", "text", "ocr"),
        ("ocr", "checks", "text", "checks"),
        ("skip_me", "checks", "meta", "checks"),
    ]
    assert state.next == "after"
    assert Machine.from_json(machine.to_json()) == machine


def test_sigkill_inside_a_branch_resumes_there(tmp_path: Path, db_url: str) -> None:
    env = {
        **os.environ,
        "PAR_LOG": str(tmp_path / "calls.log"),
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "parsteps",
        "DURABLE_YAML_WORKFLOWS": str(FLOWS),
        "PYTHONPATH": str(ROOT),
        "NO_COLOR": "1",
    }
    payload = json.dumps({"url": "u1"})
    first = subprocess.run(
        [sys.executable, "-m", "engine", "run", "checks", "--payload", payload],
        cwd=FLOWS,
        env={**env, "PAR_KILL_AT": "thumb_size"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == -signal.SIGKILL, first.stderr
    store = open_store(db_url)
    try:
        (parent,) = [r for r in store.list_runs() if r.parent_run_id is None]
        resumed = subprocess.run(
            [sys.executable, "-m", "engine", "resume", parent.id],
            cwd=FLOWS,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        run = store.get_run(parent.id)
        kids = store.list_runs(parent_run_id=parent.id)
        thumbs = next(k for k in kids if k.trigger["branch"] == "thumbs")
        attempts = [(a.step_key, a.attempt, a.status) for a in store.get_attempts(thumbs.id)]
    finally:
        store.close()
    assert run.status == RunStatus.COMPLETED and run.output == EXPECTED
    assert len(kids) == 3  # no branch was started twice
    calls = [json.loads(line)["step"] for line in (tmp_path / "calls.log").read_text().splitlines()]
    assert sorted(calls) == sorted(["start", "thumb", "thumb_size", "thumb_size", "ocr"])
    assert ("thumb_size", 1, "crashed") in attempts


def test_two_workers_run_two_branches_at_the_same_time(engine: Engine) -> None:
    """Each branch's step waits until the other's has begun: only two workers executing
    both branches at once let the run complete."""
    import threading

    from engine.runner import new_lease

    machine = engine.workflow("meet")
    new = engine.new_run(machine, {}, {"kind": "manual"})
    run_id = worker(engine).start(machine, {}, new=new).id

    def executor(name: str) -> None:
        lease = new_lease()
        runner = Runner(engine.store, lease, foreground=False, host=engine)
        deadline = time.time() + 10
        while (run := engine.store.claim_next_run(lease, engine.store.now())) is None:
            assert time.time() < deadline, "no branch to claim"
            time.sleep(0.01)  # another executor's claim was under way
        runner.drive_claimed(run)

    threads = [threading.Thread(target=executor, args=(n,), name=n) for n in ("w1", "w2")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    done = worker(engine).drive(run_id)
    assert done.status == RunStatus.COMPLETED, done.error
    assert sorted(done.output.values()) == ["w1", "w2"]  # one branch on each worker


def test_a_cancel_while_the_parent_starts_its_branches_cancels_them_too(engine: Engine) -> None:
    """`runs cancel` reads the run's tree (no branch yet), a worker drives the run up to its
    parallel step, whose commit starts the branches and parks it, then the cancel locks the
    parked run: its branches are cancelled with it (PostgreSQL left them running; on
    SQLite the worker waits for the cancel's transaction and finds the run cancelled)."""
    import threading

    from engine.pauses import pause_at

    machine = engine.workflow("checks")
    payload = {"url": "u1"}
    run_id = engine.store.create_run(
        engine.new_run(machine, payload, {"kind": "manual"}), engine.store.now()
    ).id
    drove: list[threading.Thread] = []

    def the_run_goes_on() -> None:
        if not drove:
            thread = threading.Thread(target=lambda: worker(engine).drive(run_id))
            drove.append(thread)
            thread.start()
            thread.join(2.0)  # SQLite: it waits for the cancel's transaction

    with pause_at("store.cancel.tree_read", the_run_goes_on):
        engine.store.request_cancel(run_id, engine.store.now())
    drove[0].join(10.0)
    assert engine.store.get_run(run_id).status == RunStatus.CANCELLED
    left = {name: k.status for name, k in branches(engine, run_id).items() if not k.finished}
    assert left == {}, f"branches left running after their run was cancelled: {left}"
