"""Hostile input through every door — the CLI, the HTTP API and the Client — on SQLite and
PostgreSQL: each answer is a clear refusal naming the field (exit 2 / HTTP 4xx), never a
traceback or a 5xx, and no `dy_*` table gains or loses a row."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from engine import Client
from engine.errors import PayloadInvalid
from engine.inputs import InputInvalid, NotFiniteNumber, NotJsonData, NotText, TooDeep, TooLong
from engine.registry import import_modules
from engine.server import create_app
from engine.service import Engine
from engine.settings import resolve_settings
from tests.conftest import ROOT, cli

FLOWS = Path(__file__).parent / "hostile"
KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = "x" * 10_000
DEEP = "[" * 5000 + "]" * 5000


def row_counts(engine: Engine) -> dict[str, int]:
    db = engine.store.engine
    names = [n for n in sa.inspect(db).get_table_names() if n.startswith("dy_")]
    with db.connect() as c:
        return {n: c.execute(sa.text(f'SELECT count(*) FROM "{n}"')).scalar_one() for n in names}


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["hostilesteps"], str(FLOWS))
    e = Engine(resolve_settings(db=db_url, workflows=str(FLOWS)), import_steps=False)
    e.save_all_definitions()
    e.send_event("order.placed", {"k": "a"})  # something in every table a send touches
    yield e
    e.close()


def _env(db_url: str) -> dict[str, str]:
    return {
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_WORKFLOWS": str(FLOWS),
        "DURABLE_YAML_MODULES": "hostilesteps",
        "PYTHONPATH": f"{ROOT}:{FLOWS}",
    }


CLI_CASES: list[tuple[list[str], str]] = [
    (["send", "order.placed", "--payload", "NaN"], "--payload: NaN is not a JSON number"),
    (["send", "order.placed", "--payload", "[1e999]"], "--payload[0]: inf is not a JSON number"),
    (["send", "order.placed", "--payload", '{"k": "\\ud800"}'], "--payload.k: contains a lone"),
    (["send", "order.placed", "--payload", '{"k": "a\\u0000"}'], "--payload.k: contains the NUL"),
    (["send", "order.placed", "--payload", DEEP], "--payload: nested more than 64 levels"),
    (
        ["send", "order.placed", "--payload", "9" * 5000],
        "--payload: a whole number must fit 64 bits",
    ),
    (["send", "order.placed", "--payload", "{k: 1}"], "--payload: is not valid JSON"),
    (["send", ""], "name: must not be empty"),
    (["send", " "], "name: must not be blank"),
    (["send", "\t\n"], "name: must not be blank"),
    (["send", LONG], "name: is 10000 characters long; at most 200"),
    (["send", "order.placed", "--idempotency-key", LONG], "idempotency_key: is 10000"),
    (
        ["send", "order.placed", "--payload", json.dumps({"k": "k" * 600})],
        "concurrency_key: is 600",
    ),
    (["send", "order.placed", "--payload", '{"k": 5}'], "at `payload.k`: 5 is not of type"),
    (["run", "order", "--payload-file", "not-utf8.json"], "not-utf8.json: is not UTF-8 text"),
    (["run", "order", "--payload-file", "deep.json"], "deep.json: nested more than 64"),
    (["run", "order", "--payload-file", "/dev/zero"], "/dev/zero: larger than 1024 KiB"),
    (["complete", "tok", "--data", "NaN"], "--data: NaN is not a JSON number"),
    (["complete", LONG, "--data", "1"], "token: is 10000 characters long"),
    # bytes that are not UTF-8 (the shell's $'ab\xff'): named, not a driver's traceback
    (["runs", "show", "ab\udcff"], "argument ab\\udcff is not valid UTF-8"),
    (["runs", "cancel", "ab\udcff"], "argument ab\\udcff is not valid UTF-8"),
    (["send", "order.placed", "--tag", "t:\udcff"], "is not valid UTF-8"),
]


@pytest.mark.parametrize(("args", "message"), CLI_CASES, ids=lambda v: str(v)[:40])
def test_cli_refuses_with_exit_2(
    engine: Engine, db_url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "not-utf8.json").write_bytes(b'{"k": "\xff\xfe"}')
    (tmp_path / "deep.json").write_text(DEEP)
    before = row_counts(engine)
    result = cli(*args, cwd=tmp_path, env=_env(db_url))
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert row_counts(engine) == before


def _raw(body: str | bytes) -> dict[str, Any]:
    return {"content": body, "headers": {**AUTH, "content-type": "application/json"}}


API_CASES: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("POST", "/api/events", _raw('{"name": "order.placed", "payload": NaN}'), 422, "NaN"),
    (
        "POST",
        "/api/events",
        _raw('{"name": "order.placed", "payload": {"k": "\\ud800"}}'),
        422,
        "payload.k",
    ),
    (
        "POST",
        "/api/events",
        _raw('{"name": "order.placed", "payload": {"k": "\\u0000"}}'),
        422,
        "payload.k",
    ),
    (
        "POST",
        "/api/events",
        _raw('{"name": "o", "payload": {"\\ud800": 1}}'),
        422,
        "payload.\\\\ud800",
    ),
    (
        "POST",
        "/api/events",
        _raw('{"name": "o", "payload": ' + "[" * 300 + "]" * 300 + "}"),
        422,
        "nested",
    ),
    ("POST", "/api/events", _raw('{"name": "o", "payload": ' + DEEP + "}"), 422, "nested"),
    (
        "POST",
        "/api/events",
        _raw(b'{"name": "o", "payload": "' + b"a" * 2_000_000 + b'"}'),
        413,
        "larger",
    ),
    ("POST", "/api/events", _raw(b'{"name": "o", "payload": "\xff"}'), 422, "UTF-8"),
    (
        "POST",
        "/api/events",
        {"json": {"name": "order.placed", "idempotency-key": "k"}},
        422,
        "idempotency-key",
    ),
    ("POST", "/api/events", {"json": {"name": ""}}, 422, "name"),
    ("POST", "/api/events", {"json": {"name": " "}}, 422, "name: must not be blank"),
    ("POST", "/api/events", {"json": {"name": LONG}}, 422, "name: is 10000"),
    (
        "POST",
        "/api/events",
        {"json": {"name": "o", "idempotency_key": LONG}},
        422,
        "idempotency_key",
    ),
    (
        "POST",
        "/api/events",
        {"json": {"name": "order.placed", "payload": {"k": "k" * 600}}},
        422,
        "concurrency_key",
    ),
    ("POST", "/api/workflows/order/runs", _raw('{"payload": {}, "delay": NaN}'), 422, "NaN"),
    (
        "POST",
        "/api/workflows/order/runs",
        _raw('{"payload": {}, "delay": Infinity}'),
        422,
        "Infinity",
    ),
    ("POST", "/api/workflows/order/runs", _raw('{"payload": {}, "delay": 1e999}'), 422, "delay"),
    ("POST", "/api/workflows/order/runs", {"json": {"payload": {}, "delay": True}}, 422, "delay"),
    (
        "POST",
        "/api/workflows/order/runs",
        {"json": {"payload": {}, "delay": "1e9 days"}},
        422,
        "delay",
    ),
    ("POST", "/api/tokens/tok/complete", _raw('{"data": NaN}'), 422, "NaN"),
    ("POST", f"/api/tokens/{'t' * 100}/complete", {"json": {"data": 1}}, 422, "token"),
    ("GET", "/api/runs?created_after=0001-01-01", {}, 422, "created_after"),
    ("GET", "/api/runs?created_before=99999-01-01", {}, 422, "created_before"),
    ("GET", "/api/runs?cursor=garbage", {}, 422, "cursor"),
    ("GET", f"/api/runs/x/logs?after={10**23}", {}, 422, "after"),
    ("GET", "/api/runs/%00x", {}, 422, "NUL"),
    ("GET", "/api/runs?workflow=%00", {}, 422, "NUL"),
    ("POST", "/api/runs/%00x/cancel", {}, 422, "NUL"),
    ("GET", "/runs/%00x", {}, 422, "NUL"),
]


@pytest.mark.parametrize(
    ("method", "path", "request_args", "status", "message"), API_CASES, ids=lambda v: str(v)[:40]
)
def test_api_refuses_with_4xx(
    engine: Engine,
    method: str,
    path: str,
    request_args: dict[str, Any],
    status: int,
    message: str,
) -> None:
    client = TestClient(create_app(engine, KEY), raise_server_exceptions=False)
    request_args = {"headers": AUTH, **request_args}
    before = row_counts(engine)
    response = client.request(method, path, **request_args)
    assert response.status_code == status, response.text[:300]
    assert message in response.text
    assert "Traceback" not in response.text
    assert row_counts(engine) == before


def test_api_never_500s_on_a_schedule_that_never_fires(engine: Engine) -> None:
    """Validate refuses such a schedule; one stored before that is shown with its problem."""
    from dataclasses import replace

    from dsl import Trigger

    order = engine.catalog.workflows["order"]
    engine.catalog.workflows["never"] = replace(
        order, workflow_id="never", trigger=Trigger("cron", cron="* * 31 2 *")
    )
    client = TestClient(create_app(engine, KEY), raise_server_exceptions=False)
    listed = client.get("/api/schedules", headers=AUTH)
    assert listed.status_code == 200
    (never,) = listed.json()["schedules"]
    assert never["next"] == [] and "never fires" in never["error"]
    local = TestClient(create_app(engine, None), base_url="http://127.0.0.1")
    page = local.get("/schedules")
    assert page.status_code == 200 and "never fires" in page.text


CLIENT_CASES: list[tuple[Callable[[Client], Any], type[InputInvalid], str]] = [
    (lambda c: c.send_event("order.placed", {1, 2}), NotJsonData, "payload"),
    (lambda c: c.send_event("order.placed", {"k": math.nan}), NotFiniteNumber, "payload.k"),
    (lambda c: c.send_event("order.placed", {"k": "\ud800"}), NotText, "payload.k"),
    (lambda c: c.send_event("order.placed", {"k": "\x00"}), NotText, "payload.k"),
    (lambda c: c.send_event("order.placed", {"k": 2**70}), NotFiniteNumber, "payload.k"),
    (lambda c: c.send_event("order.placed", {"k": b"x"}), NotJsonData, "payload.k"),
    (lambda c: c.send_event("order.placed", {1: "x"}), NotJsonData, "payload"),
    (lambda c: c.send_event("order.placed", _deep(100)), TooDeep, "payload"),
    (lambda c: c.send_event(LONG), TooLong, "name"),
    (lambda c: c.send_event(""), TooLong, "name"),
    (lambda c: c.send_event(" \u3000"), TooLong, "name"),
    (lambda c: c.send_event("o", {}, idempotency_key=LONG), TooLong, "idempotency_key"),
    (lambda c: c.trigger("order", {}, delay=math.nan), InputInvalid, "delay"),
    (lambda c: c.trigger("order", {}, delay=10**400), InputInvalid, "delay"),
    (lambda c: c.trigger("order", {}, delay=10**5000), InputInvalid, "delay"),
    (lambda c: c.trigger("order", {}, delay=-(10**400)), InputInvalid, "delay"),
    (lambda c: c.trigger("order", {"k": "k" * 600}), TooLong, "concurrency_key"),
    (lambda c: c.complete_token("tok", {1}), NotJsonData, "data"),
    (lambda c: c.get_run("a\x00"), NotText, "run_id"),
    (lambda c: c.cancel("r" * 41), TooLong, "run_id"),
]


def _deep(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(("call", "error", "field"), CLIENT_CASES)
def test_client_refuses_naming_the_field(
    engine: Engine,
    db_url: str,
    call: Callable[[Client], Any],
    error: type[InputInvalid],
    field: str,
) -> None:
    before = row_counts(engine)
    with Client(db_url=db_url, workflows=str(FLOWS)) as client, pytest.raises(error) as raised:
        call(client)
    assert raised.value.field == field
    assert isinstance(raised.value, PayloadInvalid) and raised.value.exit_code == 2
    assert row_counts(engine) == before


@pytest.mark.parametrize("kind", ["deep", "surrogate", "nan", "nul", "exit"])
def test_hostile_step_results_fail_the_run_cleanly(
    engine: Engine, db_url: str, tmp_path: Path, kind: str
) -> None:
    (tmp_path / "wf.yaml").write_text(
        f'id: out-{kind}\nversion: "1"\ntrigger: {{manual: true}}\n'
        f"steps:\n  - {{id: produce, call: hostile.{kind}}}\n"
    )
    result = cli("run", str(tmp_path / "wf.yaml"), cwd=tmp_path, env=_env(db_url))
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    assert result.returncode == 1, out
    expected = "SystemExit(5)" if kind == "exit" else "StepOutputInvalid: steps.produce"
    assert expected in out
    (run,) = [r for r in engine.store.list_runs(None, f"out-{kind}", 10)]
    assert run.status.value == "failed"


def test_hostile_log_lines_are_stored_not_refused(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "wf.yaml").write_text(
        'id: logs\nversion: "1"\ntrigger: {manual: true}\n'
        "steps:\n  - {id: produce, call: hostile.logs}\n"
    )
    result = cli("run", str(tmp_path / "wf.yaml"), cwd=tmp_path, env=_env(db_url))
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = engine.store.list_runs(None, "logs", 10)
    (line,) = [e for e in engine.store.get_logs(run.id, 0, 100) if e.step_key == "produce"]
    assert line.message == "lone \ufffd and nul \ufffd"
    assert line.extra == {"nan": "nan", "big": str(2**70)}


def test_child_runs_nest_at_most_32_deep_at_run_time(engine: Engine, tmp_path: Path) -> None:
    """`validate` refuses a workflow that starts itself; one that slips through (a catalog
    changed under a running worker) stops at the nesting limit with a clear failure."""
    from dataclasses import replace

    (tmp_path / "loop.yaml").write_text(
        'id: loop\nversion: "1"\ntrigger: {manual: true}\n'
        "steps:\n  - {id: again, run_workflow: order}\n"
    )
    from dsl import load_workflow

    machine = load_workflow(tmp_path / "loop.yaml")
    (again,) = machine.states
    looping = replace(
        machine, states=(replace(again, config={**again.config, "workflow": "loop"}),)
    )
    engine.catalog.workflows["loop"] = looping
    run = engine.run(looping, {})
    assert run.status.value == "failed"
    runs = engine.store.list_runs(None, "loop", 100)
    assert len(runs) == 33  # the first run and 32 nested children
    errors = " ".join(r.error or "" for r in runs)
    assert "would be a child run 33 levels deep; at most 32" in errors
