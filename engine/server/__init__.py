"""`durable-yaml serve`: the HTTP API (SPEC §5) and the dashboard, on one ASGI app."""

from __future__ import annotations

from .app import create_app, serve_app

__all__ = ["create_app", "serve_app"]
