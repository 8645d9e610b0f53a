"""The dashboard's runs and queues pages: filters, the current step and what each run waits
for, and the change streams (Server-Sent Events) that tell an open page to refresh itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..models import Run, RunStatus
from ..service import Engine
from ..views import iso, run_summary
from .api import decode_cursor, encode_cursor
from .rendering import _guard, _render
from .ui import waiting_for

__all__ = ["router"]

PAGE = 50
STREAM_SECONDS = 15.0  # a change stream ends after this; the browser reconnects at once
CHECK_SECONDS = 0.5  # how often a stream looks for a change (a cheap indexed read)
router = APIRouter(include_in_schema=False)


def _waits(engine: Engine, run: Run) -> dict[str, Any] | None:
    """What a waiting run waits for, from its current step's stored state."""
    if run.status != RunStatus.WAITING or not run.current_step:
        return None
    state = next(
        (s for s in engine.store.get_steps(run.id) if s.step_key == run.current_step), None
    )
    if state is None:
        return {"text": "its next step", "step": run.current_step}
    info = waiting_for(state.wait, iso(state.wake_at), state.step_key)
    if state.status.value == "retrying":
        info = {
            "text": f"a retry (attempt {state.attempts + 1})",
            "step": state.step_key,
            "until": iso(state.wake_at),
            "until_word": "at",
        }
    return info


def _row(engine: Engine, run: Run, now: float) -> dict[str, Any]:
    end = run.finished_at or now
    return {
        **run_summary(run),
        "duration": f"{end - run.started_at:.1f}s" if run.started_at else "-",
        "waits": _waits(engine, run),
        "replay_of": run.trigger.get("replay_of"),
    }


def _query(params: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in params.items() if v}


def runs_page(
    engine: Engine, status: str | None, workflow: str | None, cursor: str | None
) -> dict[str, Any]:
    wanted = RunStatus(status) if status in {s.value for s in RunStatus} else None
    before = decode_cursor(cursor) if cursor else None
    runs = engine.store.list_runs(wanted, workflow or None, PAGE + 1, before)
    page = runs[:PAGE]
    now = time.time()
    filters = _query({"status": status, "workflow": workflow})
    older = None
    if len(runs) > PAGE:
        older = urlencode({**filters, "cursor": encode_cursor(page[-1].created_at, page[-1].id)})
    return {
        "runs": [_row(engine, r, now) for r in page],
        "older": older,
        "status": status or "",
        "workflow": workflow or "",
        "statuses": [s.value for s in RunStatus],
        "workflows": sorted(engine.catalog.workflows),
        "filters": filters,
        "stream": "/partials/runs/events?" + urlencode(filters) if not cursor else "",
    }


@router.get("/", response_class=HTMLResponse)
def runs_list(
    request: Request,
    status: str | None = None,
    workflow: str | None = None,
    cursor: str | None = None,
) -> HTMLResponse:
    engine, _ = _guard(request)
    return _render(request, "runs.html", page="runs", **runs_page(engine, status, workflow, cursor))


# change streams ---------------------------------------------------------------------------
async def _changes(
    request: Request, fingerprint: Callable[[], Any], ended: Callable[[Any], bool]
) -> AsyncIterator[str]:
    """`event: <name>` each time `fingerprint()` changes, `event: end` once `ended` says so;
    the stream closes after STREAM_SECONDS (the browser's EventSource reconnects), so a
    server asked to stop never waits long for an open page."""
    yield "retry: 1000\n\n"
    last = await run_in_threadpool(fingerprint)
    if ended(last):
        yield "event: end\ndata: {}\n\n"
        return
    deadline = time.monotonic() + STREAM_SECONDS
    while time.monotonic() < deadline:
        await asyncio.sleep(CHECK_SECONDS)
        if await request.is_disconnected():
            return
        now = await run_in_threadpool(fingerprint)
        if now != last:
            last = now
            yield "event: run\ndata: {}\n\n"
            if ended(now):
                yield "event: end\ndata: {}\n\n"
                return
    yield ": reconnect\n\n"


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


@router.get("/partials/runs/events")
def runs_events(
    request: Request, status: str | None = None, workflow: str | None = None
) -> StreamingResponse:
    """Tells the runs page that its first page changed (a run added, moved or finished)."""
    engine, _ = _guard(request)
    wanted = RunStatus(status) if status in {s.value for s in RunStatus} else None

    def fingerprint() -> Any:
        runs = engine.store.list_runs(wanted, workflow or None, PAGE)
        return [(r.id, r.status.value, r.updated_at) for r in runs]

    return _stream(_changes(request, fingerprint, lambda _: False))


@router.get("/partials/runs/{run_id}/events")
def run_events(request: Request, run_id: str) -> StreamingResponse:
    """Tells a run's page that the run changed (status, step, a new log line); ends with it."""
    engine, _ = _guard(request)
    engine.store.get_run(run_id)  # 404 for an unknown run

    newest_log = 0

    def fingerprint() -> Any:
        nonlocal newest_log
        run = engine.store.get_run(run_id)
        logs = engine.store.get_logs(run_id, newest_log, 1000)
        newest_log = logs[-1].id if logs else newest_log
        return (run.status.value, run.updated_at, newest_log, run.finished)

    return _stream(_changes(request, fingerprint, lambda f: bool(f[3])))


# queues -----------------------------------------------------------------------------------
@router.get("/queues", response_class=HTMLResponse)
def queues(request: Request) -> HTMLResponse:
    engine, _ = _guard(request)
    return _render(request, "queues.html", page="queues", queues=engine.store.queue_stats())
