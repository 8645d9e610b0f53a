"""The JSON API (SPEC §5): the same validation and messages as the CLI, never a 500 for a
user's mistake. Run objects have the fields of the CLI's `--json`."""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictInt,
    StrictStr,
)

from dsl import InstantError, WorkflowInvalid, parse_instant
from dsl.limits import INT_MAX

from ..durations import to_seconds
from ..errors import NotFound, PayloadInvalid, TokenError
from ..inputs import InputInvalid, parse_json
from ..models import Run, RunFilter, RunStatus
from ..service import Engine
from ..views import iso, log_view, run_detail, run_summary, schedule_views

__all__ = ["InputRefused", "error_response", "router"]


_Delay = StrictInt | Annotated[float, Strict(), AllowInfNan(False)] | StrictStr


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Event name.")
    payload: Any = Field(default=None, description="Event payload (JSON); default {}.")
    idempotency_key: str | None = Field(
        default=None, description="At most one set of runs per key."
    )
    tags: list[str] | None = Field(default=None, description='"key:value" strings.')
    priority: StrictInt | None = Field(default=None, description="Higher starts first.")
    ttl: _Delay | None = Field(default=None, description="Not started within it: expired.")


class TriggerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payload: Any = Field(default=None, description="The run's payload (JSON).")
    idempotency_key: str | None = None
    delay: _Delay | None = Field(default=None, description="Seconds or text like '5m'.")
    tags: list[str] | None = Field(default=None, description='"key:value" strings.')
    priority: StrictInt | None = Field(default=None, description="Higher starts first.")
    ttl: _Delay | None = Field(default=None, description="Not started within it: expired.")


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Any = Field(default=None, description="The wait_for_token step's output.")


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def require_key(request: Request) -> None:
    keys = request.app.state.keys
    if not keys.bearer_ok(request.headers.get("authorization")) and not keys.session_ok(
        request.cookies.get("durable_yaml_session")
    ):
        raise HTTPException(
            401,
            "missing or wrong API key: send Authorization: Bearer $DURABLE_YAML_API_KEY",
            headers={"WWW-Authenticate": "Bearer"},
        )


class _CheckedRequest(Request):
    """A request whose JSON body passes the input boundary (`engine.inputs.parse_json`)
    before any model sees it: NaN, lone surrogates, too deep or too large are a 422
    naming the field, never a parser's RecursionError."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = parse_json(await self.body(), "")
            except InputInvalid as exc:
                raise InputRefused(exc) from None
        return self._json


class InputRefused(HTTPException):
    """An `InputInvalid` body, carried through FastAPI's body parsing to `error_response`."""

    def __init__(self, error: InputInvalid) -> None:
        super().__init__(422, str(error))
        self.error = error


class _CheckedRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(_CheckedRequest(request.scope, request.receive))

        return checked


EngineDep = Annotated[Engine, Depends(engine_of)]
router = APIRouter(prefix="/api", dependencies=[Depends(require_key)], route_class=_CheckedRoute)


def error_response(exc: Exception) -> JSONResponse:
    """Engine errors as JSON with the status a client can act on."""
    if isinstance(exc, InputInvalid):
        return JSONResponse({"error": str(exc), "field": exc.field}, 422)
    if isinstance(exc, PayloadInvalid):
        return JSONResponse(
            {"error": str(exc), "field": exc.field, "workflow": exc.workflow_id}, 422
        )
    if isinstance(exc, WorkflowInvalid):
        return JSONResponse(
            {"error": "workflow file is invalid", "problems": [p.as_dict() for p in exc.problems]},
            422,
        )
    if isinstance(exc, NotFound):
        return JSONResponse({"error": str(exc)}, 404)
    if isinstance(exc, TokenError):
        return JSONResponse({"error": str(exc)}, 409)
    status = 503 if type(exc).__name__ == "DatabaseError" else 400
    return JSONResponse({"error": str(exc)}, status)


