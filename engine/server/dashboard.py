"""The dashboard: server-rendered pages (Jinja2), a little plain JavaScript for live updates,
forms for cancel, replay and waiting human steps. No build step."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from dsl import render_graph
from dsl.limits import INT_MAX

from ..errors import ConfigError
from ..inputs import parse_json
from ..models import RunStatus
from ..service import Engine
from ..views import log_view, run_detail, run_summary, schedule_views
from .api import decode_cursor, encode_cursor
from .pictures import machine_svg, timeline_svg
from .security import COOKIE, SESSION_SECONDS, Keys

__all__ = ["router"]

LOG_PAGE = 100  # log lines per run page; "More logs" pages through the rest
templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
)
templates.filters["json"] = lambda v: json.dumps(v, indent=2, default=str)
templates.filters["short"] = lambda v: (v or "")[:19].replace("T", " ")
router = APIRouter(include_in_schema=False)


class LoginRequired(Exception):
    pass


def _render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render a page; without an API key a browser's first page starts its session."""
    keys: Keys = request.app.state.keys
    cookie = request.cookies.get(COOKIE)
    fresh = None
    if not keys.required and not keys.session_ok(cookie):
        cookie = fresh = keys.new_session()
    html = templates.get_template(name).render(
        request=request, csrf=keys.csrf_token(cookie), auth=keys.required, **context
    )
    response = HTMLResponse(html, status_code)
    if fresh is not None:
        _set_session(response, fresh)
    return response


def _set_session(response: Response, value: str) -> None:
    response.set_cookie(
        COOKIE, value, max_age=SESSION_SECONDS, httponly=True, samesite="strict", path="/"
    )


def _guard(request: Request) -> tuple[Engine, Keys]:
    keys: Keys = request.app.state.keys
    if keys.required and not keys.session_ok(request.cookies.get(COOKIE)):
        raise LoginRequired()
    return request.app.state.engine, keys


def _guard_post(request: Request, csrf: str) -> Engine:
    """A form that changes something: its CSRF token must be this session's (any mode)."""
    engine, keys = _guard(request)
    if not keys.csrf_ok(request.cookies.get(COOKIE), csrf):
        raise ConfigError("the form is stale (CSRF token mismatch); reload the page and try again")
    return engine


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


def _runs_page(
    engine: Engine, status: str | None, workflow: str | None, cursor: str | None
) -> dict[str, Any]:
    wanted = RunStatus(status) if status in {s.value for s in RunStatus} else None
    before = decode_cursor(cursor) if cursor else None
    runs = engine.store.list_runs(wanted, workflow or None, 51, before)
    page = runs[:50]
    rows = []
    for r in page:
        end = r.finished_at or time.time()
        rows.append(
            {
                **run_summary(r),
                "duration": f"{end - (r.started_at or r.created_at):.1f}s" if r.started_at else "-",
            }
        )
    older = None
    if len(runs) > 50:
        older = urlencode(
            {
                k: v
                for k, v in {
                    "status": status,
                    "workflow": workflow,
                    "cursor": encode_cursor(page[-1].created_at, page[-1].id),
                }.items()
                if v
            }
        )
    return {
        "runs": rows,
        "older": older,
        "status": status or "",
        "workflow": workflow or "",
        "statuses": [s.value for s in RunStatus],
        "workflows": sorted(engine.catalog.workflows),
    }


@router.get("/", response_class=HTMLResponse)
def runs_list(
    request: Request,
    status: str | None = None,
    workflow: str | None = None,
    cursor: str | None = None,
) -> HTMLResponse:
    engine, _ = _guard(request)
    return _render(
        request, "runs.html", page="runs", **_runs_page(engine, status, workflow, cursor)
    )


@router.get("/partials/runs", response_class=HTMLResponse)
def runs_rows(
    request: Request,
    status: str | None = None,
    workflow: str | None = None,
    cursor: str | None = None,
) -> HTMLResponse:
    engine, _ = _guard(request)
    return _render(request, "_runs_rows.html", **_runs_page(engine, status, workflow, cursor))


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(
    request: Request, run_id: str, logs_after: Annotated[int, Query(ge=0, le=INT_MAX)] = 0
) -> HTMLResponse:
    engine, _ = _guard(request)
    run = engine.store.get_run(run_id)
    detail = run_detail(engine.store, run)
    logs = [log_view(e) for e in engine.store.get_logs(run_id, logs_after, LOG_PAGE + 1)]
    more_logs = logs[LOG_PAGE - 1]["id"] if len(logs) > LOG_PAGE else None
    waiting = None
    for step in detail["steps"]:
        wait = step.get("wait") or {}
        if step["status"] == "waiting" and wait.get("kind") in ("token", "event"):
            waiting = {"step": step["id"], **wait}
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
        timeline=Markup(timeline_svg(detail)),
        active=not run.finished,
        version=f"{run.status.value}:{run.updated_at}",
    )


@router.get("/partials/runs/{run_id}/version")
def run_version(request: Request, run_id: str) -> Response:
    engine, _ = _guard(request)
    run = engine.store.get_run(run_id)
    return Response(f"{run.status.value}:{run.updated_at}", media_type="text/plain")


@router.post("/runs/{run_id}/cancel")
def cancel(request: Request, run_id: str, csrf: str = Form("")) -> Response:
    engine = _guard_post(request, csrf)
    engine.store.request_cancel(run_id, engine.store.now())
    return RedirectResponse(f"/runs/{run_id}", 303)


@router.post("/runs/{run_id}/replay")
def replay(request: Request, run_id: str, csrf: str = Form("")) -> Response:
    engine = _guard_post(request, csrf)
    return RedirectResponse(f"/runs/{engine.queue_replay(run_id)}", 303)


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
            if s["status"] == "waiting" and (s.get("wait") or {}).get("kind") in ("token", "event")
        ),
        None,
    )
    if waiting is None:
        raise ConfigError(f"run {run_id} is not waiting for a person")
    if decision in ("approve", "reject"):
        answer: Any = {"approved": decision == "approve", "comment": comment}
    else:
        answer = parse_json(data or "null", "data")
    wait = waiting["wait"]
    if wait["kind"] == "token":
        engine.complete_token(wait["token"], answer)
    else:
        payload = {
            **(wait.get("match") or {}),
            **(answer if isinstance(answer, dict) else {"data": answer}),
        }
        engine.send_event(wait["event"], payload)
    return RedirectResponse(f"/runs/{run_id}", 303)


@router.get("/workflows", response_class=HTMLResponse)
def workflows(request: Request) -> HTMLResponse:
    engine, _ = _guard(request)
    items = [
        {"machine": m, "svg": Markup(machine_svg(m)), "mermaid": render_graph(m)}
        for m in sorted(engine.catalog.workflows.values(), key=lambda m: m.workflow_id)
    ]
    return _render(
        request,
        "workflows.html",
        page="workflows",
        items=items,
        problems=[str(p) for p in engine.catalog.problems],
    )


@router.get("/schedules", response_class=HTMLResponse)
def schedules(request: Request) -> HTMLResponse:
    engine, _ = _guard(request)
    return _render(
        request, "schedules.html", page="schedules", schedules=schedule_views(engine, time.time())
    )


@router.get("/queues", response_class=HTMLResponse)
def queues(request: Request) -> HTMLResponse:
    engine, _ = _guard(request)
    return _render(request, "queues.html", page="queues", queues=engine.store.queue_stats())
