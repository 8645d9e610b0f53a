"""Two real worker processes whose clocks are a minute apart (issue #10, cause 10): both
fire an every-minute schedule, and both execute a backlog of runs with short leases. Every
cron instant fires exactly once, no instant is skipped, and no live lease is taken over
(no attempt is recorded as crashed, no step runs twice) - because every time that matters
is the database's clock. Cron time runs 20x faster (DURABLE_YAML_TEST_CRON_SPEED), so an
every-minute schedule fires every 3 s."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from engine.models import RunStatus
from engine.service import Engine
from engine.settings import resolve_settings
from engine.store import schema as t
from tests.conftest import ROOT

CLUSTER = Path(__file__).parent / "cluster"
SPEED = 20.0


def project(tmp_path: Path, db_url: str, files: tuple[str, ...]) -> tuple[dict[str, str], Engine]:
    folder = tmp_path / "workflows"
    folder.mkdir()
    for name in files:
        shutil.copy(CLUSTER / name, folder)
    shutil.copy(CLUSTER / "clustersteps.py", tmp_path)
    env = {
        **os.environ,
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "clustersteps",
        "DURABLE_YAML_WORKFLOWS": str(folder),
        "PYTHONPATH": str(ROOT),
        "CLUSTER_LOG": str(tmp_path / "calls.log"),
        "PYTHONUNBUFFERED": "1",
    }
    engine = Engine(resolve_settings(db=db_url, workflows=str(folder)), import_steps=False)
    engine.save_all_definitions()
    return env, engine


def start_worker(
    tmp_path: Path, env: dict[str, str], name: str, lease: str = "2", **extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine",
            "worker",
            "--concurrency",
            "3",
            "--lease-seconds",
            lease,
            "--grace",
            "5",
        ],
        cwd=tmp_path,
        env={**env, **extra},
        text=True,
        stdout=open(tmp_path / f"{name}.out", "w"),
        stderr=subprocess.STDOUT,
    )


def calls(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "calls.log"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate: Any, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_two_workers_a_minute_apart_fire_every_instant_once_and_steal_no_lease(
    tmp_path: Path, db_url: str
) -> None:
    env, engine = project(tmp_path, db_url, ("minutely.yaml", "pipeline.yaml"))
    env["DURABLE_YAML_TEST_CRON_SPEED"] = f"{SPEED}:{time.time():.3f}"
    env["CLUSTER_STEP_SECONDS"] = "0.6"  # longer than a third of the 2 s lease
    for n in range(30):
        engine.send_event("cluster.go", {"n": n})
    fast = start_worker(tmp_path, env, "fast", DURABLE_YAML_TEST_CLOCK_SKEW="60")
    slow = start_worker(tmp_path, env, "slow")
    workers = [fast, slow]
    try:
        wait_for(lambda: len(engine.store.list_workers(engine.store.now())) == 2, 20)
        time.sleep(12)  # about 4 instants of cron time
        for n in range(30, 40):  # more work while both run
            engine.send_event("cluster.go", {"n": n})
        wait_for(
            lambda: all(
                r.status == RunStatus.COMPLETED
                for r in engine.store.list_runs(workflow_id="pipeline", limit=100)
            ),
            30,
        )
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(30) for w in workers]
    assert codes == [0, 0], (tmp_path / "fast.out").read_text()[-2000:]

    # every instant between the first and the last fire fired once, each with its own run
    with engine.store.engine.connect() as c:
        fires = sorted(
            float(x)
            for x in c.execute(
                sa.select(t.cron_fires.c.fire_at).where(t.cron_fires.c.workflow_id == "minutely")
            ).scalars()
        )
        cron_runs = [
            p["timestamp"]
            for p in c.execute(
                sa.select(t.runs.c.payload).where(t.runs.c.workflow_id == "minutely")
            ).scalars()
        ]
    assert len(fires) >= 3, fires
    assert fires == [fires[0] + 60 * i for i in range(len(fires))], "no instant skipped"
    stamps = Counter(cron_runs)
    assert len(stamps) == len(fires) and set(stamps.values()) == {1}, stamps
    assert sorted(datetime.fromisoformat(s).timestamp() for s in stamps) == fires

    # no live lease taken over: nothing crashed, no step ran twice, both workers worked
    pipeline = engine.store.list_runs(workflow_id="pipeline", limit=100)
    assert len(pipeline) == 40
    assert all(
        r.output == {"n": r.payload["n"], "result": r.payload["n"] * 2 + 2} for r in pipeline
    )
    crashed = [
        a for r in pipeline for a in engine.store.get_attempts(r.id) if a.status == "crashed"
    ]
    assert crashed == []
    executed = Counter((c["run"], c["step"]) for c in calls(tmp_path))
    assert max(executed.values()) == 1, [k for k, v in executed.items() if v > 1]
    assert {c["pid"] for c in calls(tmp_path)} == {fast.pid, slow.pid}
    engine.close()
