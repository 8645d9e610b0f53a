"""`Client`: the engine for other Python code, with the settings the CLI uses (SPEC §2)."""

from __future__ import annotations

from typing import Any

from dsl.limits import RUN_ID_MAX

from .durations import to_seconds
from .inputs import check_text
from .service import Engine
from .settings import resolve_settings
from .views import run_detail, run_summary

__all__ = ["Client"]


class Client:
    """Send events, trigger runs and inspect them from any Python process.

    Runs are executed by workers (`durable-yaml worker`); nothing here executes steps.
    """

    def __init__(self, db_url: str | None = None, workflows: str | None = None) -> None:
        self._engine = Engine(resolve_settings(db=db_url, workflows=workflows), import_steps=False)

    def send_event(
        self,
        name: str,
        payload: Any = None,
        idempotency_key: str | None = None,
        *,
        tags: list[str] | None = None,
        priority: int | None = None,
        ttl: float | str | None = None,
    ) -> dict[str, Any]:
        """Queue a run of every workflow `name` triggers and resume the runs waiting for it.
        `tags` ("key:value"), `priority` (higher first) and `ttl` (seconds or "10m": not
        started by then, the run ends `expired`) apply to the runs it starts.
        Returns {"runs": [ids], "resumed": [ids], "duplicate": bool}."""
        sent = self._engine.send_event(
            name,
            {} if payload is None else payload,
            idempotency_key,
            tags=tags,
            priority=priority,
            ttl=to_seconds(ttl, "ttl"),
        )
        return {
            "runs": list(sent.run_ids),
            "resumed": list(sent.resumed),
            "duplicate": sent.duplicate,
        }

    def trigger(
        self,
        workflow_id: str,
        payload: Any = None,
        idempotency_key: str | None = None,
        delay: float | str | None = None,
        *,
        tags: list[str] | None = None,
        priority: int | None = None,
        ttl: float | str | None = None,
    ) -> dict[str, Any]:
        """Queue one run of `workflow_id` (after `delay`: seconds or "5m"); the run as a dict.
        `tags`, `priority` and `ttl` as for `send_event`."""
        sent = self._engine.trigger(
            workflow_id,
            payload,
            idempotency_key,
            to_seconds(delay),
            tags=tags,
            priority=priority,
            ttl=to_seconds(ttl, "ttl"),
        )
        return run_summary(self._engine.store.get_run(sent.run_ids[0]))

    def get_run(self, run_id: str) -> dict[str, Any]:
        """The run with its steps, as `runs show --json` prints it."""
        check_text(run_id, "run_id", RUN_ID_MAX)
        return run_detail(self._engine.store, self._engine.store.get_run(run_id))

    def complete_token(self, token: str, data: Any = None) -> str:
        """Complete a `wait_for_token` step; returns the run id."""
        return self._engine.complete_token(token, data)

    def cancel(self, run_id: str) -> dict[str, Any]:
        check_text(run_id, "run_id", RUN_ID_MAX)
        return run_summary(self._engine.store.request_cancel(run_id, self._engine.store.now()))

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
