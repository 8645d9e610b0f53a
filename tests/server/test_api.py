"""The HTTP API through the real ASGI app, on SQLite and PostgreSQL: every endpoint, auth
refused without the key, 422s naming the field for bad input, never a 500."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.registry import import_modules
from engine.server import create_app
from engine.service import Engine
from engine.settings import resolve_settings

HITL = Path(__file__).parent.parent / "engine" / "hitl"
KEY = "s3cret-key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["hitlsteps"], str(HITL))
    e = Engine(resolve_settings(db=db_url, workflows=str(HITL)), import_steps=False)
    e.save_all_definitions()
    yield e
    e.close()


@pytest.fixture
def client(engine: Engine) -> TestClient:
    return TestClient(create_app(engine, KEY), raise_server_exceptions=False)


def test_every_api_call_needs_the_key(client: TestClient) -> None:
    for method, path in [
        ("GET", "/api/runs"),
        ("POST", "/api/events"),
        ("GET", "/api/workflows"),
        ("GET", "/api/runs/x"),
        ("POST", "/api/tokens/t/complete"),
        ("GET", "/api/queues"),
        ("GET", "/api/schedules"),
    ]:
        response = client.request(method, path, json={})
        assert response.status_code == 401, path
        assert KEY not in response.text
        wrong = client.request(method, path, json={}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}
    assert client.get("/openapi.json").json()["info"]["title"] == "durable-yaml"
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"


def test_events_trigger_and_idempotency(client: TestClient) -> None:
    sent = client.post(
        "/api/events",
        json={"name": "doc.published", "payload": {"doc": "a"}, "idempotency_key": "k1"},
        headers=AUTH,
    )
    assert sent.status_code == 202
    (run_id,) = sent.json()["runs"]
    again = client.post(
        "/api/events",
        json={"name": "doc.published", "payload": {"doc": "a"}, "idempotency_key": "k1"},
        headers=AUTH,
    )
    assert again.status_code == 200 and again.json() == {
        "runs": [run_id],
        "resumed": [],
        "duplicate": True,
    }
    bad = client.post(
        "/api/events", json={"name": "doc.published", "payload": {"nodoc": 1}}, headers=AUTH
    )
    assert bad.status_code == 422
    assert bad.json() == {
        "error": "payload for workflow `listener` is invalid at `payload`: 'doc' "
        "is a required property",
        "field": "payload",
        "workflow": "listener",
    }
    created = client.post(
        "/api/workflows/child/runs", json={"payload": {"x": 2}, "delay": "1h"}, headers=AUTH
    )
    assert created.status_code == 201
    run = created.json()
    assert run["workflow"] == "child" and run["status"] == "queued"
    typed = client.post("/api/workflows/child/runs", json={"payload": {"x": "two"}}, headers=AUTH)
    assert typed.status_code == 422 and typed.json()["field"] == "payload.x"
    missing = client.post("/api/workflows/nope/runs", json={}, headers=AUTH)
    assert missing.status_code == 404 and "no workflow has id `nope`" in missing.json()["error"]
    delay = client.post(
        "/api/workflows/child/runs", json={"payload": {"x": 1}, "delay": "soon"}, headers=AUTH
    )
    assert delay.status_code == 422 and "delay: 'soon' is not a duration" in delay.json()["error"]
    not_json = client.post(
        "/api/events", content=b"{nope", headers={**AUTH, "content-type": "application/json"}
    )
    assert not_json.status_code == 422


def test_list_filters_and_keyset_pages(client: TestClient, engine: Engine) -> None:
    ids = [
        client.post("/api/workflows/child/runs", json={"payload": {"x": i}}, headers=AUTH).json()[
            "id"
        ]
        for i in range(5)
    ]
    page = client.get("/api/runs?limit=2&workflow=child", headers=AUTH).json()
    assert [r["id"] for r in page["runs"]] == ids[::-1][:2]
    rest = client.get(
        f"/api/runs?limit=10&workflow=child&cursor={page['next_cursor']}", headers=AUTH
    ).json()
    assert [r["id"] for r in rest["runs"]] == ids[::-1][2:] and rest["next_cursor"] is None
    assert client.get("/api/runs?status=completed", headers=AUTH).json()["runs"] == []
    assert client.get("/api/runs?status=nope", headers=AUTH).status_code == 422
    assert client.get("/api/runs?cursor=zzz", headers=AUTH).status_code == 422
    for forged in ("nan|x", "inf|x", "-inf|x", "1e400|x"):  # SQLite and PostgreSQL differed
        cursor = base64.urlsafe_b64encode(forged.encode()).decode()
        answer = client.get(f"/api/runs?cursor={cursor}", headers=AUTH)
        assert answer.status_code == 422 and "is not a cursor" in answer.json()["detail"]
    assert client.get("/api/runs?limit=0", headers=AUTH).status_code == 422
    since = client.get("/api/runs?created_after=2999-01-01T00:00:00Z", headers=AUTH).json()
    assert since["runs"] == []
    assert client.get("/api/runs?created_after=yesterday", headers=AUTH).status_code == 422


def test_run_detail_logs_cancel_replay(client: TestClient, engine: Engine) -> None:
    machine = engine.workflow("parent")
    run = engine.runner().start(
        machine, {"x": -3}, new=engine.new_run(machine, {"x": -3}, {"kind": "manual"})
    )
    detail = client.get(f"/api/runs/{run.id}", headers=AUTH).json()
    assert detail["status"] == "failed" and "negative input -3" in detail["error"]
    assert {"id", "workflow", "version", "status", "created_at", "output", "error", "steps"} <= set(
        detail
    )
    step = detail["steps"][0]
    assert {"id", "status", "attempts", "output", "error", "attempt_history"} <= set(step)
    logs = client.get(f"/api/runs/{run.id}/logs", headers=AUTH).json()
    assert logs == {"logs": [], "next_after": None}
    replayed = client.post(f"/api/runs/{run.id}/replay", headers=AUTH)
    assert replayed.status_code == 201 and replayed.json()["status"] == "queued"
    cancelled = client.post(f"/api/runs/{replayed.json()['id']}/cancel", headers=AUTH).json()
    assert cancelled["status"] == "cancelled"
    assert client.get("/api/runs/unknown", headers=AUTH).status_code == 404
    assert client.post("/api/runs/unknown/cancel", headers=AUTH).status_code == 404


def test_tokens(client: TestClient, engine: Engine) -> None:
    machine = engine.workflow("token")
    run = engine.runner().start(machine, {}, new=engine.new_run(machine, {}, {"kind": "manual"}))
    token = client.get(f"/api/runs/{run.id}", headers=AUTH).json()["steps"][0]["wait"]["token"]
    done = client.post(f"/api/tokens/{token}/complete", json={"data": {"by": "api"}}, headers=AUTH)
    assert done.status_code == 200 and done.json() == {"run_id": run.id}
    twice = client.post(f"/api/tokens/{token}/complete", json={"data": {}}, headers=AUTH)
    assert twice.status_code == 409 and "already completed" in twice.json()["error"]
    assert client.post("/api/tokens/nope/complete", json={}, headers=AUTH).status_code == 404


def test_workflows_schedules_queues(client: TestClient, engine: Engine) -> None:
    workflows = client.get("/api/workflows", headers=AUTH).json()
    assert {w["id"] for w in workflows["workflows"]} >= {"approval", "parent", "child", "fanout"}
    assert client.get("/api/schedules", headers=AUTH).json() == {"schedules": []}
    client.post("/api/workflows/child/runs", json={"payload": {"x": 1}}, headers=AUTH)
    queues = {q["name"]: q for q in client.get("/api/queues", headers=AUTH).json()["queues"]}
    assert queues["workflow:child"]["queued"] == 1


def test_dashboard_pages_after_login(client: TestClient, engine: Engine) -> None:
    assert client.post("/login", data={"key": "wrong"}).status_code == 401
    client.post("/login", data={"key": KEY})
    assert KEY not in str(client.cookies)
    machine = engine.workflow("token")
    run = engine.runner().start(machine, {}, new=engine.new_run(machine, {}, {"kind": "manual"}))
    for path in (
        "/",
        "/?status=waiting",
        "/workflows",
        "/schedules",
        "/queues",
        f"/runs/{run.id}",
        "/workers",
        "/workflows/token",
    ):
        page = client.get(path)
        assert page.status_code == 200, path
        assert KEY not in page.text
    assert "Waiting for a person" in client.get(f"/runs/{run.id}").text
    stale = client.post(f"/runs/{run.id}/respond", data={"csrf": "forged", "decision": "approve"})
    assert stale.status_code == 400 and "CSRF" in stale.text
    assert client.get("/runs/nope").status_code == 404


def test_no_key_means_open_on_loopback(engine: Engine) -> None:
    client = TestClient(create_app(engine, None), base_url="http://127.0.0.1")
    assert client.get("/api/runs").status_code == 200
    assert client.get("/").status_code == 200


def test_nul_characters_are_a_clear_422_on_every_backend(
    client: TestClient, engine: Engine
) -> None:
    response = client.post(
        "/api/events", json={"name": "doc.published", "payload": {"doc": "a\u0000b"}}, headers=AUTH
    )
    # one rule on both backends: PostgreSQL cannot store NUL, so neither accepts it
    assert response.status_code == 422 and "NUL character" in response.json()["error"]
    assert response.json()["field"] == "payload.doc"
