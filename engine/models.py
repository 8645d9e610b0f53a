"""Domain types the store speaks: frozen dataclasses and enums, never ORM rows."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACTIVE_STATUSES",
    "FINISHED_STATUSES",
    "Answer",
    "Attempt",
    "Emission",
    "Lease",
    "LogEntry",
    "NewEvent",
    "NewLog",
    "NewRun",
    "QueueLimits",
    "Run",
    "RunFilter",
    "RunStatus",
    "Sent",
    "StepRecord",
    "StepState",
    "StepStatus",
    "Transition",
    "TransitionResult",
    "WorkerInfo",
]


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # queued and not started within its TTL


ACTIVE_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)
FINISHED_STATUSES = (
    RunStatus.COMPLETED,
    RunStatus.FAILED,
    RunStatus.CANCELLED,
    RunStatus.EXPIRED,
)


@dataclass(frozen=True)
class RunFilter:
    """Which runs `runs list`, bulk cancel/replay and the API's search select: every given
    field must hold (AND). `tags` are "key:value" strings, all required; `since`/`until`
    bound `created_at` (since inclusive, until exclusive); `ids` selects those runs only."""

    statuses: tuple[RunStatus, ...] = ()
    workflow_id: str | None = None
    tags: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None
    ids: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing given: it selects every run (bulk actions refuse this)."""
        return not (
            self.statuses
            or self.workflow_id
            or self.tags
            or self.since is not None
            or self.until is not None
            or self.ids
        )


class StepStatus(enum.StrEnum):
    RUNNING = "running"
    WAITING = "waiting"  # a timer, an event, a token or a child run
    RETRYING = "retrying"  # failed, the next attempt is due at wake_at
    COMPLETED = "completed"
    SKIPPED = "skipped"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Lease:
    """Who executes a run: a unique owner, its host and pid, and how long a lease lasts."""

    owner: str
    host: str
    pid: int
    seconds: float = 30.0


