"""The ASGI app: API, dashboard, health, and the translation of errors to responses."""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import suppress
from types import FrameType
from typing import Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsl import DslError

from ..errors import EngineError, NotFound
from ..metrics import build_registry
from ..service import Engine
from ..tracing import TraceHeaders
from . import api, dashboard, live
from .guard import MAX_BODY, Guard
from .security import Keys

__all__ = ["SHUTDOWN_GRACE", "create_app", "serve_app"]

SHUTDOWN_GRACE = 5  # seconds a request may still run after SIGTERM before it is cancelled


def create_app(
    engine: Engine,
    api_key: str | None,
    *,
    port: int | None = None,
    max_body: int = MAX_BODY,
    reload_workflows: bool = False,
) -> FastAPI:
    """The app. Without `api_key` it answers loopback names only (on `port`, when given);
    request bodies over `max_body` bytes are refused with 413. With `reload_workflows` (as
    `serve` runs it) the workflows folder is re-read before requests, at most once a second."""
    from importlib.metadata import version

    app = FastAPI(
        title="durable-yaml",
        version=version("durable-yaml"),
        description="Send events, trigger workflows, watch and control runs. "
        "Every /api call needs `Authorization: Bearer $DURABLE_YAML_API_KEY` "
        "when the server has a key.",
    )
    app.state.engine = engine
    app.state.stopping = threading.Event()  # set when the server is asked to stop
    app.state.keys = keys = Keys(api_key, port)
    app.include_router(api.router)
    app.include_router(live.router)
    app.include_router(dashboard.router)
    app.add_middleware(Guard, keys=keys, max_body=max_body, refusal=_refusal)
    app.add_middleware(TraceHeaders)
    if reload_workflows:
        _reload_workflows(app, engine)

    @app.get("/healthz", tags=["health"], summary="Liveness and database reachability")
    def healthz() -> Response:
        try:
            with engine.store.db.read() as c:
                c.execute(sa.text("SELECT 1"))
        except (EngineError, sa.exc.SQLAlchemyError):
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, 503)
        return JSONResponse({"status": "ok", "database": "ok"})

    registry = build_registry(engine.store)

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics (text format)",
        dependencies=[Depends(api.require_key)],
        response_class=PlainTextResponse,
    )
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(dashboard.LoginRequired)
    def login_required(request: Request, exc: Exception) -> Response:
        return RedirectResponse("/login", 303)

    @app.exception_handler(EngineError)
    @app.exception_handler(DslError)
    def engine_error(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/api"):
            return api.error_response(exc)
        status = 404 if isinstance(exc, NotFound) else 400
        return dashboard._render(
            request,
            "error.html",
            status_code=status,
            title="Not found" if status == 404 else "That did not work",
            message=str(exc),
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc, api.InputRefused):
            return api.error_response(exc.error)
        if _is_api(request.url.path):
            return await http_exception_handler(request, exc)
        return _error_page(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        if _is_api(request.url.path):
            return await request_validation_exception_handler(request, exc)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}"
            for e in exc.errors()
        )
        return _error_page(request, 422, problems or "the request is not valid")

    return app


def serve_app(app: FastAPI, host: str, port: int, grace: int = SHUTDOWN_GRACE) -> None:
    """Serve `app` with uvicorn until SIGTERM or SIGINT. The signal sets
    `app.state.stopping`, which ends every open event stream at its next look (they would
    otherwise keep the process alive for as long as their run lives); a request still
    running `grace` seconds later is cancelled, so the process always exits."""
    import uvicorn

    stopping: threading.Event = app.state.stopping

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            stopping.set()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                # a service asked to stop exits 0 once shut down, as a worker does; uvicorn
                # raises the signal again after its shutdown, which killed the process
                # before its databases were closed (SQLite's -wal left, PostgreSQL's
                # connections dropped). Ctrl-C still ends as Ctrl-C does (exit 130).
                with suppress(ValueError, AttributeError):
                    self._captured_signals.remove(sig)

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace
    )
    Server(config).run()


def _reload_workflows(app: FastAPI, engine: Engine, every: float = 1.0) -> None:
    """Re-read the workflows folder before a request, at most once per `every` seconds: a
    workflow added, changed or removed after start is served, and its event triggers it."""
    checked = [-every]

    @app.middleware("http")
    async def reload(request: Request, call_next: Any) -> Response:
        now = time.monotonic()
        if now - checked[0] >= every:
            checked[0] = now
            try:
                if engine.refresh_catalog():  # a scan of file names and times; cheap
                    engine.save_all_definitions()
            except (EngineError, sa.exc.SQLAlchemyError):
                pass  # the database is away: the request says so itself, /healthz too
        response: Response = await call_next(request)
        return response


def _is_api(path: str) -> bool:
    return path.startswith("/api") or path in (
        "/openapi.json",
        "/docs",
        "/redoc",
        "/healthz",
        "/metrics",
    )


def _error_page(request: Request, status: int, message: str) -> Response:
    titles = {404: "Not found", 403: "Refused", 413: "Too large", 421: "Refused"}
    return dashboard._render(
        request,
        "error.html",
        status_code=status,
        title=titles.get(status, "That did not work"),
        message=message,
    )


async def _refusal(scope: Any, status: int, message: str) -> tuple[int, bytes, bytes]:
    """A refusal of the guard: JSON for the API, the dashboard's error page otherwise."""
    if _is_api(scope["path"]):
        return status, b"application/json", json.dumps({"error": message}).encode()
    title = {413: "Too large"}.get(status, "Refused")
    html = dashboard.templates.get_template("error.html").render(title=title, message=message)
    return status, b"text/html; charset=utf-8", html.encode()
