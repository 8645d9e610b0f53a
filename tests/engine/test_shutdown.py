"""SIGTERM on a worker: an in-flight step finishes within the grace period and the run is
handed back at the step boundary; a step that outlives the grace is released, recorded as
interrupted, and run again by the next worker."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from engine.models import RunStatus
from tests.engine.test_workers import _project, _statuses


def _started(tmp_path: Path) -> bool:
    log = tmp_path / "load.log"
    return log.exists() and bool(log.read_text().strip())


def _wait(predicate: object, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _worker(tmp_path: Path, env: dict[str, str], grace: str) -> object:
    import subprocess
    import sys

    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine",
            "worker",
            "--concurrency",
            "1",
            "--grace",
            grace,
            "--no-schedules",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_sigterm_lets_the_step_finish_within_the_grace(tmp_path: Path, db_url: str) -> None:
    env, engine = _project(tmp_path, db_url)
    env["LOAD_STEP_SECONDS"] = "1.5"
    (run_id,) = engine.send_event("load.graceful", {"tag": "a"}).run_ids
    worker = _worker(tmp_path, env, grace="10")
    _wait(lambda: _started(tmp_path))
    worker.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    assert worker.wait(30) == 0  # type: ignore[attr-defined]
    steps = {s.step_key: s for s in engine.store.get_steps(run_id)}
    assert steps["long"].status.value == "completed" and steps["long"].attempts == 1
    run = engine.store.get_run(run_id)
    assert (
        run.status == RunStatus.QUEUED and run.lease_owner is None and run.current_step == "after"
    )
    assert not run.step_running
    second = _worker(tmp_path, {**env, "LOAD_STEP_SECONDS": "0"}, grace="5")
    _wait(lambda: engine.store.get_run(run_id).status == RunStatus.COMPLETED)
    second.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    second.wait(30)  # type: ignore[attr-defined]
    ends = [json.loads(x) for x in (tmp_path / "load.log").read_text().splitlines() if '"end"' in x]
    assert len(ends) == 1, "the finished step did not run again"
    engine.close()


def test_a_step_outliving_the_grace_is_released_and_runs_again(tmp_path: Path, db_url: str) -> None:
    env, engine = _project(tmp_path, db_url)
    env["LOAD_STEP_SECONDS"] = "30"
    (run_id,) = engine.send_event("load.graceful", {"tag": "b"}).run_ids
    worker = _worker(tmp_path, env, grace="1")
    _wait(lambda: _started(tmp_path))
    worker.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    assert worker.wait(30) == 0  # type: ignore[attr-defined]
    run = engine.store.get_run(run_id)
    assert run.lease_owner is None and run.step_running, "released mid-step"
    second = _worker(tmp_path, {**env, "LOAD_STEP_SECONDS": "0"}, grace="5")
    _wait(lambda: engine.store.get_run(run_id).status == RunStatus.COMPLETED)
    second.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    second.wait(30)  # type: ignore[attr-defined]
    attempts = engine.store.get_attempts(run_id)
    assert [(a.step_key, a.attempt, a.status) for a in attempts] == [("long", 1, "crashed")]
    assert {s.step_key: s.attempts for s in engine.store.get_steps(run_id)}["long"] == 2
    assert _statuses(engine) == {"completed": 1}
    engine.close()
