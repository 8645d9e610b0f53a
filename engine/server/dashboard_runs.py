"""The dashboard's runs and queues pages: filters, the current step and what each run waits
for, and the change streams (Server-Sent Events) that tell an open page to refresh itself."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from dsl import DurationError, InstantError, parse_duration, parse_instant

from ..errors import EngineError, NotFound
from ..inputs import InputInvalid, parse_count
from ..models import Run, RunFilter, RunStatus
from ..operations import check_tags
from ..service import Engine
from ..views import iso, run_summary
from .api import decode_cursor, encode_cursor
from .rendering import _guard, _guard_post, _render
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
    blocked = engine.blocked_by(run) if run.status == RunStatus.QUEUED else None
    return {
        **run_summary(run, blocked),
        "duration": f"{end - run.started_at:.1f}s" if run.started_at else "-",
        "waits": _waits(engine, run),
        "replay_of": run.trigger.get("replay_of"),
    }


def _instant(value: str, name: str, now: float) -> float:
    """A time bound as typed: a duration ago (`15m`, `24h`, `7d`) or an ISO-8601 time (UTC
    without an offset)."""
    value = value.strip()
    try:
        return now - parse_duration(value)
    except DurationError:
        pass
    try:
        return parse_instant(value)
    except InstantError:
        raise InputInvalid(
            name, f"{value!r} is neither a duration ago (15m, 24h, 7d) nor an ISO-8601 time"
        ) from None


@dataclass(frozen=True)
class Filters:
    """The runs page's filters as typed in its form (and its URL)."""

    status: str = ""
    workflow: str = ""
    tags: tuple[str, ...] = ()
    since: str = ""
    until: str = ""

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Filters:
        raw = params.getlist("tag") if hasattr(params, "getlist") else params.get("tag", [])
        tags = tuple(t for value in raw for t in value.replace(",", " ").split() if t)
        return cls(
            status=str(params.get("status") or ""),
            workflow=str(params.get("workflow") or ""),
            tags=tags,
            since=str(params.get("since") or ""),
            until=str(params.get("until") or ""),
        )

    def query(self) -> list[tuple[str, str]]:
        pairs = [("status", self.status), ("workflow", self.workflow)]
        pairs += [("tag", t) for t in self.tags]
        pairs += [("since", self.since), ("until", self.until)]
        return [(k, v) for k, v in pairs if v]

    def run_filter(self, now: float) -> RunFilter:
        """The store's filter; InputInvalid naming the field for an unknown status or a
        time that is neither a duration nor an instant."""
        statuses: tuple[RunStatus, ...] = ()
        if self.status:
            if self.status not in {s.value for s in RunStatus}:
                raise InputInvalid("status", f"{self.status!r} is not a run status")
            statuses = (RunStatus(self.status),)
        return RunFilter(
            statuses=statuses,
            workflow_id=self.workflow or None,
            tags=check_tags(list(self.tags), "tag"),
            since=_instant(self.since, "since", now) if self.since else None,
            until=_instant(self.until, "until", now) if self.until else None,
        )


def runs_page(engine: Engine, filters: Filters, cursor: str | None) -> dict[str, Any]:
    now = time.time()
    error = None
    try:
        f = filters.run_filter(now)
        before = decode_cursor(cursor) if cursor else None
        runs = engine.list_runs(f, PAGE + 1, before)
        filtered = not f.empty  # counted only on the bulk confirmation: a count costs
    except EngineError as exc:
        error, runs, filtered = str(exc), [], False
    page = runs[:PAGE]
    older = None
    if len(runs) > PAGE:
        cursor_value = encode_cursor(page[-1].created_at, page[-1].id)
        older = urlencode([*filters.query(), ("cursor", cursor_value)])
    query = urlencode(filters.query())
    return {
        "seen": seen(page),
        "runs": [_row(engine, r, now) for r in page],
        "older": older,
        "f": filters,
        "filters": filters.query(),
        "filtered": filtered,
        "error": error,
        "statuses": [s.value for s in RunStatus],
        "workflows": sorted(engine.catalog.workflows),
        "stream": "" if cursor or error else f"/partials/runs/events?{query}",
    }


@router.get("/", response_class=HTMLResponse)
def runs_list(request: Request, cursor: str | None = None) -> HTMLResponse:
    engine, _ = _guard(request)
    counts = {k: parse_count(v) for k, v in request.query_params.items() if k in NOTICES}
    notice = {k: n for k, n in counts.items() if n is not None}
    context = runs_page(engine, Filters.of(request.query_params), cursor)
    return _render(request, "runs.html", page="runs", notice=notice, **context)