def encode_cursor(created_at: float, run_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}|{run_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, run_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        at = float(created)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        at = math.nan
    if not math.isfinite(at):  # nan and inf compare differently on each backend
        raise HTTPException(422, f"cursor {cursor!r} is not a cursor this API returned")
    return at, run_id


def _instant(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_instant(value)
    except InstantError as exc:
        raise HTTPException(422, f"{name}: {exc}") from None


@router.post("/events", status_code=202, summary="Send an event")
def send_event(body: EventIn, engine: EngineDep) -> Any:
    sent = engine.send_event(
        body.name,
        {} if body.payload is None else body.payload,
        body.idempotency_key,
        tags=body.tags,
        priority=body.priority,
        ttl=to_seconds(body.ttl, "ttl"),
    )
    return JSONResponse(
        {"runs": list(sent.run_ids), "resumed": list(sent.resumed), "duplicate": sent.duplicate},
        200 if sent.duplicate else 202,
    )


@router.post("/workflows/{workflow_id}/runs", status_code=201, summary="Trigger one run")
def trigger(workflow_id: str, body: TriggerIn, engine: EngineDep) -> Any:
    if engine.catalog.get(workflow_id) is None:
        raise NotFound(f"no workflow has id `{workflow_id}`")
    sent = engine.trigger(
        workflow_id,
        body.payload,
        body.idempotency_key,
        to_seconds(body.delay),
        tags=body.tags,
        priority=body.priority,
        ttl=to_seconds(body.ttl, "ttl"),
    )
    run = _summary(engine, engine.store.get_run(sent.run_ids[0]))
    return JSONResponse({**run, "duplicate": sent.duplicate}, 200 if sent.duplicate else 201)


@router.get("/runs", summary="List runs, newest first")
def list_runs(
    engine: EngineDep,
    status: Annotated[list[RunStatus] | None, Query()] = None,
    workflow: str | None = None,
    tag: Annotated[list[str] | None, Query(description="K:V; repeat: all must hold")] = None,
    since: str | None = None,
    until: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
) -> dict[str, Any]:
    before = decode_cursor(cursor) if cursor else None
    f = RunFilter(
        statuses=tuple(status or ()),
        workflow_id=workflow,
        tags=tuple(tag or ()),
        since=_instant(since, "since") if since else _instant(created_after, "created_after"),
        until=_instant(until, "until") if until else _instant(created_before, "created_before"),
    )
    runs = engine.list_runs(f, limit + 1, before)
    page = runs[:limit]
    more = len(runs) > limit
    return {
        "runs": [_summary(engine, r) for r in page],
        "next_cursor": encode_cursor(page[-1].created_at, page[-1].id) if more else None,
    }


def _summary(engine: Engine, run: Run) -> dict[str, Any]:
    return run_summary(run, engine.blocked_by(run) if run.status == RunStatus.QUEUED else None)


class FilterIn(BaseModel):
    """The filters of `runs list`; every given one must hold."""

    model_config = ConfigDict(extra="forbid")

    status: list[RunStatus] | None = None
    workflow: str | None = None
    tag: list[str] | None = Field(default=None, description="K:V strings; all must hold.")
    since: str | None = Field(default=None, description="ISO-8601: created at or after.")
    until: str | None = Field(default=None, description="ISO-8601: created before.")


class BulkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: FilterIn | None = None
    ids: list[str] | None = Field(default=None, max_length=100_000)


def _bulk_filter(body: BulkIn) -> RunFilter:
    fi = body.filter or FilterIn()
    f = RunFilter(
        statuses=tuple(fi.status or ()),
        workflow_id=fi.workflow,
        tags=tuple(fi.tag or ()),
        since=_instant(fi.since, "filter.since"),
        until=_instant(fi.until, "filter.until"),
        ids=tuple(body.ids or ()),
    )
    if f.empty:
        raise HTTPException(422, "give `ids` or a non-empty `filter`: a bulk action needs one")
    return f


@router.post("/runs/cancel", summary="Cancel the runs of a filter or a list of ids")
def cancel_many(body: BulkIn, engine: EngineDep) -> dict[str, Any]:
    return {"count": engine.cancel_runs(_bulk_filter(body))}


@router.post("/runs/replay", status_code=201, summary="Queue replays of many runs")
def replay_many(body: BulkIn, engine: EngineDep) -> dict[str, Any]:
    new_ids = engine.replay_runs(_bulk_filter(body))
    return {"count": len(new_ids), "runs": new_ids}


@router.get("/runs/{run_id}", summary="One run with its steps and attempts")
def get_run(run_id: str, engine: EngineDep) -> dict[str, Any]:  # with blocked_by
    return run_detail(engine.store, engine.store.get_run(run_id))


@router.get("/runs/{run_id}/logs", summary="A run's logs")
def get_logs(
    run_id: str,
    engine: EngineDep,
    after: Annotated[int, Query(ge=0, le=INT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> dict[str, Any]:
    engine.store.get_run(run_id)
    entries = engine.store.get_logs(run_id, after, limit)
    return {
        "logs": [log_view(e) for e in entries],
        "next_after": entries[-1].id if len(entries) == limit else None,
    }


@router.post("/runs/{run_id}/cancel", summary="Cancel a run")
def cancel(run_id: str, engine: EngineDep) -> dict[str, Any]:
    return run_summary(engine.store.request_cancel(run_id, engine.store.now()))


@router.post(
    "/runs/{run_id}/replay", status_code=201, summary="Queue a new run with the same payload"
)
def replay(run_id: str, engine: EngineDep) -> dict[str, Any]:
    return run_summary(engine.store.get_run(engine.queue_replay(run_id)))


@router.post("/tokens/{token}/complete", summary="Complete a wait_for_token step")
def complete_token(token: str, body: TokenIn, engine: EngineDep) -> dict[str, Any]:
    return {"run_id": engine.complete_token(token, body.data)}


@router.get("/workflows", summary="The workflows of the folder")
def workflows(engine: EngineDep) -> dict[str, Any]:
    return {
        "workflows": [
            {
                "id": m.workflow_id,
                "name": m.name,
                "version": m.version,
                "description": m.description,
                "trigger": m.trigger.__dict__,
                "queue": m.queue.name,
                "steps": [s.id for s in m.main_states()],
                "hash": m.content_hash,
            }
            for m in sorted(engine.catalog.workflows.values(), key=lambda m: m.workflow_id)
        ],
        "problems": [str(p) for p in engine.catalog.problems],
    }


@router.get("/schedules", summary="Cron workflows and their next fires")
def schedules(engine: EngineDep) -> dict[str, Any]:
    return {"schedules": schedule_views(engine, time.time())}


@router.get("/queues", summary="Queues: depth, running, limits, paused")
def queues(engine: EngineDep) -> dict[str, Any]:
    return {"queues": engine.store.queue_stats()}


@router.post("/queues/{name}/pause", summary="Start no run of the queue until resumed")
def pause_queue(name: str, engine: EngineDep) -> dict[str, Any]:
    engine.pause_queue(name)
    return {"name": name, "paused": True}


@router.post("/queues/{name}/resume", summary="Let the queue start runs again")
def resume_queue(name: str, engine: EngineDep) -> dict[str, Any]:
    engine.resume_queue(name)
    return {"name": name, "paused": False}


@router.get("/workers", summary="Live workers with their heartbeats")
def workers(engine: EngineDep) -> dict[str, Any]:
    store = engine.store
    return {
        "workers": [
            {**w, "started_at": iso(w["started_at"]), "heartbeat_at": iso(w["heartbeat_at"])}
            for w in store.list_workers(store.now())
        ]
    }
