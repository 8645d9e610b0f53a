"""The store contract: what the runner, the workers and the CLI may ask of a database.

Every method is one transaction unless it says otherwise. Implementations translate driver
errors into `engine.errors` types; callers never see SQLAlchemy or driver exceptions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from ..models import (
    Answer,
    Attempt,
    Lease,
    LogEntry,
    NewEvent,
    NewLog,
    NewRun,
    QueueLimits,
    Run,
    RunFilter,
    RunStatus,
    Sent,
    StepState,
    Transition,
    TransitionResult,
    WorkerInfo,
)
from .stats import Snapshot

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

    def claim_run(
        self, run_id: str, lease: Lease, now: float, *, within_limits: bool = False
    ) -> Run:
        """Take the lease of one run and begin its current step (a crashed attempt is
        recorded as `crashed`). Allowed when the run is unleased, its lease has expired, is
        ours, or belongs to a dead process. RunBusy otherwise; NotFound. With
        `within_limits`, a queued run is returned unclaimed unless its queue admits it."""

    def commit_transition(
        self, run_id: str, lease: Lease, transition: Transition, now: float
    ) -> TransitionResult:
        """Record a step's end and move the run on, atomically, only while `lease` holds
        the run (LeaseLost otherwise: nothing is written). With it, in the same transaction:
        a send_event's event and runs, a run_workflow's children, cancels of other runs.
        Parking a run (status waiting) reads its step's inbox under the run's lock: if the
        wait is answered already the run stays leased and the answer is returned.
        ValueNotStorable if the database refuses a value of the record."""

    def take_answer(
        self, run_id: str, step_key: str, attempt: int, now: float, *, timed_out: bool
    ) -> Answer | None:
        """The answer to a wait; with `timed_out`, a timeout is written first unless the
        wait was answered already (the first answer wins, atomically)."""

    def child_answers(self, run_id: str, step_id: str, attempt: int) -> dict[int, Any]:
        """The results of the child runs a for_each step's attempt started that have ended,
        by item index (a read: each was written once, by its child's last commit)."""

    def now(self) -> float:
        """The database's clock: leases, timers, rate windows and cron fires use it."""

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

    def search_runs(
        self, filter: RunFilter, limit: int = 50, before: tuple[float, str] | None = None
    ) -> list[Run]:
        """Runs matching every field of `filter`, newest first, after the (created_at, id)
        cursor; a tag filter is a range scan of dy_run_tags, fast at any size."""

    def count_runs(self, filter: RunFilter) -> int: ...

    def run_id_batches(self, filter: RunFilter, size: int = 500) -> Iterator[list[str]]:
        """Matching ids, newest first, `size` at a time, each page read when asked for."""

    def cancel_runs_batch(self, run_ids: Sequence[str], now: float) -> int:
        """Cancel these runs in one transaction; how many this call cancelled or flagged
        (never one cancelled or flagged already)."""

    def set_queue_paused(self, name: str, paused: bool, now: float) -> None:
        """Pause or resume a queue (NotFound if unknown); after a pause returns no claim
        starts one of its runs."""

    def expire_runs(self, now: float, limit: int = 500) -> list[str]:
        """Queued runs past their TTL end `expired` (conditionally on still queued)."""

    def blocked_by(self, run: Run, now: float) -> dict[str, Any] | None:
        """Why a queued run has not started: {reason, detail}; None if nothing holds it."""

    def purge_runs(
        self,
        before: float,
        statuses: Sequence[RunStatus],
        keep_definitions: Iterable[str] = (),
        batch: int = 200,
    ) -> Iterator[int]:
        """Delete finished runs (and all hanging off them) finished before `before`, one
        short transaction per batch; yields each batch's count."""

    def count_purgeable(self, before: float, statuses: Sequence[RunStatus]) -> int:
        """How many runs `purge_runs(before, statuses)` would delete now."""

    def get_steps(self, run_id: str) -> list[StepState]: ...

    def get_attempts(self, run_id: str) -> list[Attempt]: ...

    def waited_event_names(self, limit: int = 1000) -> list[str]:
        """The distinct event names parked waits are waiting for (at most `limit`); a read."""

    def get_logs(self, run_id: str, after_id: int = 0, limit: int = 1000) -> list[LogEntry]: ...

    def reopen_failed_run(
        self,
        run_id: str,
        step_key: str,
        lease: Lease,
        now: float,
        reopen: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Run:
        """Make a failed run's failed step a due retry (or what `reopen` says of it), and
        give the other failed step rows in `reopen` the columns it says (a block reopened),
        leased to `lease`; atomic, and only while the run is failed."""

    # queues and workers ---------------------------------------------------------------------
    def save_queue_limits(self, limits: Iterable[QueueLimits]) -> None:
        """Record each queue's limits (the latest definition wins); idempotent."""

    def claim_next_run(
        self, lease: Lease, now: float, queues: Sequence[str] | None = None
    ) -> Run | None:
        """Lease the first claimable run (priority, then FIFO) that its queue's concurrency,
        key and rate limits allow, and begin its current step, atomically; safe across
        processes. None when nothing can run now."""

    def claim_next_runs(
        self, leases: Sequence[Lease], now: float, queues: Sequence[str] | None = None
    ) -> tuple[list[Run], bool]:
        """`claim_next_run` for several leases in one transaction: up to one run each, in
        claim order, the runs taken earlier counting towards the limits of the later; and
        whether the candidates ran out (a lease left without a run may then wait; else
        claiming again may find one)."""

    def next_due_at(self, queues: Sequence[str] | None = None) -> float | None:
        """When the next run becomes claimable."""

    def next_claim_at(self, after: float, queues: Sequence[str] | None = None) -> float | None:
        """After a claim at `after` found nothing: the earliest time a run may become
        claimable without any other commit (a timer, a delay, a lease expiry, the end of a
        rate window). None: only a commit elsewhere (a new run, a release, a finished run:
        each one NOTIFYs) can make one claimable."""

    def announce_slot_freed(self, queue: str) -> bool:
        """A run of `queue` stopped executing here: if the queue has a concurrency limit,
        wake the claimers sleeping on it (PostgreSQL NOTIFY; SQLite's watchers see every
        commit). Not transactional; a no-op for unlimited queues. Whether it is limited."""

    def register_worker(self, worker: WorkerInfo, now: float) -> None:
        """Insert or refresh a worker's row, heartbeat now; idempotent."""

    def worker_heartbeat(self, worker_id: str, now: float) -> bool:
        """Stamp a worker alive; False if its row is gone (register again)."""

    def deregister_worker(self, worker_id: str) -> None:
        """Remove a worker's row: leases it still holds are dead at once."""

    def list_workers(self, now: float) -> list[dict[str, Any]]:
        """Live workers with host, pid, queues, concurrency, running, heartbeat_at."""

    def expire_dead_leases(self, now: float) -> list[str]:
        """Leases of stale or deregistered workers end now (their runs become claimable)
        and stale workers' rows are removed, atomically, under the stale rows' locks."""

    def queue_stats(self) -> list[dict[str, Any]]: ...

    def metrics_snapshot(self, now: float) -> Snapshot:
        """Runs per workflow and status, queue depths and waits, live workers: one read."""

    # events, tokens, idempotency ------------------------------------------------------------
    def send(
        self,
        new_runs: Sequence[NewRun],
        now: float,
        *,
        event: NewEvent | None = None,
        idempotency_key: str | None = None,
    ) -> Sent:
        """Atomically: check the idempotency key, store the event, create the runs, answer
        the matching parked waits."""

    def complete_token(self, token: str, data: Any, now: float) -> str:
        """Answer the wait of `token`; TokenError if it was answered already (a completion,
        a timeout or a cancel came first), NotFound if unknown."""

    def purge_idempotency_keys(self, now: float) -> int:
        """Delete keys older than their 30 days; how many."""

    # cron -------------------------------------------------------------------------------------
    def fire_cron(
        self, workflow_id: str, fire_at: float, new: NewRun, now: float, *, skip_if_active: bool
    ) -> str | None:
        """Record one fire and create its run atomically; None if this instant was fired
        already (a unique key) or skipped for overlap."""

    def last_fires(self) -> dict[str, float]: ...

    def fires_since(self, since: float, workflow_ids: Sequence[str]) -> dict[str, set[float]]:
        """Per workflow of `workflow_ids`, the instants fired (or skipped) at or after `since`."""

    def fires(self, workflow_id: str, limit: int = 100) -> list[tuple[float, str | None]]: ...
