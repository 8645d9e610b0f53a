"""The AI pipeline example end to end: a real worker process runs it, waits hours-long for a
human review without holding an executor, and a simulated reviewer sends the review event."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.models import RunStatus
from engine.scheduler import CronScheduler
from engine.service import Engine
from engine.settings import resolve_settings
from tests.conftest import ROOT


def _wait(predicate: object, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_ai_pipeline_with_a_worker_and_a_reviewer(tmp_path: Path, db_url: str) -> None:
    shutil.copytree(ROOT / "workflows", tmp_path / "workflows")
    env = {
        **os.environ,
        "DURABLE_YAML_DB": db_url,
        "PYTHONPATH": str(ROOT),
        "DURABLE_YAML_MODULES": "workflows.steps",
        "DURABLE_YAML_WORKFLOWS": "workflows",
    }
    engine = Engine(
        resolve_settings(db=db_url, workflows=str(tmp_path / "workflows")), import_steps=False
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "engine", "worker", "--concurrency", "2", "--no-schedules"],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        sent = engine.send_event(
            "episode.uploaded", {"episode_id": "ep7", "audio_url": "https://x/ep7.mp3"}
        )
        (run_id,) = sent.run_ids
        _wait(lambda: engine.store.get_run(run_id).status == RunStatus.WAITING)
        waiting = engine.store.get_run(run_id)
        assert waiting.current_step == "review" and waiting.lease_owner is None
        done = {s.step_key for s in engine.store.get_steps(run_id) if s.status.value == "completed"}
        assert done == {"transcribe", "summarise", "make_image"}
        # the reviewer: a look at the run, then the review event
        assert engine.send_event(
            "review.completed", {"episode_id": "ep7", "approved": True}
        ).resumed == (run_id,)
        _wait(lambda: engine.store.get_run(run_id).finished)
        run = engine.store.get_run(run_id)
        assert run.status == RunStatus.COMPLETED, run.error
        assert run.output == {"published": True, "review": {"episode_id": "ep7", "approved": True}}
        publish = {s.step_key: s for s in engine.store.get_steps(run_id)}["publish"]
        assert publish.output == {
            "url": "https://blog.example.com/ep7",
            "title": "workflows are plain YAML",
        }
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
        engine.close()
    assert worker.returncode == 0, out
    assert out.startswith("worker ") and "5 workflows (2 scheduled)" in out.splitlines()[0]


def test_schedules_follow_added_and_removed_files(tmp_path: Path, sqlite_url: str) -> None:
    folder = tmp_path / "workflows"
    folder.mkdir()
    engine = Engine(resolve_settings(db=sqlite_url, workflows=str(folder)), import_steps=False)
    scheduler = CronScheduler(engine, lambda: None)
    assert engine.refresh_catalog() and scheduler.schedules() == []
    (folder / "a.yaml").write_text(
        'id: a\nversion: "1"\ntrigger: {cron: "*/5 * * * *"}\nsteps:\n  - {id: s, log: hi}\n'
    )
    assert engine.refresh_catalog()
    assert [m.workflow_id for m in scheduler.schedules()] == ["a"]
    (folder / "a.yaml").unlink()
    assert engine.refresh_catalog() and scheduler.schedules() == []
    assert not engine.refresh_catalog()
    engine.close()
