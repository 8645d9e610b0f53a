"""Prometheus metrics on SQLite and PostgreSQL, parsed with prometheus_client's own parser:
the server's `GET /metrics` after real runs (runs by workflow and status, queue depth and
age, live workers, step durations observed in this process; auth like /api), and a real
worker's `--metrics-port` endpoint (its own step and claim histograms)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from engine.models import RunStatus, WorkerInfo
from engine.registry import import_modules
from engine.server import create_app
from engine.service import Engine
from engine.settings import resolve_settings
from tests.conftest import ROOT

LIVE = ROOT / "tests" / "server" / "live"
KEY = "metrics-key"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["livesteps"], str(LIVE))
    e = Engine(resolve_settings(db=db_url, workflows=str(LIVE)), import_steps=False)
    e.save_all_definitions()
    yield e
    e.close()


def test_server_metrics_after_real_runs(engine: Engine) -> None:
    client = TestClient(create_app(engine, KEY), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {KEY}"}
    refused = client.get("/metrics")
    assert refused.status_code == 401 and "API key" in refused.json()["detail"]
    assert client.get("/metrics", headers={"Authorization": "Bearer no"}).status_code == 401
    before = samples(client.get("/metrics", headers=auth).text)

    for _ in range(2):
        assert engine.run(engine.workflow("quick"), {}).status == RunStatus.COMPLETED
    assert engine.run(engine.workflow("broken"), {}).status == RunStatus.FAILED
    for _ in range(2):
        engine.trigger("later", {})
    engine.trigger("later", {}, delay=3600)
    now = engine.store.now()
    engine.store.register_worker(
        WorkerInfo("w-metrics", "host", os.getpid(), ("fast",), 2, 30.0), now
    )

    response = client.get("/metrics", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)
    assert value(after, "durable_yaml_database_up") == 1
    assert value(after, "durable_yaml_runs", workflow="quick", status="completed") == 2
    assert value(after, "durable_yaml_runs", workflow="broken", status="failed") == 1
    assert value(after, "durable_yaml_runs", workflow="later", status="queued") == 3
    assert value(after, "durable_yaml_queue_depth", queue="slow-lane") == 3
    assert value(after, "durable_yaml_queue_due_runs", queue="slow-lane") == 2
    assert 0 <= value(after, "durable_yaml_queue_oldest_age_seconds", queue="slow-lane") < 300
    assert value(after, "durable_yaml_queue_depth", queue="fast") == 0
    assert ("durable_yaml_queue_depth", frozenset({("queue", "fast")})) in after
    assert value(after, "durable_yaml_queue_oldest_age_seconds", queue="fast") == 0
    assert value(after, "durable_yaml_workers_live") == 1

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    count = "durable_yaml_step_duration_seconds_count"
    assert grew(count, workflow="quick", step="only", outcome="completed") == 2
    assert grew(count, workflow="broken", step="fix", outcome="failed") == 1
    assert (
        grew(
            "durable_yaml_step_duration_seconds_sum",
            workflow="quick",
            step="only",
            outcome="completed",
        )
        >= 0
    )
    inf = {"workflow": "quick", "step": "only", "outcome": "completed", "le": "+Inf"}
    assert grew("durable_yaml_step_duration_seconds_bucket", **inf) == 2

    # the delayed run becomes due once its time has come: the age counts from then
    delayed = [
        r for r in engine.store.list_runs(workflow_id="later") if r.next_at and r.next_at > now
    ]
    assert len(delayed) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_worker_metrics_port(engine: Engine, db_url: str, tmp_path: Path) -> None:
    port = _free_port()
    args = [sys.executable, "-m", "engine", "worker", "--concurrency", "1", "--no-schedules"]
    common = ["-m", "livesteps", "--workflows", str(LIVE), "--db", db_url]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    worker = subprocess.Popen(
        [*args, "--metrics-port", str(port), *common],
        cwd=LIVE,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert worker.stdout is not None
        lines = []
        for line in worker.stdout:
            lines.append(line)
            if "metrics http://" in line:
                break
        assert f"metrics http://127.0.0.1:{port}/metrics" in "".join(lines), lines
        ids = [engine.trigger("quick", {}).run_ids[0] for _ in range(3)]
        deadline = time.monotonic() + 60
        while not all(engine.store.get_run(i).finished for i in ids):
            assert time.monotonic() < deadline, "the worker did not finish the runs"
            time.sleep(0.1)
        found = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        count = "durable_yaml_step_duration_seconds_count"
        assert value(found, count, workflow="quick", step="only", outcome="completed") == 3
        assert value(found, "durable_yaml_claim_latency_seconds_count", result="claimed") == 3
        assert value(found, "durable_yaml_runs", workflow="quick", status="completed") == 3
        assert value(found, "durable_yaml_workers_live") == 1
        assert value(found, "durable_yaml_database_up") == 1

        if not db_url.startswith("sqlite"):
            return  # the rest is the same on every database
        # the port is taken: a second worker says so and stops (exit 2), no traceback
        second = subprocess.run(
            [*args, "--metrics-port", str(port), *common],
            cwd=LIVE,
            env=env,
            text=True,
            capture_output=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
