"""Crash tests: a real `durable-yaml run` process is SIGKILLed at every step boundary, in the
middle of a step, during a retry back-off and during a durable wait; a new process resumes it.
Completed steps never run again, the interrupted step runs again with the same idempotency
key, attempt counts are right and so is the output. On SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from engine.store import open_store
from tests.conftest import ROOT

FLOWS = Path(__file__).parent / "flows"


def _env(tmp_path: Path, db_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "CRASH_LOG": str(tmp_path / "calls.log"),
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "crashsteps",
        "PYTHONPATH": str(ROOT),
        "NO_COLOR": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def _start(tmp_path: Path, db_url: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine", "run", str(FLOWS / "crashy.yaml")],
        cwd=FLOWS,
        env=_env(tmp_path, db_url, **extra),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _resume(tmp_path: Path, db_url: str, run_id: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", "resume", run_id],
        cwd=FLOWS,
        env=_env(tmp_path, db_url),
        text=True,
        capture_output=True,
        timeout=120,
    )


def _calls(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "calls.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _only_run_id(db_url: str) -> str:
    store = open_store(db_url)
    try:
        runs = store.list_runs()
        assert len(runs) == 1
        return runs[0].id
    finally:
        store.close()


def _wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _check_finished(
    tmp_path: Path,
    db_url: str,
    run_id: str,
    resumed: subprocess.CompletedProcess[str],
    killed_step: str | None,
    killed_after_effect: bool,
) -> None:
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Traceback" not in resumed.stderr
    store = open_store(db_url)
    try:
        run = store.get_run(run_id)
        steps = {s.step_key: s for s in store.get_steps(run_id)}
        attempts = store.get_attempts(run_id)
    finally:
        store.close()
    assert run.status.value == "completed"
    calls = [c for c in _calls(tmp_path) if c["event"] == "effect"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for c in calls:
        by_name.setdefault(c["name"], []).append(c)
    for name in ("one", "two", "three"):
        expected = 2 if (name == killed_step and killed_after_effect) else 1
        assert len(by_name[name]) == expected, (name, by_name[name])
        assert {c["key"] for c in by_name[name]} == {f"{run_id}:{name}"}
        want_attempts = 2 if name == killed_step else 1
        assert steps[name].attempts == want_attempts
        assert run.output[name] == {"name": name, "attempt": want_attempts}
    assert [c["attempt"] for c in by_name["flaky"]] == [1, 2]
    assert run.output["flaky_attempts"] == 2
    crashed = [a for a in attempts if a.status == "crashed"]
    assert [(a.step_key, a.attempt) for a in crashed] == ([(killed_step, 1)] if killed_step else [])


@pytest.mark.parametrize(
    "kill_at", ["one:start", "one:end", "two:start", "two:end", "three:start", "three:end"]
)
def test_sigkill_at_step_boundaries(tmp_path: Path, db_url: str, kill_at: str) -> None:
    proc = _start(tmp_path, db_url, KILL_AT=kill_at)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run_id = _only_run_id(db_url)
    name, where = kill_at.split(":")
    resumed = _resume(tmp_path, db_url, run_id)
    _check_finished(tmp_path, db_url, run_id, resumed, name, killed_after_effect=where == "end")


def test_sigkill_in_the_middle_of_a_step(tmp_path: Path, db_url: str) -> None:
    proc = _start(tmp_path, db_url, HOLD_AT="two")
    _wait_for(lambda: any(c["event"] == "holding" for c in _calls(tmp_path)))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run_id = _only_run_id(db_url)
    resumed = _resume(tmp_path, db_url, run_id)
    _check_finished(tmp_path, db_url, run_id, resumed, "two", killed_after_effect=False)


def _kill_when(db_url: str, proc: subprocess.Popen[str], step: str, status: str) -> str:
    store = open_store(db_url)
    try:

        def reached() -> bool:
            runs = store.list_runs()
            if not runs:
                return False
            stored = {s.step_key: s for s in store.get_steps(runs[0].id)}
            return step in stored and stored[step].status.value == status

        _wait_for(reached)
    finally:
        store.close()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return _only_run_id(db_url)


def test_sigkill_during_a_durable_wait_sleeps_only_what_is_left(
    tmp_path: Path, db_url: str
) -> None:
    proc = _start(tmp_path, db_url)
    run_id = _kill_when(db_url, proc, "nap", "waiting")
    store = open_store(db_url)
    wake_at = {s.step_key: s for s in store.get_steps(run_id)}["nap"].wake_at
    store.close()
    assert wake_at is not None
    time.sleep(1.0)
    resumed = _resume(tmp_path, db_url, run_id)
    finished_waiting = time.time()
    _check_finished(tmp_path, db_url, run_id, resumed, None, killed_after_effect=False)
    assert "nap" in resumed.stdout
    # it woke at the stored time, not 2 s after the resume began
    assert finished_waiting >= wake_at


def test_sigkill_during_a_retry_backoff_keeps_the_count(tmp_path: Path, db_url: str) -> None:
    proc = _start(tmp_path, db_url)
    run_id = _kill_when(db_url, proc, "flaky", "retrying")
    resumed = _resume(tmp_path, db_url, run_id)
    _check_finished(tmp_path, db_url, run_id, resumed, None, killed_after_effect=False)
    store = open_store(db_url)
    failed = [a for a in store.get_attempts(run_id) if a.step_key == "flaky"]
    store.close()
    assert [(a.attempt, a.status, a.error_type) for a in failed] == [
        (1, "failed", "ConnectionError")
    ]


def test_a_live_run_cannot_be_executed_twice(tmp_path: Path, db_url: str) -> None:
    proc = _start(tmp_path, db_url, HOLD_AT="two")
    try:
        _wait_for(lambda: any(c["event"] == "holding" for c in _calls(tmp_path)))
        run_id = _only_run_id(db_url)
        second = _resume(tmp_path, db_url, run_id)
        assert second.returncode == 1
        assert f"run {run_id} is being executed by process {proc.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        proc.kill()
        proc.wait()
