"""The dashboard's forms and pages through the real ASGI app, on SQLite and PostgreSQL: every
new form needs this session's CSRF token, bulk actions refuse to act on every run, user
mistakes are the page again with a message naming the field and nothing stored, and a resume
racing another resume reopens the run once. The pure parts (relative times, the form from a
schema, box sizes) are tested as functions."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dsl import Machine
from engine.errors import EngineError, PayloadInvalid
from engine.models import Run, RunFilter, RunStatus
from engine.pauses import pause_at
from engine.registry import import_modules
from engine.server import create_app
from engine.server.pictures import _box_label, _box_width, _fit, machine_svg
from engine.server.ui import form_fields, payload_from_form, relative, step_status, time_tag
from engine.service import Engine
from engine.settings import resolve_settings

FLOWS = Path(__file__).parent / "flows"
BASE = "http://127.0.0.1:8080"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["uisteps"], str(FLOWS))
    e = Engine(resolve_settings(db=db_url, workflows=str(FLOWS)), import_steps=False)
    e.save_all_definitions()
    yield e
    e.close()


@pytest.fixture
def client(engine: Engine) -> TestClient:
    return TestClient(create_app(engine, None, port=8080), base_url=BASE)


def _csrf(client: TestClient, path: str = "/") -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert found
    return found.group(1)


def _failed_flaky(engine: Engine, tmp_path: Path) -> str:
    run = engine.run(engine.workflow("flaky"), {"flag": str(tmp_path / "missing")})
    assert run.status == RunStatus.FAILED
    return run.id


def test_every_new_form_needs_the_sessions_token(
    client: TestClient, engine: Engine, tmp_path: Path
) -> None:
    failed = _failed_flaky(engine, tmp_path)
    queued = engine.trigger("later", {}, delay=3600).run_ids[0]
    forms = {
        "/runs/bulk": {"action": "cancel", "ids": queued, "confirmed": "yes"},
        "/queues/pause": {"queue": "later"},
        "/queues/resume": {"queue": "later"},
        "/workflows/form/trigger": {"f.title": "abc", "f.count": "1"},
        f"/runs/{failed}/resume": {},
    }
    _csrf(client)  # the session exists; its token is not sent
    for path, data in forms.items():
        answer = client.post(path, data={**data, "csrf": "forged"}, headers={"origin": BASE})
        assert answer.status_code == 400 and "CSRF" in answer.text, path
    assert engine.store.get_run(queued).status == RunStatus.QUEUED
    assert engine.store.get_run(failed).status == RunStatus.FAILED
    assert engine.count_runs(RunFilter(workflow_id="form")) == 0
    assert not next(q for q in engine.store.queue_stats() if q["name"] == "later")["paused"]


def test_bulk_actions_need_a_selection_or_a_filter(client: TestClient, engine: Engine) -> None:
    queued = [engine.trigger("later", {}, delay=3600, tags=["k:v"]).run_ids[0] for _ in range(2)]
    csrf = _csrf(client)
    everything = client.post("/runs/bulk", data={"csrf": csrf, "action": "cancel"})
    assert everything.status_code == 400
    assert "select runs or set a filter first" in everything.text
    bad_time = client.post(
        "/runs/bulk", data={"csrf": csrf, "action": "cancel", "since": "yesterday"}
    )
    assert bad_time.status_code == 400 and "since" in bad_time.text
    # the confirmation page counts; only `confirmed` acts
    ask = client.post("/runs/bulk", data={"csrf": csrf, "action": "cancel", "tag": "k:v"})
    assert ask.status_code == 200 and "Cancel 2 runs?" in ask.text
    assert {engine.store.get_run(i).status for i in queued} == {RunStatus.QUEUED}
    done = client.post(
        "/runs/bulk",
        data={"csrf": csrf, "action": "cancel", "tag": "k:v", "confirmed": "yes"},
        follow_redirects=False,
    )
    assert done.status_code == 303 and "cancelled=2" in done.headers["location"]
    assert {engine.store.get_run(i).status for i in queued} == {RunStatus.CANCELLED}
    replayed = client.post(
        "/runs/bulk",
        data={"csrf": csrf, "action": "replay", "ids": queued[0], "confirmed": "yes"},
        follow_redirects=False,
    )
    assert "replayed=1" in replayed.headers["location"]
    # a filter the store cannot use is the runs page with the message, not a 500
    page = client.get("/?since=soon&tag=novalue")
    assert page.status_code == 200 and 'id="filter-error"' in page.text
    # the notice after a bulk action, forged: `²` passed isdigit() and crashed int() (a 500)
    for forged in ("²", "9" * 5000, "-1", "x"):
        page = client.get("/", params={"cancelled": forged})
        assert page.status_code == 200 and ("Cancelled 9" in page.text) == (forged[0] == "9")
    assert "Cancelled 2 runs." in client.get("/?cancelled=2").text


def test_trigger_form_mistakes_store_nothing(client: TestClient, engine: Engine) -> None:
    csrf = _csrf(client, "/workflows/form")
    cases = {
        "payload.count": {"f.title": "abc", "f.count": "many"},
        "payload JSON": {"f.title": "abc", "f.count": "1", "payload": "{not json"},
        "payload.title": {"f.title": "ab", "f.count": "1"},
    }
    for field, data in cases.items():
        page = client.post("/workflows/form/trigger", data={**data, "csrf": csrf})
        assert page.status_code == 400 and field in page.text, field
        assert 'value="abc"' in page.text or 'value="ab"' in page.text  # what was typed
    # the JSON textarea parsed by the input boundary: too deep was a RecursionError (a 500)
    for text, problem in (("[" * 100_000, "nested more than"), ('{"a": NaN}', "NaN")):
        data = {"f.title": "abc", "f.count": "1", "payload": text, "csrf": csrf}
        page = client.post("/workflows/form/trigger", data=data)
        assert page.status_code == 400 and "payload JSON" in page.text and problem in page.text
    deep_choice = {"f.title": "abc", "f.count": "1", "f.size": "[" * 100_000, "csrf": csrf}
    page = client.post("/workflows/form/trigger", data=deep_choice)
    assert page.status_code == 400 and "payload.size" in page.text
    assert engine.count_runs(RunFilter(workflow_id="form")) == 0
    ok = client.post(
        "/workflows/form/trigger",
        data={"csrf": csrf, "f.title": "abc", "f.count": "2", "f.size": '"small"', "tags": "a:b"},
        follow_redirects=False,
    )
    run = engine.store.get_run(ok.headers["location"].rsplit("/", 1)[1])
    assert run.payload == {"title": "abc", "count": 2, "size": "small"} and run.tags == ("a:b",)
    assert client.post("/queues/pause", data={"csrf": csrf, "queue": "nope"}).status_code == 404


def test_a_resume_racing_another_reopens_the_run_once(engine: Engine, tmp_path: Path) -> None:
    """Two resume clicks (two browsers, or a double click) both pass the status check; the
    store reopens the run under its lock only while it is failed, so the second changes
    nothing: one more attempt, not two."""
    run_id = _failed_flaky(engine, tmp_path)
    other_done: list[Run] = []
    clicked: list[bool] = []

    def other_click() -> None:  # the other click, between this one's check and its write
        if not clicked:
            clicked.append(True)
            other_done.append(engine.queue_resume(run_id))

    with pause_at("service.resume.checked", other_click):
        engine.queue_resume(run_id)
    assert other_done and other_done[0].status == RunStatus.WAITING
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.WAITING and run.current_step == "needs_flag"
    (state,) = [s for s in engine.store.get_steps(run_id) if s.step_key == "needs_flag"]
    assert state.status.value == "retrying" and state.attempts == 1
    with pytest.raises(EngineError, match="only a failed run resumes"):
        engine.queue_resume(run_id)
    # a worker finishes it once the cause is fixed
    (tmp_path / "missing").write_text("fixed")
    assert engine.resume(run_id).status == RunStatus.COMPLETED


@pytest.mark.parametrize(
    ("ago", "text"),
    [
        (0, "just now"),
        (4, "just now"),
        (42, "42 s ago"),
        (180, "3 min ago"),
        (7300, "2 h ago"),
        (3 * 86400, "3 d ago"),
        (-300, "in 5 min"),
    ],
)
def test_relative_times(ago: float, text: str) -> None:
    assert relative(1_000_000 - ago, 1_000_000) == text


def test_time_tag_and_step_status() -> None:
    tag = str(time_tag("2026-12-02T07:00:00+00:00", 1_796_194_800 + 180))
    assert 'title="2026-12-02 07:00:00 UTC"' in tag and ">3 min ago<" in tag
    assert str(time_tag(None, 0)) == "-"
    assert step_status("failed", "pending") == "not reached"
    assert step_status("running", "pending") == "pending"
    assert step_status("failed", "skipped") == "skipped"


def test_form_fields_from_a_schema() -> None:
    schema = Machine.from_json(
        Engine(resolve_settings(workflows=str(FLOWS)), import_steps=False)
        .workflow("form")
        .to_json()
    ).schema
    fields, rest = form_fields(schema)
    assert [(f["name"], f["kind"], f["required"]) for f in fields] == [
        ("title", "string", True),
        ("count", "integer", True),
        ("ratio", "number", False),
        ("urgent", "boolean", False),
        ("size", "enum", False),
    ]
    assert rest  # `tags` (an array) goes in the JSON textarea
    form = {"f.title": "t", "f.count": "4", "f.ratio": "0.5", "f.urgent": "false", "f.size": ""}
    assert payload_from_form("form", fields, form, '{"tags": []}') == {
        "tags": [],
        "title": "t",
        "count": 4,
        "ratio": 0.5,
        "urgent": False,
    }
    with pytest.raises(PayloadInvalid, match=r"payload\.ratio"):
        payload_from_form("form", fields, {"f.ratio": "half"}, None)
    assert form_fields(None) == ([], True)
    assert (
        form_fields(
            {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "additionalProperties": False,
            }
        )[1]
        is False
    )


def test_diagram_boxes_fit_their_labels() -> None:
    labels = ["short: log", "x" * 30 + ": call some.function · timeout 10m"]
    width = _box_width(labels)
    assert all(_fit(label, width) == label for label in labels)
    assert _fit("y" * 300, _box_width(["y" * 300])).endswith("…")
    engine = Engine(resolve_settings(workflows=str(FLOWS)), import_steps=False)
    svg = machine_svg(engine.workflow("boom"))
    assert svg.count('class="retry-loop"') == 1 and "&#215;2" in svg
    review = engine.workflow("review")
    assert 'class="state wait"' in machine_svg(review)
    assert "timeout 1h" in _box_label(review.state("approval"))


def test_the_runs_change_stream_needs_a_session_and_says_what_changed(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.server import dashboard_runs

    monkeypatch.setattr(dashboard_runs, "STREAM_SECONDS", 1.0)
    client = TestClient(create_app(engine, "k3y", port=8080), base_url=BASE)
    refused = client.get("/partials/runs/events", follow_redirects=False)
    assert refused.status_code == 303 and refused.headers["location"] == "/login"
    client.post("/login", data={"key": "k3y"}, headers={"origin": BASE})
    page = client.get("/?workflow=later")
    shown = re.search(r'data-seen="([0-9a-f]+)"', page.text)
    assert shown
    quiet = client.get(f"/partials/runs/events?workflow=later&seen={shown.group(1)}")
    assert quiet.headers["content-type"].startswith("text/event-stream")
    assert "event: run" not in quiet.text  # nothing changed since the page was rendered
    engine.trigger("later", {}, delay=3600)
    moved = client.get(f"/partials/runs/events?workflow=later&seen={shown.group(1)}")
    assert moved.text.count("event: run") == 1  # at once: the page is behind
