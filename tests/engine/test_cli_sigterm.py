"""SIGTERM on a foreground `run` ends it like Ctrl-C: exit 130, the run's state kept and its
lease released (not left `running`), and `resume` continues it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.service import Engine
from engine.settings import resolve_settings
from tests.conftest import ROOT


def test_sigterm_on_a_foreground_run(tmp_path: Path, db_url: str) -> None:
    wf = tmp_path / "slow.yaml"
    wf.write_text(
        'id: slow\nversion: "1"\ntrigger: {manual: true}\n'
        "steps:\n  - {id: a, log: hi}\n  - {id: b, wait: 30s}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DURABLE_YAML_DB": db_url, "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "run", str(wf)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the run sleeps through its timer
        if "waiting" in line:
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "durable-yaml resume" in err
    engine = Engine(resolve_settings(db=db_url, workflows=str(tmp_path)), import_steps=False)
    (run,) = engine.store.list_runs(None, "slow", 10)
    assert run.status.value != "running"
    engine.close()


def test_sigterm_on_runs_logs_follow(tmp_path: Path, db_url: str) -> None:
    """`runs logs --follow` stopped by SIGTERM ends like Ctrl-C (exit 130, no traceback) and
    closes its database on the way out (SQLite: no -wal left beside the file)."""
    wf = tmp_path / "slow.yaml"
    wf.write_text(
        'id: slow\nversion: "1"\ntrigger: {manual: true}\n'
        "steps:\n  - {id: a, log: hi}\n  - {id: b, wait_for_event: never.sent}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DURABLE_YAML_DB": db_url, "NO_COLOR": "1"}
    started = subprocess.run(
        [sys.executable, "-m", "engine", "run", str(wf)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 3, started.stderr  # waiting for its timer
    engine = Engine(resolve_settings(db=db_url, workflows=str(tmp_path)), import_steps=False)
    (run,) = engine.store.list_runs(None, "slow", 10)
    engine.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "runs", "logs", run.id, "--follow"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    assert "following run" in proc.stderr.readline()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "hi" in out
    if db_url.startswith("sqlite:///"):
        assert not Path(db_url.removeprefix("sqlite:///") + "-wal").exists()
