"""What every dashboard page shares: the templates and their filters, rendering with the
session cookie and CSRF token, and the guards of pages and forms."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..errors import ConfigError
from ..service import Engine
from .security import COOKIE, SESSION_SECONDS, Keys
from .ui import time_tag

__all__ = [
    "STATIC",
    "LoginRequired",
    "_guard",
    "_guard_post",
    "_render",
    "_set_session",
    "templates",
]

STATIC = Path(__file__).parent / "static"
templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
)
templates.filters["json"] = lambda v: json.dumps(v, indent=2, default=str)
templates.filters["short"] = lambda v: (v or "")[:19].replace("T", " ")
templates.filters["ago"] = lambda v: time_tag(v, time.time())


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
