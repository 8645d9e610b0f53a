"""Human in the loop and composition, on SQLite and PostgreSQL: events that match and don't,
tokens, send_event exactly once, child runs (pinned, failing, cancelled with the parent),
for_each in order and durable per item, timeouts into on_failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import DatabaseError, NotFound, TokenError
from engine.models import RunStatus
from engine.registry import import_modules
from engine.runner import Runner
from engine.service import Engine
from engine.settings import resolve_settings
from tests.conftest import ROOT, cli

HITL = Path(__file__).parent / "hitl"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["hitlsteps"], str(HITL))
    e = Engine(resolve_settings(db=db_url, workflows=str(HITL)), import_steps=False)
    assert e.catalog.problems == []
    yield e
    e.close()


def background(engine: Engine) -> Runner:
    return Runner(engine.store, foreground=False, host=engine)


def start(engine: Engine, workflow: str, payload: object, foreground: bool = True) -> str:
    machine = engine.workflow(workflow)
    new = engine.new_run(machine, payload, {"kind": "manual"})
    runner = engine.runner() if foreground else background(engine)
    return runner.start(machine, payload, new=new).id


def test_event_that_matches_resumes_and_one_that_does_not_is_ignored(engine: Engine) -> None:
    run_id = start(engine, "approval", {"doc": "d1"})
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.WAITING and run.lease_owner is None
    assert engine.send_event("review.done", {"doc": "other", "approved": True}).resumed == ()
    assert engine.send_event("review.done", {"doc": "d1", "approved": True}).resumed == (run_id,)
    done = engine.resume(run_id)
    assert done.status == RunStatus.COMPLETED
    assert done.output == {"doc": "d1", "approved": True}


def test_an_event_sent_before_the_wait_began_does_not_count(engine: Engine) -> None:
    engine.send_event("review.done", {"doc": "early", "approved": True})
    run_id = start(engine, "approval", {"doc": "early"})
    assert engine.store.get_run(run_id).status == RunStatus.WAITING


def test_event_wait_timeout_fails_into_on_failure(engine: Engine) -> None:
    run_id = start(engine, "approval", {"doc": "nobody"})
    time.sleep(1.6)
    run = engine.resume(run_id)
    assert run.status == RunStatus.FAILED
    assert (
        run.error == "step review failed: TimeoutError: steps.review timed out after 1.5s waiting"
    )
    steps = {s.step_key: s for s in engine.store.get_steps(run_id)}
    assert steps["escalate"].output == f"no review: {run.error}"
    assert steps["review"].status.value == "failed"


def test_token_completes_once(engine: Engine) -> None:
    run_id = start(engine, "token", {})
    (step,) = engine.store.get_steps(run_id)
    token = step.wait["token"]
    assert engine.complete_token(token, {"by": "ana"}) == run_id
    with pytest.raises(TokenError, match="already completed"):
        engine.complete_token(token, {"by": "bob"})
    with pytest.raises(NotFound, match="no run is waiting for token nope"):
        engine.complete_token("nope", {})
    run = engine.resume(run_id)
    assert run.status == RunStatus.COMPLETED and run.output == {"by": "ana"}


def test_send_event_is_emitted_once_per_run_step(engine: Engine) -> None:
    run_id = start(engine, "emit", {"doc": "d9"})
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.COMPLETED
    (listener,) = run.output["runs"]
    assert engine.store.get_run(listener).workflow_id == "listener"
    # the event was stored with the step's result; the database refuses a second one
    emission = engine.prepare_event("doc.published", {"doc": "d9"}, (run_id, "announce"))
    with pytest.raises(DatabaseError):
        engine.store.send(emission.runs, engine.store.now(), event=emission.event)
    assert len(engine.store.list_runs(workflow_id="listener")) == 1


def test_child_run_inline_in_the_foreground(engine: Engine) -> None:
    run_id = start(engine, "parent", {"x": 5})
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.COMPLETED and run.output == 20
    (child,) = engine.store.list_runs(parent_run_id=run_id)
    assert child.workflow_id == "child" and child.output == 10
    from engine.views import run_detail

    assert run_detail(engine.store, run)["children"] == [child.id]
    assert run_detail(engine.store, child)["parent_run_id"] == run_id
    assert child.definition_hash == engine.workflow("child").content_hash


def test_parent_waits_without_holding_a_worker_and_child_failure_fails_it(engine: Engine) -> None:
    run_id = start(engine, "parent", {"x": -1}, foreground=False)
    parent = engine.store.get_run(run_id)
    assert parent.status == RunStatus.WAITING and parent.lease_owner is None
    (child,) = engine.store.list_runs(parent_run_id=run_id)
    assert background(engine).drive(child.id).status == RunStatus.WAITING  # its 10ms wait
    time.sleep(0.05)
    assert background(engine).drive(child.id).status == RunStatus.FAILED
    assert engine.store.get_run(run_id).next_at is not None
    parent = background(engine).drive(run_id)
    assert parent.status == RunStatus.FAILED
    assert parent.error == (
        f"step kid failed: ChildFailed: child run {child.id} failed: step compute "
        "failed: NonRetryableError: negative input -1"
    )


def test_cancelling_the_parent_cancels_the_child(engine: Engine) -> None:
    run_id = start(engine, "sleepy", {}, foreground=False)
    (child,) = engine.store.list_runs(parent_run_id=run_id)
    background(engine).drive(child.id)
    assert engine.store.get_run(child.id).status == RunStatus.WAITING
    engine.store.request_cancel(run_id, time.time())
    assert engine.store.get_run(run_id).status == RunStatus.CANCELLED
    assert engine.store.get_run(child.id).status == RunStatus.CANCELLED


def test_for_each_keeps_order(engine: Engine) -> None:
    run_id = start(engine, "fanout", {"items": [3, 1, 2, 5, 4]})
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.COMPLETED and run.output == [9, 1, 4, 25, 16]
    keys = {s.step_key for s in engine.store.get_steps(run_id)}
    assert {f"squares[{i}]" for i in range(5)} <= keys


def test_for_each_over_something_that_is_not_a_list(engine: Engine) -> None:
    run_id = start(engine, "fanout", {"items": {"a": 1}})
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.FAILED
    assert (
        run.error
        == 'step squares failed: TypeError: steps.squares.for_each must give a list, not dict: {"a": 1}'
    )


def _proc_env(tmp_path: Path, db_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "hitlsteps",
        "DURABLE_YAML_WORKFLOWS": str(HITL),
        "PYTHONPATH": f"{ROOT}:{HITL}",
        "HITL_LOG": str(tmp_path / "items.log"),
        **extra,
    }


def test_sigkill_in_the_middle_of_a_for_each(tmp_path: Path, db_url: str, engine: Engine) -> None:
    env = _proc_env(tmp_path, db_url, HITL_KILL_AT="7")
    items = json.dumps({"items": [1, 2, 3, 4, 5, 6, 7, 8]})
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "run", "fanout", "--payload", items],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL
    (run,) = engine.store.list_runs()
    before = {s.step_key for s in engine.store.get_steps(run.id)}
    resumed = subprocess.run(
        [sys.executable, "-m", "engine", "resume", run.id],
        cwd=tmp_path,
        env={**env, "HITL_KILL_AT": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert engine.store.get_run(run.id).output == [1, 4, 9, 16, 25, 36, 49, 64]
    calls = [json.loads(x) for x in (tmp_path / "items.log").read_text().splitlines()]
    for key in before:  # items finished before the kill never ran again
        n = int(key[len("squares[") : -1]) + 1
        assert sum(1 for c in calls if c["n"] == n) == 1
    assert sum(1 for c in calls if c["n"] == 7) == 2, "the interrupted item ran again"
    assert len(before) >= 1


def test_sigkill_in_the_middle_of_a_child_run(tmp_path: Path, db_url: str, engine: Engine) -> None:
    env = _proc_env(tmp_path, db_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "run", "sleepy"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        kids = [r for r in engine.store.list_runs() if r.workflow_id == "sleeper"]
        if kids and any(s.step_key == "nap" for s in engine.store.get_steps(kids[0].id)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (parent,) = engine.store.list_runs(workflow_id="sleepy")
    (child,) = engine.store.list_runs(parent_run_id=parent.id)
    assert parent.status == RunStatus.WAITING
    engine.store.request_cancel(parent.id, time.time())
    assert engine.store.get_run(child.id).status == RunStatus.CANCELLED


def test_cli_exit_3_and_how_to_continue(tmp_path: Path, db_url: str) -> None:
    env = _proc_env(tmp_path, db_url)
    waited = cli("run", "token", cwd=tmp_path, env=env)
    assert waited.returncode == 3, waited.stdout + waited.stderr
    assert "waiting for token" in waited.stdout and "durable-yaml complete" in waited.stdout
    token = waited.stdout.split("durable-yaml complete ", 1)[1].split()[0]
    bad = cli("complete", token, "--data", "{oops", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "--data: is not valid JSON" in bad.stderr
    ok = cli("complete", token, "--data", '{"by": "cli"}', cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    twice = cli("complete", token, "--data", "{}", cwd=tmp_path, env=env)
    assert twice.returncode == 1 and "was already completed" in twice.stderr
    assert "Traceback" not in twice.stderr
    run_id = waited.stdout.split("run ", 1)[1].split()[0]
    done = cli("resume", run_id, cwd=tmp_path, env=env)
    assert done.returncode == 0 and '"by": "cli"' in done.stdout
    event = cli("run", "approval", "--payload", '{"doc": "x"}', cwd=tmp_path, env=env)
    assert event.returncode == 3
    # the match value, and a placeholder for the field `decide` reads from the answer
    assert (
        'durable-yaml send review.done --payload \'{"approved": "...", "doc": "x"}\''
        in event.stdout
    )
    not_json = cli("send", "review.done", "--payload", "nope", cwd=tmp_path, env=env)
    assert not_json.returncode == 2 and "--payload: is not valid JSON" in not_json.stderr


def test_a_token_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """One token in 64 drawn from token_urlsafe began with `-`, and `durable-yaml complete
    -aK...` then said "No such option '-a'" (seen in CI's hitl test): such draws are skipped."""
    from engine import answers

    draws = iter(["-aKaMcwuj92f78cDKgqqCH7w", "-x", "bKaMcwuj92f78cDKgqqCH7w"])
    monkeypatch.setattr(answers.secrets, "token_urlsafe", lambda n: next(draws))
    assert answers.new_token() == "bKaMcwuj92f78cDKgqqCH7w"
