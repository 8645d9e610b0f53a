"""The API's operations endpoints through the real ASGI app, on both backends: search by tag
and time, run objects with tags/metadata/priority/not_before/expires_at/blocked_by, bulk
cancel and replay by filter or ids, queue pause/resume, workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.models import WorkerInfo
from engine.registry import import_modules
from engine.server import create_app
from engine.service import Engine
from engine.settings import resolve_settings

OPS = Path(__file__).parent.parent / "engine" / "ops"
KEY = "s3cret-key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["opssteps"], str(OPS))
    e = Engine(resolve_settings(db=db_url, workflows=str(OPS)), import_steps=False)
    e.save_all_definitions()
    yield e
    e.close()


@pytest.fixture
def client(engine: Engine) -> TestClient:
    return TestClient(create_app(engine, KEY), raise_server_exceptions=False)


def test_search_bulk_pause_and_workers(client: TestClient, engine: Engine) -> None:
    made = client.post(
        "/api/workflows/marked/runs",
        json={"payload": {"n": 1}, "tags": ["tenant:a"], "priority": 3, "ttl": "1h", "delay": 60},
        headers=AUTH,
    )
    assert made.status_code == 201, made.text
    run = made.json()
    assert run["tags"] == ["tenant:a"] and run["priority"] == 3
    assert run["not_before"] and run["expires_at"] and run["metadata"] == {}
    assert run["blocked_by"]["reason"] == "delayed"
    sent = client.post(
        "/api/events",
        json={"name": "job.created", "payload": {"n": 2}, "tags": ["tenant:a", "x:y"]},
        headers=AUTH,
    )
    assert sent.status_code == 202
    client.post("/api/events", json={"name": "job.created", "payload": {"n": 3}}, headers=AUTH)
    bad = client.post("/api/events", json={"name": "job.created", "tags": ["oops"]}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["field"] == "tags[0]"
    page = client.get("/api/runs", params={"tag": "tenant:a", "limit": 1}, headers=AUTH).json()
    assert [r["tags"] for r in page["runs"]] == [["tenant:a", "x:y"]]
    assert page["runs"][0]["blocked_by"]["reason"] == "no_worker"
    rest = client.get(
        "/api/runs", params={"tag": "tenant:a", "cursor": page["next_cursor"]}, headers=AUTH
    ).json()
    assert [r["id"] for r in rest["runs"]] == [run["id"]] and rest["next_cursor"] is None
    both = client.get("/api/runs", params=[("tag", "tenant:a"), ("tag", "x:y")], headers=AUTH)
    assert len(both.json()["runs"]) == 1
    later = client.get("/api/runs", params={"since": "2999-01-01T00:00:00Z"}, headers=AUTH)
    assert later.json()["runs"] == []
    # a live worker: the API lists it, and a queued run is no longer blocked by its absence
    engine.store.register_worker(
        WorkerInfo("w1", "host-a", os.getpid(), ("jobs",), 2), engine.store.now()
    )
    workers = client.get("/api/workers", headers=AUTH).json()["workers"]
    assert [(w["id"], w["host"], w["queues"]) for w in workers] == [("w1", "host-a", ["jobs"])]
    assert workers[0]["heartbeat_at"].endswith("+00:00")
    # pause: shown in /api/queues and as the reason a run waits
    assert client.post("/api/queues/jobs/pause", headers=AUTH).json()["paused"] is True
    jobs = next(
        q for q in client.get("/api/queues", headers=AUTH).json()["queues"] if q["name"] == "jobs"
    )
    assert jobs["paused"] is True
    shown = client.get(f"/api/runs/{sent.json()['runs'][0]}", headers=AUTH).json()
    assert shown["blocked_by"] == {"reason": "queue_paused", "detail": "queue jobs is paused"}
    assert client.post("/api/queues/nope/pause", headers=AUTH).status_code == 404
    assert client.post("/api/queues/jobs/resume", headers=AUTH).json()["paused"] is False
    # bulk: a filter, or ids; an empty one is refused
    assert client.post("/api/runs/cancel", json={}, headers=AUTH).status_code == 422
    cancelled = client.post(
        "/api/runs/cancel", json={"filter": {"tag": ["tenant:a"]}}, headers=AUTH
    )
    assert cancelled.json() == {"count": 2}
    again = client.post("/api/runs/cancel", json={"filter": {"tag": ["tenant:a"]}}, headers=AUTH)
    assert again.json() == {"count": 0}
    replayed = client.post("/api/runs/replay", json={"ids": [run["id"]]}, headers=AUTH)
    assert replayed.status_code == 201 and replayed.json()["count"] == 1
    new = client.get(f"/api/runs/{replayed.json()['runs'][0]}", headers=AUTH).json()
    assert new["trigger"]["replay_of"] == run["id"] and new["tags"] == ["tenant:a"]
    statuses = client.get(
        "/api/runs", params=[("status", "queued"), ("status", "cancelled")], headers=AUTH
    ).json()["runs"]
    assert sorted(r["status"] for r in statuses) == ["cancelled", "cancelled", "queued", "queued"]


def test_bulk_actions_take_as_many_ids_as_the_api_allows(
    client: TestClient, engine: Engine
) -> None:
    """70,000 ids (the API takes up to 100,000; short ones fit its 1 MiB body) were one IN
    list of 70,000 parameters: a 503 "database" error on PostgreSQL, which takes at most
    65,535. They go in slices."""
    queued = [engine.trigger("marked", {"n": i}, delay=3600).run_ids[0] for i in range(2)]
    ids = [f"n{i}" for i in range(70_000)]
    ids[5] = queued[0]
    ids[-5] = queued[1]
    replayed = client.post("/api/runs/replay", json={"ids": [*ids, queued[0]]}, headers=AUTH)
    assert replayed.status_code == 201, replayed.text
    assert replayed.json()["count"] == 2  # each once, though given twice
    cancelled = client.post("/api/runs/cancel", json={"ids": ids}, headers=AUTH)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {"count": 2}
    assert {engine.store.get_run(i).status.value for i in queued} == {"cancelled"}
