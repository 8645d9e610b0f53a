"""`GET /api/runs/{id}/events`: a run as Server-Sent Events while it happens (SPEC §5).

The stream polls the store every `POLL_SECONDS`: one read of the run row, one read of its
logs after the last id sent; the steps are read again only when the run's `updated_at`
moved. It sends

- `event: run`: the run object (as in `GET /api/runs/{id}`, without steps) whenever it changed,
- `event: step`: one step (as in the run's `steps`) whenever it changed,
- `event: log` (with `id:` the log id): each log line once, in order,
- `event: end` with `{"status": ...}` once the run has finished and every line was sent;
  then the stream closes. A browser's `EventSource` reconnects by itself after any close, so
  a client should `close()` on `end`. The stream also closes, without `end`, when the server
  is asked to stop (`app.state.stopping`): an open page never holds up a SIGTERM'd server.

A reconnect with `Last-Event-ID` (or `?after=LOG_ID`) gets the current run and steps again and
only the log lines after that id. `: keep-alive` comments go out when nothing else did for
`KEEPALIVE_SECONDS`, so proxies keep the connection open.

Reading logs by id misses nothing: every write of a run's log lines (a heartbeat, a step's
commit) first locks the run's row, so a run's lines commit in the order of their ids.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from dsl.limits import INT_MAX

from ..errors import EngineError, NotFound
from ..inputs import parse_count
from ..models import Run
from ..service import Engine
from ..store import Store
from ..views import log_view, run_detail, run_summary
from .api import engine_of, require_key

__all__ = ["KEEPALIVE_SECONDS", "POLL_SECONDS", "router", "run_events"]

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
LOG_BATCH = 500

log = logging.getLogger("durable_yaml.server")
router = APIRouter(prefix="/api", dependencies=[Depends(require_key)])


def sse(event: str, data: Any, event_id: int | None = None) -> str:
    """One Server-Sent Event; `data` as compact JSON on one line (JSON escapes newlines)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n"


def _run_view(run: Run) -> dict[str, Any]:
    return {**run_summary(run), "cancel_requested": run.cancel_requested}


async def run_events(
    store: Store,
    run_id: str,
    after: int,
    poll: float = POLL_SECONDS,
    stopping: threading.Event | None = None,
) -> AsyncIterator[str]:
    """The events of one run from now until it ends or `stopping` is set (see the module's
    docstring)."""
    stopping = stopping or threading.Event()
    seen_updated: float | None = None
    seen_run: dict[str, Any] | None = None
    seen_steps: dict[str, dict[str, Any]] = {}
    quiet_since = time.monotonic()
    yield "retry: 2000\n\n"
    while not stopping.is_set():
        try:
            run = await anyio.to_thread.run_sync(store.get_run, run_id)
        except NotFound:  # deleted meanwhile (runs purge)
            yield sse("end", {"status": None, "error": f"run {run_id} no longer exists"})
            return
        except EngineError as exc:  # the database is restarting: look again
            log.warning("events of run %s: %s", run_id, exc)
            await anyio.sleep(max(poll, 1.0))
            continue
        out: list[str] = []
        if run.updated_at != seen_updated:
            seen_updated = run.updated_at
            view = _run_view(run)
            if view != seen_run:
                seen_run = view
                out.append(sse("run", view))
            try:
                detail = await anyio.to_thread.run_sync(run_detail, store, run)
            except EngineError:  # deleted or unreachable since: the next look says which
                seen_updated, seen_run = None, None
                await anyio.sleep(poll)
                continue
            for step in detail["steps"]:
                if seen_steps.get(step["id"]) != step:
                    seen_steps[step["id"]] = step
                    out.append(sse("step", step))
        # Logs are read after the run row: the commit that ends a run writes its last lines
        # in the same transaction, so a finished run's lines are all visible here.
        read_all = True
        try:
            entries = await anyio.to_thread.run_sync(store.get_logs, run_id, after, LOG_BATCH)
        except EngineError as exc:
            log.warning("events of run %s: %s", run_id, exc)
            entries, read_all = [], False
        for entry in entries:
            after = entry.id
            out.append(sse("log", log_view(entry), entry.id))
        if run.finished and read_all and len(entries) < LOG_BATCH:
            out.append(sse("end", {"status": run.status.value}))
            yield "".join(out)
            return
        if out:
            quiet_since = time.monotonic()
            yield "".join(out)
        elif time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        if len(entries) < LOG_BATCH:
            await anyio.sleep(poll)


@router.get(
    "/runs/{run_id}/events",
    summary="The run's status, steps and log lines as Server-Sent Events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_run_events(
    run_id: str,
    request: Request,
    engine: Annotated[Engine, Depends(engine_of)],
    after: Annotated[int, Query(ge=0, le=INT_MAX, description="Send log lines after this id.")] = 0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    store = engine.store
    await anyio.to_thread.run_sync(store.get_run, run_id)  # NotFound: a 404 before streaming
    resumed = parse_count(last_event_id)  # a log id this stream sent; anything else: ignored
    if resumed is not None:
        after = max(after, resumed)
    poll = float(getattr(request.app.state, "sse_poll_seconds", POLL_SECONDS))
    return StreamingResponse(
        run_events(store, run_id, after, poll, request.app.state.stopping),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
