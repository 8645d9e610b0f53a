"""Traces with DURABLE_YAML_OTEL=1, captured by the OpenTelemetry SDK's in-memory exporter,
on SQLite and PostgreSQL: sender span -> run span -> attempt spans (attributes, error
status); a child run's trace under its parent step's attempt; a worker in another process
continues the trace stored with the run. Log records carry run and step ids."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from engine.models import RunStatus
from engine.registry import import_modules
from engine.service import Engine
from engine.settings import resolve_settings
from engine.tracing import RunContextFilter, StepLogFormatter
from engine.worker import Worker
from tests.conftest import ROOT

LIVE = ROOT / "tests" / "server" / "live"
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        current.add_span_processor(SimpleSpanProcessor(EXPORTER))
    else:
        sdk = TracerProvider()
        sdk.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(sdk)


@pytest.fixture
def engine(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setenv("DURABLE_YAML_OTEL", "1")
    EXPORTER.clear()
    import_modules(["livesteps"], str(LIVE))
    e = Engine(resolve_settings(db=db_url, workflows=str(LIVE)), import_steps=False)
    e.save_all_definitions()
    yield e
    e.close()


def _wait(engine: Engine, run_id: str) -> None:
    deadline = time.monotonic() + 60
    while not engine.store.get_run(run_id).finished:
        assert time.monotonic() < deadline, f"run {run_id} did not finish"
        time.sleep(0.05)


def _one(spans: list[ReadableSpan], name: str, **attrs: Any) -> ReadableSpan:
    found = [
        s
        for s in spans
        if s.name == name and all((s.attributes or {}).get(k) == v for k, v in attrs.items())
    ]
    assert len(found) == 1, [(s.name, s.attributes) for s in spans]
    return found[0]


def test_sender_run_and_attempt_spans(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    tracer = trace.get_tracer("test")
    worker = Worker(engine, concurrency=1, poll_interval=0.05, grace=5, schedules=False)
    caplog.set_level(logging.INFO, logger="durable_yaml.step")
    with tracer.start_as_current_span("sender") as sender:
        ok = engine.trigger("quick", {}).run_ids[0]
        bad = engine.trigger("broken", {}).run_ids[0]
        family = engine.trigger("family", {}).run_ids[0]
    worker.start()
    try:
        for run_id in (ok, bad, family):
            _wait(engine, run_id)
    finally:
        worker.stop()
        worker.shutdown()
    assert engine.store.get_run(ok).status == RunStatus.COMPLETED
    spans = list(EXPORTER.get_finished_spans())
    sent = sender.get_span_context()

    run_span = _one(spans, "run quick", **{"durable_yaml.run_id": ok})
    assert run_span.parent is not None and run_span.parent.span_id == sent.span_id
    assert run_span.context.trace_id == sent.trace_id
    stored = engine.store.get_run(ok).trigger["traceparent"]
    assert stored.startswith(f"00-{sent.trace_id:032x}-{run_span.context.span_id:016x}-")
    attempt = _one(spans, "quick.only", **{"durable_yaml.run_id": ok})
    assert attempt.parent is not None and attempt.parent.span_id == run_span.context.span_id
    assert attempt.context.trace_id == sent.trace_id
    assert attempt.attributes is not None
    assert attempt.attributes["durable_yaml.step"] == "only"
    assert attempt.attributes["durable_yaml.attempt"] == 1
    assert attempt.attributes["durable_yaml.workflow"] == "quick"
    assert attempt.attributes["durable_yaml.outcome"] == "completed"
    assert attempt.status.status_code != StatusCode.ERROR

    failed = _one(spans, "broken.fix", **{"durable_yaml.run_id": bad})
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.status.description is not None
    assert "the lamp is broken" in failed.status.description
    (event,) = [e for e in failed.events if e.name == "exception"]
    assert event.attributes is not None
    assert event.attributes["exception.message"] == "the lamp is broken"
    assert failed.context.trace_id == sent.trace_id

    # family -> its kid step's attempt -> the child run's span -> the child's attempt
    family_run = _one(spans, "run family", **{"durable_yaml.run_id": family})
    kid_attempts = [
        s
        for s in spans
        if s.name == "family.kid" and (s.attributes or {}).get("durable_yaml.run_id") == family
    ]
    assert kid_attempts and all(
        s.parent is not None and s.parent.span_id == family_run.context.span_id
        for s in kid_attempts
    )
    (child_id,) = [c.id for c in engine.store.list_runs(parent_run_id=family)]
    child_run = _one(spans, "run quick", **{"durable_yaml.run_id": child_id})
    assert child_run.parent is not None
    assert child_run.parent.span_id in {s.context.span_id for s in kid_attempts}
    child_attempt = _one(spans, "quick.only", **{"durable_yaml.run_id": child_id})
    assert child_attempt.parent is not None
    assert child_attempt.parent.span_id == child_run.context.span_id
    assert {child_run.context.trace_id, child_attempt.context.trace_id} == {sent.trace_id}

    # log records: the Python logger's copy carries run, step and attempt ...
    record = next(r for r in caplog.records if r.getMessage() == "quick step ran")
    assert getattr(record, "run_id", None) in (ok, child_id, family)
    assert (getattr(record, "step_id", None), getattr(record, "attempt", None)) in (
        ("only", 1),
        ("after", 1),
    )
    line = StepLogFormatter().format(record)
    assert f"[run={record.run_id} step={record.step_id}#1]" in line  # type: ignore[attr-defined]
    # ... and so does the stored line
    (stored_log,) = engine.store.get_logs(ok)
    assert (stored_log.run_id, stored_log.step_key, stored_log.attempt) == (ok, "only", 1)


def test_records_inside_a_step_name_it(engine: Engine) -> None:
    """Any logger used inside a step gets the attempt's ids through RunContextFilter."""
    import livesteps  # type: ignore[import-not-found]

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep()
    handler.addFilter(RunContextFilter())
    user_log = logging.getLogger("livesteps.user")
    user_log.addHandler(handler)
    user_log.setLevel(logging.INFO)
    livesteps.USER_LOG = user_log
    try:
        run = engine.run(engine.workflow("quick"), {})
        # a step with a timeout (its own thread), an async step (the event loop's thread)
        # and for_each items (a pool's threads) execute in the attempt's context too
        timed = engine.run(engine.workflow("timed"), {})
    finally:
        livesteps.USER_LOG = None
        user_log.removeHandler(handler)
    assert timed.status == RunStatus.COMPLETED, timed.error
    where = [(r.run_id, r.step_id, r.attempt) for r in seen]  # type: ignore[attr-defined]
    assert where == [
        (run.id, "only", 1),
        (timed.id, "bounded", 1),
        (timed.id, "awaited", 1),
        (timed.id, "each", 1),
        (timed.id, "each", 1),
    ]
    outside = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    RunContextFilter().filter(outside)
    assert outside.run_id is None  # type: ignore[attr-defined]


