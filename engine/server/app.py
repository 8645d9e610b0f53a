"""The ASGI app: API, dashboard, health, and the translation of errors to responses."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from dsl import DslError

from ..errors import EngineError, NotFound
from ..service import Engine
from . import api, dashboard
from .security import Keys

__all__ = ["create_app"]


def create_app(engine: Engine, api_key: str | None) -> FastAPI:
    from importlib.metadata import version

    app = FastAPI(
        title="durable-yaml",
        version=version("durable-yaml"),
        description="Send events, trigger workflows, watch and control runs. "
        "Every /api call needs `Authorization: Bearer $DURABLE_YAML_API_KEY` "
        "when the server has a key.",
    )
    app.state.engine = engine
    app.state.keys = Keys(api_key)
    app.include_router(api.router)
    app.include_router(dashboard.router)

    @app.get("/healthz", tags=["health"], summary="Liveness and database reachability")
    def healthz() -> Response:
        try:
            with engine.store.engine.connect() as c:
                c.execute(sa.text("SELECT 1"))
        except (EngineError, sa.exc.SQLAlchemyError):
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, 503)
        return JSONResponse({"status": "ok", "database": "ok"})

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

    return app
