"""The store contract: what the runner, the workers and the CLI may ask of a database.

Every method is one transaction unless it says otherwise. Implementations translate driver
errors into `engine.errors` types; callers never see SQLAlchemy or driver exceptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..models import (
    Attempt,
    Lease,
    LogEntry,
    NewLog,
    NewRun,
    Run,
    RunStatus,
    StepState,
    Transition,
    TransitionResult,
)

__all__ = ["Store"]


class Store(Protocol):
    url: str

    def migrate(self) -> None:
        """Create or upgrade the schema in place; idempotent; refuses a newer schema."""

    def close(self) -> None: ...

    # definitions -------------------------------------------------------------------------
    def save_definition(
        self,
        content_hash: str,
        workflow_id: str,
        version: str,
        machine: dict[str, Any],
        source_path: str,
    ) -> None:
        """Store a compiled machine under its content hash; a no-op if it is there."""

    def load_definition(self, content_hash: str) -> dict[str, Any]:
        """The compiled machine a run is pinned to; NotFound if absent."""

    # runs ---------------------------------------------------------------------------------
    def create_run(self, new: NewRun, now: float, lease: Lease | None = None) -> Run:
        """Insert a queued run; with `lease`, the run is claimed by it and its first step
        begun in the same transaction (the foreground `run` command)."""

    def claim_run(self, run_id: str, lease: Lease, now: float) -> Run:
        """Take the lease of one run and begin its current step (a crashed attempt is
        recorded as `crashed`). Allowed when the run is unleased, its lease has expired, is
        ours, or belongs to a dead process on this host. RunBusy otherwise; NotFound."""

    def commit_transition(
        self, run_id: str, lease: Lease, transition: Transition, now: float
    ) -> TransitionResult:
        """Record a step's end and move the run on, atomically, only while `lease` holds
        the run (LeaseLost otherwise: nothing is written)."""

    def heartbeat(self, run_id: str, lease: Lease, now: float, logs: Sequence[NewLog]) -> bool:
        """Extend the lease and write buffered logs; False if the lease was lost."""

    def release(self, run_id: str, lease: Lease, now: float) -> None:
        """Give up the lease without changing the run (it is claimable again at once)."""

    def request_cancel(self, run_id: str, now: float) -> Run:
        """Cancel a queued or waiting run now (and its active child runs); a running one
        is flagged and stops at its next step boundary. Finished runs are returned as is."""

    def get_run(self, run_id: str) -> Run:
        """NotFound if absent."""

    def list_runs(
        self,
        status: RunStatus | None = None,
        workflow_id: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
        parent_run_id: str | None = None,
        since: float | None = None,
    ) -> list[Run]:
        """Newest first; `before` is the (created_at, id) keyset cursor."""

    def get_steps(self, run_id: str) -> list[StepState]: ...

    def get_attempts(self, run_id: str) -> list[Attempt]: ...

    def get_logs(self, run_id: str, after_id: int = 0, limit: int = 1000) -> list[LogEntry]: ...
