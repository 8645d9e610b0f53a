"""SIGKILL inside a switch case, a catch handler, a repeat round and a repeat's delay: a
new process resumes exactly there; no completed step runs again, the interrupted one runs
again with the same idempotency key (a round's own: `tick@2`). SQLite and PostgreSQL."""

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

FLOWS = Path(__file__).parent / "blockflows"
CRASH_FLOWS = Path(__file__).parent / "flows"  # crashsteps.py


def _env(tmp_path: Path, db_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "CRASH_LOG": str(tmp_path / "calls.log"),
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "blocksteps",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(CRASH_FLOWS), str(FLOWS)]),
        "NO_COLOR": "1",
        **extra,
    }


def _command(tmp_path: Path, db_url: str, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine", *args],
        cwd=FLOWS,
        env=_env(tmp_path, db_url, **extra),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
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


def _resume_and_check(tmp_path: Path, db_url: str, run_id: str, twice: str | None) -> Any:
    resumed = _command(tmp_path, db_url, "resume", run_id)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out + err
    assert "Traceback" not in err
    store = open_store(db_url)
    try:
        run = store.get_run(run_id)
        steps = {s.step_key: s for s in store.get_steps(run_id)}
    finally:
        store.close()
    assert run.status.value == "completed", run.error
    by_name: dict[str, list[str]] = {}
    for c in _calls(tmp_path):
        by_name.setdefault(c["name"], []).append(c["key"])
    for name in ("one", "two", "three", "four"):
        # the step killed after its effect runs again, with the same key; no other repeats
        assert by_name[name] == [f"{run_id}:{name}"] * (2 if name == twice else 1), name
        assert steps[name].status.value == "completed"
    assert "never" not in by_name and steps["never"].status.value == "skipped"
    assert by_name["flaky"] == [f"{run_id}:charge"]  # failed for good once, caught once
    assert run.output["charge"] == "failed"
    assert steps["route"].status.value == steps["poll"].status.value == "completed"
    return run, by_name["tick"]


@pytest.mark.parametrize("kill_at", ["two:end", "three:end"])
def test_sigkill_inside_a_switch_case_or_a_catch_handler(
    tmp_path: Path, db_url: str, kill_at: str
) -> None:
    proc = _command(tmp_path, db_url, "run", str(FLOWS / "blocky.yaml"), KILL_AT=kill_at)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run_id = _only_run_id(db_url)
    name, where = kill_at.split(":")
    run, ticks = _resume_and_check(tmp_path, db_url, run_id, name if where == "end" else None)
    assert ticks == [f"{run_id}:tick", f"{run_id}:tick@2", f"{run_id}:tick@3"]
    assert [r["tick"]["n"] for r in run.output["rounds"]] == [1, 2, 3]


def test_sigkill_inside_a_repeat_round_resumes_that_round(tmp_path: Path, db_url: str) -> None:
    proc = _command(tmp_path, db_url, "run", str(FLOWS / "blocky.yaml"), KILL_AT="tick2:end")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run_id = _only_run_id(db_url)
    run, ticks = _resume_and_check(tmp_path, db_url, run_id, None)
    # round 2 was interrupted after its effect: it runs again as round 2 (same key), and
    # its third call answers done, so there are two rounds, not a retry and not round 3
    assert ticks == [f"{run_id}:tick", f"{run_id}:tick@2", f"{run_id}:tick@2"]
    assert [r["tick"]["n"] for r in run.output["rounds"]] == [1, 3]


def test_sigkill_during_the_delay_between_rounds(tmp_path: Path, db_url: str) -> None:
    proc = _command(tmp_path, db_url, "run", str(FLOWS / "blocky.yaml"))
    store = open_store(db_url)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            runs = store.list_runs()
            steps = {s.step_key: s for s in store.get_steps(runs[0].id)} if runs else {}
            if "poll" in steps and steps["poll"].status.value == "waiting":
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the repeat never waited")
        wake_at = steps["poll"].wake_at
    finally:
        store.close()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    run_id = _only_run_id(db_url)
    assert wake_at is not None
    run, ticks = _resume_and_check(tmp_path, db_url, run_id, None)
    assert ticks == [f"{run_id}:tick", f"{run_id}:tick@2", f"{run_id}:tick@3"]
    assert [r["tick"]["n"] for r in run.output["rounds"]] == [1, 2, 3]
    assert time.time() >= wake_at