# bulk actions -----------------------------------------------------------------------------
NOTICES = ("cancelled", "replayed")


def _bulk_target(form: Mapping[str, Any], now: float) -> tuple[RunFilter, Filters, int]:
    """The selected runs (`ids`), or else the filter; refuses neither (every run)."""
    filters = Filters.of(form)
    ids = tuple(str(i) for i in form.getlist("ids")) if hasattr(form, "getlist") else ()
    if ids:
        return RunFilter(ids=ids), filters, len(ids)
    f = filters.run_filter(now)
    if f.empty:
        raise InputInvalid("runs", "select runs or set a filter first: no bulk action on every run")
    return f, filters, 0


@router.post("/runs/bulk")
async def bulk(request: Request) -> Response:
    """Cancel or replay the selected runs, or every run matching the filter: first a page
    with the count to confirm, then (with `confirmed`) the action, in batches."""
    form = await request.form()
    engine = _guard_post(request, str(form.get("csrf", "")))
    action = str(form.get("action", ""))
    if action not in ("cancel", "replay"):
        raise InputInvalid("action", "must be cancel or replay")
    target, filters, picked = _bulk_target(form, time.time())
    if form.get("confirmed") != "yes":
        count = (
            engine.count_cancellable(target) if action == "cancel" else engine.count_runs(target)
        )
        return _render(
            request,
            "bulk.html",
            page="runs",
            action=action,
            count=count,
            picked=picked,
            ids=list(target.ids),
            f=filters,
            back="/?" + urlencode(filters.query()),
        )
    if action == "cancel":
        done = {"cancelled": engine.cancel_runs(target)}
    else:
        done = {"replayed": len(engine.replay_runs(target))}
    return RedirectResponse("/?" + urlencode([*filters.query(), *done.items()]), 303)


# change streams ---------------------------------------------------------------------------
def seen(runs: list[Run]) -> str:
    """What a page of runs looks like, in a few characters: it changes when a run of it
    is added, removed or updated."""
    shown = "|".join(f"{r.id}:{r.status.value}:{r.updated_at!r}" for r in runs)
    return hashlib.sha1(shown.encode()).hexdigest()[:16]


async def _changes(
    request: Request, fingerprint: Callable[[], str], shown: str
) -> AsyncIterator[str]:
    """`event: run` each time `fingerprint()` changes, at once if it is not what the page
    `shown`. The stream closes after STREAM_SECONDS (the page opens it again, with what it
    shows then), and at once when the server is asked to stop (`app.state.stopping`)."""
    stopping = request.app.state.stopping
    yield "retry: 1000\n\n"
    last = await run_in_threadpool(fingerprint)
    if shown and last != shown:
        yield "event: run\ndata: {}\n\n"
    deadline = time.monotonic() + STREAM_SECONDS
    while time.monotonic() < deadline and not stopping.is_set():
        await asyncio.sleep(CHECK_SECONDS)
        if await request.is_disconnected():
            return
        current = await run_in_threadpool(fingerprint)
        if current != last:
            last = current
            yield "event: run\ndata: {}\n\n"
    yield ": reconnect\n\n"


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


@router.get("/partials/runs/events")
def runs_events(request: Request) -> StreamingResponse:
    """Tells the runs page that its first page changed (a run added, moved or finished)."""
    engine, _ = _guard(request)
    filters = Filters.of(request.query_params)
    f = filters.run_filter(time.time())  # relative bounds fixed when the page was opened

    def fingerprint() -> str:
        return seen(engine.list_runs(f, PAGE))

    return _stream(_changes(request, fingerprint, request.query_params.get("seen", "")))


# queues -----------------------------------------------------------------------------------
@router.get("/queues", response_class=HTMLResponse)
def queues(request: Request) -> HTMLResponse:
    engine, _ = _guard(request)
    return _render(request, "queues.html", page="queues", queues=engine.store.queue_stats())


@router.post("/queues/pause")
def pause_queue(request: Request, queue: str = Form(""), csrf: str = Form("")) -> Response:
    """A paused queue keeps its runs queued and starts none until resumed."""
    engine = _guard_post(request, csrf)
    engine.pause_queue(_known_queue(engine, queue))
    return RedirectResponse("/queues", 303)


@router.post("/queues/resume")
def resume_queue(request: Request, queue: str = Form(""), csrf: str = Form("")) -> Response:
    engine = _guard_post(request, csrf)
    engine.resume_queue(_known_queue(engine, queue))
    return RedirectResponse("/queues", 303)


def _known_queue(engine: Engine, name: str) -> str:
    if name not in {q["name"] for q in engine.store.queue_stats()}:
        raise NotFound(f"no queue is named {name!r}")
    return name
