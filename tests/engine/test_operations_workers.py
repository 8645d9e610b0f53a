"""Operations beside real worker processes, on both backends: a bulk cancel of 10,000
queued runs while workers claim leaves none running and cancels none twice; a paused queue
starts nothing for 5 s, then resumes and its runs complete."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from engine.models import NewRun, RunFilter, RunStatus
from engine.runner import new_run_id
from engine.service import Engine
from engine.settings import resolve_settings
from engine.store import schema as t
from tests.conftest import ROOT

OPS = Path(__file__).parent / "ops"


def _project(tmp_path: Path, db_url: str) -> tuple[dict[str, str], Engine]:
    shutil.copytree(OPS, tmp_path / "workflows")
    env = {
        **os.environ,
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "opssteps",
        "DURABLE_YAML_WORKFLOWS": str(tmp_path / "workflows"),
        "PYTHONPATH": f"{ROOT}:{tmp_path / 'workflows'}",
        "PYTHONUNBUFFERED": "1",
    }
    engine = Engine(
        resolve_settings(db=db_url, workflows=str(tmp_path / "workflows")), import_steps=False
    )
    engine.save_all_definitions()
    return env, engine


def _workers(tmp_path: Path, env: dict[str, str], n: int) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-m", "engine", "worker", "--concurrency", "4"],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=open(tmp_path / f"worker{i}.out", "w"),
            stderr=subprocess.STDOUT,
        )
        for i in range(n)
    ]


def _stop(workers: list[subprocess.Popen[str]]) -> None:
    for w in workers:
        w.send_signal(signal.SIGTERM)
    for w in workers:
        assert w.wait(30) == 0


def _statuses(engine: Engine) -> dict[str, int]:
    with engine.store.engine.connect() as c:
        rows = c.execute(
            sa.select(t.runs.c.status, sa.func.count()).group_by(t.runs.c.status)
        ).all()
    return {r[0]: r[1] for r in rows}


def _until(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def _queue(engine: Engine, workflow: str, n: int, tags: tuple[str, ...] = ()) -> None:
    machine = engine.workflow(workflow)
    for start in range(0, n, 1000):
        runs = [
            NewRun(
                id=new_run_id(),
                workflow_id=machine.workflow_id,
                version=machine.version,
                definition_hash=machine.content_hash,
                payload={"n": i},
                first_step=machine.start,
                queue=machine.queue.name,
                tags=tags,
            )
            for i in range(start, min(n, start + 1000))
        ]
        engine.store.send(runs, engine.store.now())
    if engine.store.dialect == "postgresql":
        # what autovacuum does after a bulk load: without statistics the planner takes the
        # freshly filled tables for tiny ones and joins them by sequential scans
        with engine.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(sa.text("ANALYZE dy_runs, dy_run_tags"))


def test_bulk_cancel_of_10000_queued_runs_while_workers_claim(tmp_path: Path, db_url: str) -> None:
    env, engine = _project(tmp_path, db_url)
    _queue(engine, "quick", 10_000, ("bulk:yes",))
    workers = _workers(tmp_path, env, 2)
    try:
        assert _until(lambda: _statuses(engine).get("completed", 0) >= 20, 60), (
            tmp_path / "worker0.out"
        ).read_text()[-2000:]
        # two bulk cancels at once, while the workers go on claiming
        counts: list[int] = []
        f = RunFilter(tags=("bulk:yes",))
        threads = [
            threading.Thread(target=lambda: counts.append(engine.cancel_runs(f))) for _ in range(2)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert _until(lambda: not set(_statuses(engine)) & {"queued", "running", "waiting"}, 60), (
            _statuses(engine)
        )
    finally:
        _stop(workers)
    statuses = _statuses(engine)
    assert set(statuses) <= {"completed", "cancelled"} and sum(statuses.values()) == 10_000
    with engine.store.engine.connect() as c:
        flagged = c.execute(
            sa.select(sa.func.count()).where(t.runs.c.cancel_requested.is_(True))
        ).scalar_one()
    # each run was cancelled (or, executing, flagged) by exactly one of the two calls
    assert sum(counts) == flagged
    assert statuses["cancelled"] <= flagged
    assert statuses["cancelled"] > 5_000, statuses  # most were still queued
    # a cancelled run ran no step after its cancel
    with engine.store.engine.connect() as c:
        late = c.execute(
            sa.select(sa.func.count())
            .select_from(t.steps.join(t.runs, t.runs.c.id == t.steps.c.run_id))
            .where(
                t.runs.c.status == RunStatus.CANCELLED.value,
                t.steps.c.status == "completed",
                t.steps.c.finished_at > t.runs.c.finished_at,
            )
        ).scalar_one()
    assert late == 0
    engine.close()


def test_a_paused_queue_starts_nothing_for_5_s_then_resumes(tmp_path: Path, db_url: str) -> None:
    env, engine = _project(tmp_path, db_url)
    engine.pause_queue("fast")
    sent = [engine.send_event("quick.go", {"n": i}).run_ids[0] for i in range(3)]
    other = engine.send_event("job.created", {"n": 1}).run_ids[0]  # another queue runs on
    workers = _workers(tmp_path, env, 1)
    try:
        assert _until(lambda: engine.store.get_run(other).status == RunStatus.COMPLETED, 30)
        time.sleep(5.0)  # what is being shown: nothing of the paused queue starts
        runs = [engine.store.get_run(r) for r in sent]
        assert all(r.status == RunStatus.QUEUED and r.started_at is None for r in runs)
        assert {(engine.blocked_by(r) or {}).get("reason") for r in runs} == {"queue_paused"}
        engine.resume_queue("fast")
        assert _until(
            lambda: all(engine.store.get_run(r).status == RunStatus.COMPLETED for r in sent), 30
        )
    finally:
        _stop(workers)
    engine.close()
