"""The wake-up stress test: real worker processes on one database (SQLite file and
PostgreSQL), many waits answered at the worst moments. Afterwards no run is left waiting
whose answer exists, and no acknowledged answer is lost:

- request/response: A sends `question.asked` and waits for `question.answered` matching its
  id; B, triggered by the question, answers at once (often before A has parked);
- parent/child: a parent waits for a one-step child (often finished before the parent parks);
- token completions racing their 2 s timeouts: an acknowledged completion is the output,
  a refused one means the timeout won and the run failed with TimeoutError;
- events racing cancels: each run ends cancelled or completed with that event.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.errors import TokenError
from engine.models import RunStatus
from engine.service import Engine
from engine.settings import resolve_settings
from tests.conftest import ROOT

WAKE = Path(__file__).parent / "wakeups"
PAIRS = int(os.environ.get("DY_STRESS_PAIRS", "300"))
CHILDREN = 120
TOKENS = 60
CANCELS = 60


def _project(tmp_path: Path, db_url: str) -> tuple[dict[str, str], Engine]:
    (tmp_path / "workflows").mkdir()
    for f in WAKE.glob("*.yaml"):
        shutil.copy(f, tmp_path / "workflows")
    shutil.copy(WAKE / "wakesteps.py", tmp_path)
    env = {
        **os.environ,
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "wakesteps",
        "DURABLE_YAML_WORKFLOWS": str(tmp_path / "workflows"),
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    engine = Engine(
        resolve_settings(db=db_url, workflows=str(tmp_path / "workflows")), import_steps=False
    )
    return env, engine


def _token(engine: Engine, run_id: str, deadline: float) -> str | None:
    while time.time() < deadline:
        for step in engine.store.get_steps(run_id):
            if step.step_key == "approve" and step.wait:
                return str(step.wait["token"])
        time.sleep(0.02)
    return None


def _wait_all_finished(engine: Engine, ids: list[str], deadline: float) -> dict[str, object]:
    pending = set(ids)
    runs: dict[str, object] = {}
    while pending and time.time() < deadline:
        for rid in list(pending):
            run = engine.store.get_run(rid)
            if run.finished:
                runs[rid] = run
                pending.discard(rid)
        if pending:
            time.sleep(0.2)
    assert not pending, f"{len(pending)} runs never finished, e.g. {sorted(pending)[:3]}"
    return runs


def test_no_wake_up_is_lost_under_load(db_url: str, tmp_path: Path) -> None:
    env, engine = _project(tmp_path, db_url)
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine",
                "worker",
                "--concurrency",
                "8",
                "--lease-seconds",
                "10",
            ],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=open(tmp_path / f"worker{i}.out", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        askers = [engine.trigger("asker", {}).run_ids[0] for _ in range(PAIRS)]
        parents = [engine.trigger("parent", {"n": i}).run_ids[0] for i in range(CHILDREN)]
        tokens = [engine.trigger("token", {}).run_ids[0] for _ in range(TOKENS)]
        waiters = [engine.trigger("waiter", {"k": f"c{i}"}).run_ids[0] for i in range(CANCELS)]

        # tokens: complete each one right at its 2 s deadline, racing the timeout
        acked: dict[str, dict[str, int]] = {}
        refused: set[str] = set()
        lock = threading.Lock()

        def race_token(i: int, run_id: str) -> None:
            token = _token(engine, run_id, time.time() + 60)
            assert token is not None, f"run {run_id} never showed its token"
            step = next(s for s in engine.store.get_steps(run_id) if s.step_key == "approve")
            assert step.wake_at is not None
            time.sleep(max(0.0, step.wake_at - engine.store.now() + (i % 7 - 3) * 0.01))
            try:
                engine.complete_token(token, {"i": i})
            except TokenError:
                with lock:
                    refused.add(run_id)
            else:
                with lock:
                    acked[run_id] = {"i": i}

        # events racing cancels, once each waiter has begun
        resumed: set[str] = set()

        def race_cancel(i: int, run_id: str) -> None:
            while engine.store.get_run(run_id).status == RunStatus.QUEUED:
                time.sleep(0.02)
            sender = threading.Thread(
                target=lambda: resumed.update(engine.send_event("ping", {"k": f"c{i}"}).resumed)
            )
            sender.start()
            engine.store.request_cancel(run_id, engine.store.now())
            sender.join()

        threads = [threading.Thread(target=race_token, args=(i, r)) for i, r in enumerate(tokens)]
        threads += [
            threading.Thread(target=race_cancel, args=(i, r)) for i, r in enumerate(waiters)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

        deadline = time.time() + 240
        runs = _wait_all_finished(engine, askers + parents + tokens + waiters, deadline)
        for rid in askers:
            run = runs[rid]
            assert run.status == RunStatus.COMPLETED, run  # type: ignore[attr-defined]
            assert run.output == {"rid": rid, "answer": 42}  # type: ignore[attr-defined]
        for i, rid in enumerate(parents):
            run = runs[rid]
            assert run.status == RunStatus.COMPLETED and run.output == f"kid {i}", run  # type: ignore[attr-defined]
        assert len(acked) + len(refused) == TOKENS
        for rid in tokens:
            run = runs[rid]
            if rid in acked:  # an acknowledged completion is never discarded by the timeout
                assert run.status == RunStatus.COMPLETED and run.output == acked[rid], run  # type: ignore[attr-defined]
            else:
                assert run.status == RunStatus.FAILED and "TimeoutError" in (run.error or ""), run  # type: ignore[attr-defined]
        for i, rid in enumerate(waiters):
            run = runs[rid]
            assert run.status in (RunStatus.CANCELLED, RunStatus.COMPLETED), run  # type: ignore[attr-defined]
            if run.status == RunStatus.COMPLETED:  # type: ignore[attr-defined]
                assert run.output == {"k": f"c{i}"}  # type: ignore[attr-defined]
        # nothing is left parked with an answer, nothing holds a lease
        for run in runs.values():
            assert run.lease_owner is None and run.next_at is None, run  # type: ignore[attr-defined]
        for w in workers:
            assert w.poll() is None, (tmp_path / "worker0.out").read_text()[-3000:]
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        engine.close()
