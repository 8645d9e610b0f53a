"""The dashboard: server-rendered pages (Jinja2), a little plain JavaScript (static/dash.js)
for relative times, selections and live updates over Server-Sent Events, forms for cancel,
replay, resume, triggering a run and waiting human steps. No build step.

The runs and queues pages live in `dashboard_runs.py`; this module holds the shared
rendering, sign-in, a run's page and the workflow pages."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from markupsafe import Markup

from dsl import Machine, render_graph
from dsl.limits import INT_MAX

from ..errors import ConfigError, EngineError
from ..inputs import parse_json
from ..models import Run
from ..service import Engine
from ..views import iso, log_view, run_detail, run_summary, schedule_views
from . import dashboard_runs
from .pictures import machine_svg, timeline_svg
from .rendering import (
    STATIC,
    LoginRequired,
    _guard,
    _guard_post,
    _render,
    _set_session,
    templates,
)
from .security import COOKIE, Keys
from .ui import form_fields, payload_from_form, step_status, waiting_for

__all__ = ["LoginRequired", "_render", "router", "templates"]

router = APIRouter(include_in_schema=False)
router.include_router(dashboard_runs.router)
LOG_PAGE = 100  # log lines per run page; "More logs" pages through the rest


@router.get("/static/dash.js")
def script() -> Response:
    return Response(
        (STATIC / "dash.js").read_text(encoding="utf-8"),
        media_type="text/javascript",
        headers={"cache-control": "no-cache"},
    )


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return _render(request, "login.html", error=None)


@router.post("/login")
def login(request: Request, key: str = Form("")) -> Response:
    keys: Keys = request.app.state.keys
    if not keys.required:
        return RedirectResponse("/", 303)
    if not keys.key_ok(key):
        return _render(request, "login.html", status_code=401, error="That is not the API key.")
    response = RedirectResponse("/", 303)
    _set_session(response, keys.new_session())
    return response


@router.post("/logout")
def logout(request: Request, csrf: str = Form("")) -> Response:
    _guard_post(request, csrf)
    response = RedirectResponse("/login" if request.app.state.keys.required else "/", 303)
    response.delete_cookie(COOKIE, path="/")
    return response


# a run ------------------------------------------------------------------------------------
def _waiting(detail: dict[str, Any]) -> dict[str, Any] | None:
    """The step of a waiting run and what it waits for."""
    for step in detail["steps"]:
        if step["status"] in ("waiting", "retrying"):
            info = waiting_for(step.get("wait"), step.get("wake_at"), step["id"])
            if step["status"] == "retrying":
                info = {**info, "text": "a retry", "until_word": "at"}
            return {**info, **(step.get("wait") or {}), **_person(step), "step": step["id"]}
    return None


def _person(step: dict[str, Any]) -> dict[str, Any]:
    """A wait_for_any with a token alternative waits for a person too: that token (answering
    it wins the wait, if nothing else did first)."""
    wait = step.get("wait") or {}
    if wait.get("kind") != "any":
        return {}
    token = next((a for a in wait.get("alternatives") or [] if a["kind"] == "token"), None)
    return {"token": token["token"], "alternative": token["name"]} if token else {}


def _replays(engine: Engine, run: Run) -> list[dict[str, Any]]:
    """Replays of `run` (newest first) among the 200 runs of its workflow created since it."""
    later = engine.store.list_runs(workflow_id=run.workflow_id, since=run.created_at, limit=200)
    return [run_summary(r) for r in later if r.trigger.get("replay_of") == run.id]


def _resumable(engine: Engine, run: Run) -> bool:
    """A failed run whose failure was one of its main steps (what `queue_resume` retries;
    not a failure a catch took, after which the run failed on its output, say)."""
    return run.status.value == "failed" and engine.resume_point_of(run) is not None


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(
    request: Request, run_id: str, logs_after: Annotated[int, Query(ge=0, le=INT_MAX)] = 0
) -> HTMLResponse:
    engine, _ = _guard(request)
    run = engine.store.get_run(run_id)
    detail = run_detail(engine.store, run)
    for step in detail["steps"]:
        step["sig"] = f"{step['status']}:{step['attempts']}"  # as the event stream sends it
        step["status"] = step_status(detail["status"], step["status"])
    logs = [log_view(e) for e in engine.store.get_logs(run_id, logs_after, LOG_PAGE + 1)]
    more_logs = logs[LOG_PAGE - 1]["id"] if len(logs) > LOG_PAGE else None
    # the newest line this page shows; with more pages, new lines are not on this one
    last_log = INT_MAX if more_logs else (logs[-1]["id"] if logs else logs_after)
    waiting = _waiting(detail) if run.status.value == "waiting" else None
    children = [run_summary(c) for c in engine.store.list_runs(parent_run_id=run_id, limit=100)]
    return _render(
        request,
        "run.html",
        page="runs",
        run=detail,
        logs=logs[:LOG_PAGE],
        more_logs=more_logs,
        logs_after=logs_after,
        waiting=waiting,
        children=children,
        replay_of=run.trigger.get("replay_of"),
        replays=_replays(engine, run),
        resumable=_resumable(engine, run),
        timeline=Markup(timeline_svg(detail)),
        active=not run.finished,
        last_log=last_log,
        sig="|".join([detail["status"], detail["current_step"] or "", detail["finished_at"] or ""]),
        run_stream="" if run.finished else f"/api/runs/{run_id}/events?after={last_log}",
    )


@router.post("/runs/{run_id}/cancel")
def cancel(request: Request, run_id: str, csrf: str = Form("")) -> Response:
    engine = _guard_post(request, csrf)
    engine.store.request_cancel(run_id, engine.store.now())
    return RedirectResponse(f"/runs/{run_id}", 303)


@router.post("/runs/{run_id}/replay")
def replay(request: Request, run_id: str, csrf: str = Form("")) -> Response:
    engine = _guard_post(request, csrf)
    return RedirectResponse(f"/runs/{engine.queue_replay(run_id)}", 303)


@router.post("/runs/{run_id}/resume")
def resume(request: Request, run_id: str, csrf: str = Form("")) -> Response:
    """One more attempt of the failed step, by a worker (after its cause was fixed)."""
    engine = _guard_post(request, csrf)
    engine.queue_resume(run_id)
    return RedirectResponse(f"/runs/{run_id}", 303)


@router.post("/runs/{run_id}/respond")
def respond(
    request: Request,
    run_id: str,
    csrf: str = Form(""),
    decision: str = Form(""),
    comment: str = Form(""),
    data: str = Form(""),
) -> Response:
    """A human's answer to a waiting step: approve, reject, or JSON data."""
    engine = _guard_post(request, csrf)
    detail = run_detail(engine.store, engine.store.get_run(run_id))
    waiting = next(
        (
            s
            for s in detail["steps"]
            if s["status"] == "waiting"
            and ((s.get("wait") or {}).get("kind") in ("token", "event") or _person(s))
        ),
        None,
    )
    if waiting is None:
        raise ConfigError(f"run {run_id} is not waiting for a person")
    if decision in ("approve", "reject"):
        answer: Any = {"approved": decision == "approve", "comment": comment}
    else:
        answer = parse_json(data or "null", "data")
    wait = {**waiting["wait"], **_person(waiting)}
    if wait["kind"] in ("token", "any"):
        engine.complete_token(wait["token"], answer)
    else:
        payload = {
            **(wait.get("match") or {}),
            **(answer if isinstance(answer, dict) else {"data": answer}),
        }
        engine.send_event(wait["event"], payload)
    return RedirectResponse(f"/runs/{run_id}", 303)