@dataclass(frozen=True)
class Run:
    id: str
    workflow_id: str
    version: str
    definition_hash: str
    status: RunStatus
    payload: Any
    output: Any
    error: str | None
    current_step: str | None
    current_attempt: int
    step_running: bool
    queue: str
    concurrency_key: str | None
    priority: int
    trigger: dict[str, Any]
    parent_run_id: str | None
    parent_step: str | None
    idempotency_key: str | None
    cancel_requested: bool
    lease_owner: str | None
    lease_expires_at: float | None
    next_at: float | None
    active_seconds: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    not_before: float | None = None  # a delayed run's start time
    expires_at: float | None = None  # a queued run not started by then ends `expired`
    # set by the claim that started it (it had never started): no step of it is recorded
    # yet, so its runner reads none (not stored; not part of the run's value)
    fresh: bool = field(default=False, compare=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.status not in ACTIVE_STATUSES


@dataclass(frozen=True)
class StepState:
    """A step that has ended, or is waiting; the running step lives on the run row."""

    run_id: str
    step_key: str
    status: StepStatus
    attempts: int
    output: Any
    error: str | None
    started_at: float | None
    finished_at: float | None
    wake_at: float | None
    wait: dict[str, Any] | None


@dataclass(frozen=True)
class Attempt:
    run_id: str
    step_key: str
    attempt: int
    status: str  # completed | failed | crashed | timed_out
    started_at: float | None
    finished_at: float | None
    error_type: str | None
    error_message: str | None
    traceback: str | None


@dataclass(frozen=True)
class NewLog:
    level: str
    message: str
    step_key: str | None = None
    attempt: int | None = None
    extra: dict[str, Any] | None = None
    created_at: float = 0.0


@dataclass(frozen=True)
class LogEntry:
    id: int
    run_id: str
    step_key: str | None
    attempt: int | None
    level: str
    message: str
    extra: dict[str, Any] | None
    created_at: float


@dataclass(frozen=True)
class NewRun:
    id: str
    workflow_id: str
    version: str
    definition_hash: str
    payload: Any
    first_step: str
    queue: str
    concurrency_key: str | None = None
    priority: int = 0
    trigger: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    parent_step: str | None = None
    idempotency_key: str | None = None
    available_at: float | None = None  # a delayed run is not claimable before this
    parent_attempt: int | None = None
    # its first step waits for this event, or these (a wait_for_any; see lock_names)
    first_wait_event: str | tuple[str, ...] | None = None
    tags: tuple[str, ...] = ()  # "key:value", searchable (dy_run_tags)
    ttl: float | None = None  # seconds from creation: not started by then -> expired


@dataclass(frozen=True)
class StepRecord:
    """The end (or the suspension) of one attempt of a step, written with its transition."""

    step_key: str
    status: StepStatus
    attempt: int
    started_at: float | None
    output: Any = None
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None
    attempt_status: str | None = None  # written to `attempts` when set (failures, timeouts)
    wake_at: float | None = None
    wait: dict[str, Any] | None = None


@dataclass(frozen=True)
class Answer:
    """What ended a wait, read from the inbox: the first of these written wins."""

    kind: str  # event | token | child | timeout | cancel
    data: Any
    event_id: str | None = None


@dataclass(frozen=True)
class Emission:
    """An event a `send_event` step emits and the runs it triggers: stored with the step's
    result, in its transaction, so nothing is emitted for a result that was not committed."""

    event: NewEvent
    runs: tuple[NewRun, ...] = ()


@dataclass(frozen=True)
class Transition:
    """Everything one step changes, committed in one transaction with the lease checked.

    `record` ends or suspends a step; `begin` starts attempt `begin_attempt` of the next step
    (the run row remembers it, so a crash during it is seen by whoever claims the run next).
    """

    status: RunStatus
    record: StepRecord | None = None
    current_step: str | None = None
    begin_attempt: int = 0  # 0: no step is executing after this transition
    next_at: float | None = None
    release: bool = False  # give up the lease (a worker lets a waiting run go)
    output: Any = None
    error: str | None = None
    active_seconds: float = 0.0
    logs: tuple[NewLog, ...] = ()
    has_parent: bool = True  # False lets a finishing step skip waking a parent
    emission: Emission | None = None  # a send_event step's event, stored with its result
    children: tuple[NewRun, ...] = ()  # child runs started by a waiting run_workflow step
    cancel_runs: tuple[str, ...] = ()  # runs to cancel (a child whose wait ended otherwise)
    # the step it begins waits for this event, or these (a wait_for_any; see lock_names)
    reach_event: str | tuple[str, ...] | None = None
    metadata: dict[str, Any] | None = None  # keys a step set on ctx.metadata, merged into the run
    also: tuple[StepRecord, ...] = ()  # other steps' records: a block's (engine/blocks.py)

    @property
    def simple(self) -> bool:
        """Nothing beside the run row and the step row: one statement can do it all."""
        return not (
            self.logs
            or self.emission
            or self.children
            or self.cancel_runs
            or self.reach_event
            or self.metadata
            or self.also
            or self.status in (RunStatus.WAITING, RunStatus.CANCELLED)
            or (self.record is not None and self.record.attempt_status)
            # a wait_for_any that ends deletes the index rows of its alternatives (answers.py)
            or (self.record is not None and (self.record.wait or {}).get("kind") == "any")
        )


@dataclass(frozen=True)
class TransitionResult:
    cancel_requested: bool
    # a wait answered by the time the run parked: the run stays leased, to go on at once
    answer: Answer | None = None
    output: Any = None  # the recorded step output, as stored (a send_event learns `resumed`)


@dataclass(frozen=True)
class NewEvent:
    id: str
    name: str
    payload: Any
    idempotency_key: str | None = None
    source_run_id: str | None = None  # set when a run's send_event step emitted it
    source_step: str | None = None


@dataclass(frozen=True)
class QueueLimits:
    name: str
    concurrency: int | None = None
    rate_limit: int | None = None
    rate_period: float | None = None
    paused: bool = False


@dataclass(frozen=True)
class Sent:
    """What recording an event or a trigger did."""

    run_ids: tuple[str, ...]
    resumed: tuple[str, ...] = ()
    duplicate: bool = False  # the idempotency key had been used: nothing new was stored
    event_id: str | None = None


@dataclass(frozen=True)
class WorkerInfo:
    """A worker process as it registers: its executors lease runs as `<id>/<slot>`."""

    id: str
    host: str
    pid: int
    queues: tuple[str, ...] = ()
    concurrency: int = 1
    lease_seconds: float = 30.0
