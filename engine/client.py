"""`Client`: the engine for other Python code (settings as for the CLI)."""

from __future__ import annotations

from typing import Any

from .models import Run
from .service import Engine
from .settings import resolve_settings
from .views import run_detail

__all__ = ["Client"]


class Client:
    def __init__(self, db_url: str | None = None, workflows: str | None = None) -> None:
        self._engine = Engine(resolve_settings(db=db_url, workflows=workflows), import_steps=False)

    def get_run(self, run_id: str) -> dict[str, Any]:
        """The run as `runs show --json` prints it."""
        return run_detail(self._engine.store, self._engine.store.get_run(run_id))

    def cancel(self, run_id: str) -> Run:
        import time

        return self._engine.store.request_cancel(run_id, time.time())

    def close(self) -> None:
        self._engine.close()