# workflows --------------------------------------------------------------------------------
@router.get("/workflows", response_class=HTMLResponse)
def workflows(request: Request) -> HTMLResponse:
    engine, _ = _guard(request)
    items = [
        {"machine": m, "svg": Markup(machine_svg(m))}
        for m in sorted(engine.catalog.workflows.values(), key=lambda m: m.workflow_id)
    ]
    return _render(
        request,
        "workflows.html",
        page="workflows",
        items=items,
        problems=[str(p) for p in engine.catalog.problems],
    )


def _workflow_page(
    request: Request,
    engine: Engine,
    machine: Machine,
    values: dict[str, str] | None = None,
    error: str | None = None,
) -> HTMLResponse:
    fields, rest = form_fields(machine.schema)
    recent = [run_summary(r) for r in engine.store.list_runs(workflow_id=machine.workflow_id)]
    return _render(
        request,
        "workflow.html",
        status_code=400 if error else 200,
        page="workflows",
        m=machine,
        svg=Markup(machine_svg(machine)),
        mermaid=render_graph(machine),
        fields=fields,
        rest=rest,
        values=values or {},
        error=error,
        recent=recent[:20],
        cron=machine.trigger.kind == "cron",
    )


@router.get("/workflows/{workflow_id}", response_class=HTMLResponse)
def workflow_page(request: Request, workflow_id: str) -> HTMLResponse:
    engine, _ = _guard(request)
    return _workflow_page(request, engine, engine.workflow(workflow_id))


@router.post("/workflows/{workflow_id}/trigger")
async def trigger(request: Request, workflow_id: str) -> Response:
    """Queue a run from the form generated from the workflow's payload schema; a payload
    the schema refuses re-shows the form with the message and the values typed."""
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    engine = _guard_post(request, form.get("csrf", ""))
    machine = engine.workflow(workflow_id)
    fields, rest = form_fields(machine.schema)
    try:
        payload = payload_from_form(
            workflow_id, fields, form, form.get("payload") if rest else None
        )
        if machine.trigger.kind == "cron" and payload == {} and not fields:
            payload = None  # the cron payload a scheduled fire would get
        tags = form.get("tags", "").replace(",", " ").split()
        sent = engine.trigger(workflow_id, payload, tags=tags or None)
    except EngineError as exc:
        return _workflow_page(request, engine, machine, form, str(exc))
    return RedirectResponse(f"/runs/{sent.run_ids[0]}", 303)


@router.get("/schedules", response_class=HTMLResponse)
def schedules(request: Request) -> HTMLResponse:
    engine, _ = _guard(request)
    return _render(
        request, "schedules.html", page="schedules", schedules=schedule_views(engine, time.time())
    )


@router.get("/workers", response_class=HTMLResponse)
def workers(request: Request) -> HTMLResponse:
    engine, _ = _guard(request)
    now = engine.store.now()
    rows = [
        {
            **w,
            "started": iso(w["started_at"]),
            "heartbeat": iso(w["heartbeat_at"]),
            "stale_in": max(0.0, w["heartbeat_at"] + w["lease_seconds"] - now),
        }
        for w in engine.store.list_workers(now)
    ]
    return _render(request, "workers.html", page="workers", workers=rows)
