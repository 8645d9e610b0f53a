"""`GET /api/runs/{id}/events` (SSE) through the real ASGI app, on SQLite and PostgreSQL,
while a real worker executes the run: the log line of a step that is still working arrives
before the step ends, then the step's end, the run's end and `event: end`."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from engine.registry import import_modules
from engine.server import create_app
from engine.service import Engine
from engine.settings import resolve_settings
from engine.worker import Worker

LIVE = Path(__file__).parent / "live"
KEY = "live-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["livesteps"], str(LIVE))
    e = Engine(resolve_settings(db=db_url, workflows=str(LIVE)), import_steps=False)
    e.save_all_definitions()
    yield e
    e.close()


@pytest.fixture
def client(engine: Engine) -> TestClient:
    app = create_app(engine, KEY)
    app.state.sse_poll_seconds = 0.05
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    import livesteps  # type: ignore[import-not-found]

    livesteps.GATE.clear()
    yield livesteps.GATE
    livesteps.GATE.set()


@pytest.fixture
def worker(engine: Engine) -> Iterator[Worker]:
    w = Worker(engine, concurrency=1, poll_interval=0.05, grace=5, schedules=False)
    w.start()
    yield w
    w.stop()
    w.shutdown()


def events(lines: Iterator[str]) -> Iterator[tuple[str, Any, str | None]]:
    """(event, data, id) of each Server-Sent Event; comments and `retry:` skipped."""
    name, data, event_id = None, [], None
    for line in lines:
        if line == "":
            if name is not None:
                yield name, json.loads("\n".join(data)), event_id
            name, data, event_id = None, [], None
        elif line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif line.startswith("id: "):
            event_id = line[len("id: ") :]


def test_a_run_streams_as_it_happens(
    client: TestClient, engine: Engine, gate: threading.Event, worker: Worker
) -> None:
    (run_id,) = engine.send_event("gated.requested", {"label": "lamp"}).run_ids
    seen: list[tuple[str, Any, str | None]] = []
    with client.stream("GET", f"/api/runs/{run_id}/events", headers=AUTH) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in events(response.iter_lines()):
            seen.append(event)
            name, data, _ = event
            if name == "log" and data["message"] == "working on lamp":
                # the step is still working (it waits for this gate): nothing ended yet
                assert not any(n == "step" and d["status"] == "completed" for n, d, _ in seen)
                assert not any(n == "end" for n, _, _ in seen)
                gate.set()
    names = [n for n, _, _ in seen]
    assert names[-1] == "end" and seen[-1][1] == {"status": "completed"}
    assert names.count("end") == 1
    statuses = [d["status"] for n, d, _ in seen if n == "run"]
    assert statuses[-1] == "completed" and "running" in statuses
    assert all(d["id"] == run_id for n, d, _ in seen if n == "run")
    work = [d["status"] for n, d, _ in seen if n == "step" and d["id"] == "work"]
    assert "running" in work and work[-1] == "completed"
    assert [d["status"] for n, d, _ in seen if n == "step" and d["id"] == "after"][-1] == (
        "completed"
    )
    logs = [(d["message"], d["step"], i) for n, d, i in seen if n == "log"]
    assert [m for m, _, _ in logs] == ["working on lamp", "done with lamp", "quick step ran"]
    assert [s for _, s, _ in logs] == ["work", "work", "after"]
    ids = [int(i or 0) for _, _, i in logs]
    assert ids == sorted(ids) and len(set(ids)) == 3
    first_log = names.index("log")
    assert names.index("end") > first_log
    # each state is sent once: no duplicate consecutive step events
    steps = [(d["id"], d["status"], d["attempts"]) for n, d, _ in seen if n == "step"]
    assert len(steps) == len(set(steps))

    # a reconnect with Last-Event-ID gets the state again and only the later lines
    again = client.get(f"/api/runs/{run_id}/events", headers={**AUTH, "Last-Event-ID": str(ids[0])})
    replayed = list(events(iter(again.text.splitlines())))
    assert [d["message"] for n, d, _ in replayed if n == "log"] == [
        "done with lamp",
        "quick step ran",
    ]
    assert replayed[0][0] == "run" and replayed[-1] == ("end", {"status": "completed"}, None)
    later = client.get(f"/api/runs/{run_id}/events?after={ids[-1]}", headers=AUTH)
    assert [n for n, _, _ in events(iter(later.text.splitlines()))].count("log") == 0


def test_events_need_the_key_or_the_session_and_a_known_run(
    client: TestClient, engine: Engine
) -> None:
    (run_id,) = engine.send_event("gated.requested", {"label": "x"}).run_ids
    assert client.get(f"/api/runs/{run_id}/events").status_code == 401
    wrong = client.get(f"/api/runs/{run_id}/events", headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401
    missing = client.get("/api/runs/nope/events", headers=AUTH)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    bad = client.get(f"/api/runs/{run_id}/events?after=-1", headers=AUTH)
    assert bad.status_code == 422
    # the dashboard's session cookie is accepted like the key
    login = client.post("/login", data={"key": KEY}, follow_redirects=False)
    assert login.status_code in (302, 303), login.text
    engine.store.request_cancel(run_id, engine.store.now())  # ends it: the stream closes
    done = client.get(f"/api/runs/{run_id}/events")
    assert done.status_code == 200
    seen = list(events(iter(done.text.splitlines())))
    assert seen[0][0] == "run" and seen[0][1]["status"] == "cancelled"
    assert seen[-1] == ("end", {"status": "cancelled"}, None)


@pytest.mark.parametrize("forged", ["9" * 5000, "99999999999999999999", "²", "-5", "1e9", "x"])
def test_a_forged_last_event_id_is_a_stream_not_a_500(
    client: TestClient, engine: Engine, forged: str
) -> None:
    """A resuming client sends back the last `id:` it got. One no stream sent (5,000 digits
    crashed `int()`, a 500) is a number too large (nothing after it) or is ignored."""
    run_id = engine.run(engine.workflow("quick"), {}).id  # ended: the stream closes
    answer = client.get(
        f"/api/runs/{run_id}/events",
        headers={**AUTH, "Last-Event-ID": forged.encode("latin-1")},
    )
    assert answer.status_code == 200, answer.text
    seen = list(events(iter(answer.text.splitlines())))
    logs = [data["message"] for name, data, _ in seen if name == "log"]
    assert logs == ([] if forged.isascii() and forged.isdigit() else ["quick step ran"])
    assert seen[-1] == ("end", {"status": "completed"}, None)


@pytest.mark.parametrize("after", [2**31, 2**63 - 1])
def test_a_log_id_beyond_any_stored_one_ends_the_stream(
    client: TestClient, engine: Engine, after: int
) -> None:
    """On PostgreSQL an `after` past the `integer` log ids was an error on every poll: the
    stream of a finished run never ended (and `/logs` answered with a storage error)."""
    run_id = engine.run(engine.workflow("quick"), {}).id
    answer = client.get(f"/api/runs/{run_id}/events?after={after}", headers=AUTH)
    assert answer.status_code == 200
    seen = list(events(iter(answer.text.splitlines())))
    assert [n for n, _, _ in seen].count("log") == 0
    assert seen[-1] == ("end", {"status": "completed"}, None)
    logs = client.get(f"/api/runs/{run_id}/logs?after={after}", headers=AUTH)
    assert logs.status_code == 200 and logs.json() == {"logs": [], "next_after": None}


def test_a_run_deleted_while_streamed_ends_the_stream(client: TestClient, engine: Engine) -> None:
    import sqlalchemy as sa

    from engine.store import schema as t

    (run_id,) = engine.send_event("gated.requested", {"label": "gone"}).run_ids
    seen = []
    with client.stream("GET", f"/api/runs/{run_id}/events", headers=AUTH) as response:
        for event in events(response.iter_lines()):
            seen.append(event)
            if event[0] == "run":  # queued, and no worker: delete it (as a purge would)
                with engine.store.engine.begin() as c:
                    c.execute(sa.delete(t.runs).where(t.runs.c.id == run_id))
    assert seen[0][0] == "run" and seen[0][1]["status"] == "queued"
    assert seen[-1] == ("end", {"status": None, "error": f"run {run_id} no longer exists"}, None)


def test_log_ids_commit_in_order_while_a_heartbeat_races_a_commit(db_url: str) -> None:
    """Reading a run's logs by id skips nothing: a heartbeat writing lines while the step's
    commit holds the run (paused after its locks) waits for it, so its lines get the later
    ids and a poller that saw nothing in between misses nothing afterwards."""
    import os
    import time

    from engine.follow import follow_logs
    from engine.models import Lease, NewLog, NewRun, RunStatus, StepRecord, StepStatus, Transition
    from engine.pauses import pause_at
    from engine.store import open_store

    store = open_store(db_url)
    store.save_definition("h1", "wf", "1", {"any": "machine"}, "wf.yaml")
    lease = Lease("racer", "host", os.getpid())
    new = NewRun("r1", "wf", "1", "h1", {}, "s1", "q")
    now = store.now()
    store.create_run(new, now, lease)
    locked, go = threading.Event(), threading.Event()

    def hold() -> None:
        locked.set()
        assert go.wait(30)

    record = StepRecord("s1", StepStatus.COMPLETED, 1, now, output=1)
    move = Transition(
        RunStatus.RUNNING,
        record,
        current_step="s2",
        begin_attempt=1,
        logs=(NewLog("info", "from the commit", "s1", 1),),
    )
    with pause_at("store.commit.run_locked", hold):
        commit = threading.Thread(target=store.commit_transition, args=("r1", lease, move, now + 1))
        commit.start()
        assert locked.wait(30)
        beat = threading.Thread(
            target=store.heartbeat,
            args=("r1", lease, now + 1, [NewLog("info", "from the heartbeat", "s2", 1)]),
        )
        beat.start()
        time.sleep(0.3)  # the heartbeat is at the run's lock now (or at SQLite's write lock)
        assert store.get_logs("r1") == []  # a poller sees nothing yet ...
        go.set()
        commit.join(30)
        beat.join(30)
    entries = store.get_logs("r1")
    # ... and then both lines, the commit's first: none committed behind a later id
    assert [e.message for e in entries] == ["from the commit", "from the heartbeat"]
    store.commit_transition(
        "r1",
        lease,
        Transition(RunStatus.COMPLETED, StepRecord("s2", StepStatus.COMPLETED, 1, now), output=1),
        now + 2,
    )
    assert [e.message for e in follow_logs(store, "r1", poll=0.01)] == [
        "from the commit",
        "from the heartbeat",
    ]
    store.close()


def test_lines_a_heartbeat_took_are_not_lost_when_the_run_ends_meanwhile(
    engine: Engine, gate: threading.Event, worker: Worker
) -> None:
    """The heartbeat thread takes a step's waiting lines, and before it writes them the step
    returns and the run commits its end (the lease goes with it): the lines reach the store
    all the same, in the order they were logged."""
    import time

    from engine.pauses import pause_at

    held: list[str] = []

    def race() -> None:
        if held:
            return
        held.append("once")
        gate.set()  # the step goes on while these lines are held here
        deadline = time.monotonic() + 1.0  # (the run ends in this second unless it waits)
        while not engine.store.get_run(run_id).finished and time.monotonic() < deadline:
            time.sleep(0.02)

    with pause_at("runner.heartbeat.drained", race):
        (run_id,) = engine.send_event("gated.requested", {"label": "lamp"}).run_ids
        deadline = time.monotonic() + 30
        while not engine.store.get_run(run_id).finished and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # the heartbeat writes what it held, if it can
    assert held, "the heartbeat never flushed the step's first line"
    assert engine.store.get_run(run_id).status.value == "completed"
    assert [e.message for e in engine.store.get_logs(run_id)] == [
        "working on lamp",
        "done with lamp",
        "quick step ran",
    ]


def test_sigterm_ends_open_streams_and_serve_exits_at_once(db_url: str) -> None:
    """A real `serve` with a run's event stream and the runs page's change stream open, on
    a run that stays queued (no worker): SIGTERM ends both streams cleanly and the process
    exits well inside uvicorn's grace (before, the run's stream held it up for good and the
    page's for up to 15 s)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "DURABLE_YAML_DB": db_url, "DURABLE_YAML_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--port", str(port), "--workflows", str(LIVE)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ended: dict[str, str] = {}
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30)
        for _ in range(300):  # until uvicorn listens
            try:
                client.get("/healthz")
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.05)
        made = client.post("/api/workflows/later/runs", json={"payload": {}})
        assert made.status_code == 201, made.text
        assert client.post("/login", data={"key": KEY}).status_code == 303  # session cookie
        opened = threading.Barrier(3)

        def read(name: str, url: str) -> None:
            try:
                with client.stream("GET", url) as response:
                    assert response.status_code == 200
                    opened.wait(10)
                    for _line in response.iter_lines():
                        pass
                ended[name] = "closed"
            except httpx.HTTPError as exc:
                ended[name] = type(exc).__name__

        readers = [
            threading.Thread(target=read, args=("run", f"/api/runs/{made.json()['id']}/events")),
            threading.Thread(target=read, args=("page", "/partials/runs/events")),
        ]
        for r in readers:
            r.start()
        opened.wait(10)
        time.sleep(0.3)  # both streams are in their poll loops
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - started
        for r in readers:
            r.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert took < 3.0, f"serve took {took:.1f}s to exit on SIGTERM"
    assert ended == {"run": "closed", "page": "closed"}
    assert "Traceback" not in err
    assert proc.returncode == 0, err  # stopped as asked, after closing its database
    if db_url.startswith("sqlite:///"):
        assert not os.path.exists(db_url.removeprefix("sqlite:///") + "-wal")
