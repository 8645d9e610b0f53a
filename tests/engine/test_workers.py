"""Real worker processes sharing one database (PostgreSQL, and one SQLite file): every run
completes, queue and per-key concurrency limits and rate limits hold over all workers
together, and the runs of a SIGKILLed worker are finished by the others."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine.models import RunStatus
from engine.service import Engine
from engine.settings import resolve_settings
from engine.store import schema as t
from tests.conftest import ROOT

LOAD = Path(__file__).parent / "load"


def _project(tmp_path: Path, db_url: str) -> tuple[dict[str, str], Engine]:
    (tmp_path / "workflows").mkdir()
    for f in LOAD.glob("*.yaml"):
        shutil.copy(f, tmp_path / "workflows")
    shutil.copy(LOAD / "loadsteps.py", tmp_path)
    env = {
        **os.environ,
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "loadsteps",
        "DURABLE_YAML_WORKFLOWS": str(tmp_path / "workflows"),
        "PYTHONPATH": str(ROOT),
        "LOAD_LOG": str(tmp_path / "load.log"),
        "PYTHONUNBUFFERED": "1",
    }
    engine = Engine(
        resolve_settings(db=db_url, workflows=str(tmp_path / "workflows")), import_steps=False
    )
    return env, engine


def _workers(tmp_path: Path, env: dict[str, str], n: int) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine",
                "worker",
                "--concurrency",
                "4",
                "--lease-seconds",
                "4",
                "--grace",
                "5",
            ],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=open(tmp_path / f"worker{i}.out", "w"),
            stderr=subprocess.STDOUT,
        )
        for i in range(n)
    ]


def _statuses(engine: Engine) -> dict[str, int]:
    import sqlalchemy as sa

    with engine.store.engine.connect() as c:
        rows = c.execute(
            sa.select(t.runs.c.status, sa.func.count()).group_by(t.runs.c.status)
        ).all()
    return {r[0]: r[1] for r in rows}


def _peak(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def test_four_workers_500_runs_limits_and_a_sigkill(tmp_path: Path, db_url: str) -> None:
    env, engine = _project(tmp_path, db_url)
    for i in range(200):
        engine.send_event("load.limited", {"n": i})
    for i in range(200):
        engine.send_event("load.keyed", {"n": i, "user": f"u{i % 4}"})
    for i in range(100):
        engine.send_event("load.rated", {"n": i})
    assert _statuses(engine) == {"queued": 500}
    workers = _workers(tmp_path, env, 4)
    try:
        deadline = time.time() + 120
        while _statuses(engine).get("completed", 0) < 150 and time.time() < deadline:
            time.sleep(0.1)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        killed_at = time.time()
        while _statuses(engine).get("completed", 0) < 500 and time.time() < deadline:
            time.sleep(0.2)
        assert _statuses(engine) == {"completed": 500}, (tmp_path / "worker1.out").read_text()[
            -3000:
        ]
    finally:
        for w in workers[1:]:
            w.send_signal(signal.SIGTERM)
        for w in workers[1:]:
            assert w.wait(30) == 0
    lines = [json.loads(x) for x in (tmp_path / "load.log").read_text().splitlines()]
    ended = [x for x in lines if "end" in x]
    by_run: dict[str, list[dict[str, Any]]] = {}
    for x in ended:
        by_run.setdefault(x["run"], []).append(x)
    assert len(by_run) == 500, "every run's step finished"
    crashed = {
        a.run_id
        for r in engine.store.list_runs(limit=1000)
        for a in engine.store.get_attempts(r.id)
        if a.status == "crashed"
    }
    assert all(len(v) == 1 for run, v in by_run.items() if run not in crashed)
    killed_pid = workers[0].pid
    assert any(x["pid"] == killed_pid for x in ended), "the killed worker was doing work"
    assert any(x["end"] > killed_at for x in ended), "the others went on after the kill"
    assert _peak([(x["start"], x["end"]) for x in ended if x["queue"] == "limited"]) <= 3
    keyed = [x for x in ended if x["queue"] == "keyed"]
    for user in ("u0", "u1", "u2", "u3"):
        assert _peak([(x["start"], x["end"]) for x in keyed if x["key"] == user]) <= 2
    assert _peak([(x["start"], x["end"]) for x in keyed]) > 2, "keys run side by side"
    import sqlalchemy as sa

    with engine.store.engine.connect() as c:
        starts = sorted(
            c.execute(sa.select(t.runs.c.started_at).where(t.runs.c.queue == "rated")).scalars()
        )
    assert all(sum(1 for s in starts if b - 1.0 < s <= b) <= 20 for b in starts), "rate limit"
    assert starts[-1] - starts[0] >= 4.0, "100 starts at 20/s take at least 4 s"
    assert all(r.status == RunStatus.COMPLETED for r in engine.store.list_runs(limit=1000))
    engine.close()


def test_a_claim_survives_the_sigkill_of_its_worker(tmp_path: Path, db_url: str) -> None:
    """A worker claims a run (on SQLite a commit that does not wait for the disk), then is
    SIGKILLed before executing it: the claim is in the database for every other process
    (the run is running, leased to the dead worker), and once the lease expires another
    worker finishes the run."""
    env, engine = _project(tmp_path, db_url)
    run_id = engine.send_event("load.graceful", {"tag": "t"}).run_ids[0]
    paused = {**env, "DURABLE_YAML_PAUSE": "worker.drive=60"}  # claimed, not yet driven
    (first,) = _workers(tmp_path, paused, 1)
    try:
        deadline = time.time() + 60
        while engine.store.get_run(run_id).lease_owner is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    engine.close()
    engine = Engine(  # another process's view: a fresh store, nothing cached
        resolve_settings(db=db_url, workflows=str(tmp_path / "workflows")), import_steps=False
    )
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.RUNNING and run.lease_owner is not None, run
    assert run.started_at is not None
    (second,) = _workers(tmp_path, env, 1)
    try:
        deadline = time.time() + 60
        while not engine.store.get_run(run_id).finished and time.time() < deadline:
            time.sleep(0.1)
        assert engine.store.get_run(run_id).status == RunStatus.COMPLETED
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
        engine.close()