def test_a_worker_in_another_process_continues_the_trace(engine: Engine, db_url: str) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("sender") as sender:
        run_id = engine.trigger("quick", {}).run_ids[0]
    run_span = _one(list(EXPORTER.get_finished_spans()), "run quick")
    env = {
        **os.environ,
        "DURABLE_YAML_OTEL": "1",
        "OTEL_TRACES_EXPORTER": "console",
        "PYTHONUNBUFFERED": "1",
    }
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "engine", "worker", "--concurrency", "1", "--no-schedules"),
            *("-m", "livesteps", "--workflows", str(LIVE), "--db", db_url),
        ],
        cwd=LIVE,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait(engine, run_id)
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
    spans = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    (attempt,) = [s for s in spans if s["name"] == "quick.only"]
    assert attempt["context"]["trace_id"] == f"0x{sender.get_span_context().trace_id:032x}"
    assert attempt["parent_id"] == f"0x{run_span.context.span_id:016x}"
    assert attempt["attributes"]["durable_yaml.run_id"] == run_id
    # the worker's own log output names the run and step of a ctx.logger line
    assert f"quick step ran  [run={run_id} step=only#1]" in out


def test_an_api_call_continues_the_callers_trace(engine: Engine) -> None:
    from fastapi.testclient import TestClient

    from engine.server import create_app

    client = TestClient(create_app(engine, "k"), raise_server_exceptions=False)
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    created = client.post(
        "/api/workflows/quick/runs",
        json={"payload": {}},
        headers={"Authorization": "Bearer k", "traceparent": caller},
    )
    assert created.status_code == 201, created.text
    run_span = _one(list(EXPORTER.get_finished_spans()), "run quick")
    assert run_span.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert run_span.parent is not None and run_span.parent.span_id == 0xB7AD6B7169203331
    traceparent = engine.store.get_run(created.json()["id"]).trigger["traceparent"]
    assert traceparent.startswith("00-0af7651916cd43dd8448eb211c80319c-")
