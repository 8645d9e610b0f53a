"""What happens after an attempt: the pure decision from (machine, state, outcome, now) to a
`Transition` the store commits atomically."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dsl import COMPLETED, FAILED, Machine, State, TemplateError
from dsl.blocks import descendants, failure_route

from .models import Emission, NewLog, NewRun, RunStatus, StepRecord, StepStatus, Transition
from .retry import backoff_delay

__all__ = ["Done", "Enter", "Failed", "Outcome", "Skipped", "Suspended", "decide"]


@dataclass(frozen=True)
class Done:
    output: Any
    emission: Emission | None = None  # a send_event's event, stored with this result
    metadata: dict[str, Any] | None = None  # what the step set on ctx.metadata


@dataclass(frozen=True)
class Skipped:
    pass


@dataclass(frozen=True)
class Suspended:
    """The step waits: until `wake_at` (a timer or a timeout), or for something external."""

    wake_at: float | None
    wait: dict[str, Any]
    children: tuple[NewRun, ...] = ()  # started in the transaction that parks the run


@dataclass(frozen=True)
class Failed:
    error_type: str
    message: str
    retryable: bool
    traceback: str | None = None
    attempt_status: str = "failed"
    metadata: dict[str, Any] | None = None  # what the step set on ctx.metadata before failing
    error_kinds: tuple[str, ...] = ()  # the exception's class names, its bases included
    output: Any = None  # kept on the failed record (a repeat's rounds)


@dataclass(frozen=True)
class Enter:
    """A block step opens one of its lists (engine/blocks.py): the run moves to `target`;
    the block's own record stays open (`running`) holding `progress`; `skipped` are the
    steps of the lists not taken."""

    target: str
    progress: Any = None
    skipped: tuple[str, ...] = ()


Outcome = Done | Skipped | Suspended | Failed | Enter


def decide(
    machine: Machine,
    state: State,
    attempt: int,
    started_at: float | None,
    outcome: Outcome,
    now: float,
    *,
    run_error: str | None,
    run_output: Callable[[StepRecord], Any],
    hold_lease: bool,
    active_seconds: float = 0.0,
    logs: tuple[NewLog, ...] = (),
    rand: Callable[[], float] | None = None,
    cancel_runs: tuple[str, ...] = (),
) -> Transition:
    """The transition after one attempt of `state`.

    `run_output` computes the run's output, given the final step's record, when the machine
    completes; `hold_lease` keeps
    the lease through a wait (the foreground `run`) instead of releasing the run to workers.
    """
    common: dict[str, Any] = {
        "active_seconds": active_seconds,
        "logs": logs,
        "cancel_runs": cancel_runs,
        "metadata": getattr(outcome, "metadata", None) or None,
    }
    if isinstance(outcome, Enter):
        record = StepRecord(
            state.id, StepStatus.RUNNING, attempt, started_at, output=outcome.progress
        )
        return Transition(
            RunStatus.RUNNING,
            record,
            current_step=outcome.target,
            begin_attempt=1,
            error=run_error,
            also=_skipped(outcome.skipped),
            **common,
        )
    if isinstance(outcome, Suspended):
        record = StepRecord(
            state.id,
            StepStatus.WAITING,
            attempt,
            started_at,
            wake_at=outcome.wake_at,
            wait=outcome.wait,
        )
        return Transition(
            RunStatus.WAITING,
            record,
            current_step=state.id,
            release=not hold_lease,
            next_at=outcome.wake_at,
            error=run_error,
            children=outcome.children,
            **common,
        )
    if isinstance(outcome, Failed):
        policy = state.retry
        if outcome.retryable and policy is not None and attempt < policy.max_attempts:
            delay = backoff_delay(policy, attempt, *(() if rand is None else (rand,)))
            record = StepRecord(
                state.id,
                StepStatus.RETRYING,
                attempt,
                started_at,
                error=f"{outcome.error_type}: {outcome.message}",
                error_type=outcome.error_type,
                traceback=outcome.traceback,
                attempt_status=outcome.attempt_status,
                wake_at=now + delay,
            )
            return Transition(
                RunStatus.WAITING,
                record,
                current_step=state.id,
                release=not hold_lease,
                next_at=now + delay,
                error=run_error,
                **common,
            )
        message = f"{outcome.error_type}: {outcome.message}"
        record = StepRecord(
            state.id,
            StepStatus.FAILED,
            attempt,
            started_at,
            output=outcome.output,
            error=message,
            error_type=outcome.error_type,
            traceback=outcome.traceback,
            attempt_status=outcome.attempt_status,
        )
        kinds = outcome.error_kinds or (outcome.error_type,)
        target, left, caught = failure_route(machine, state, kinds)
        error = run_error if caught else run_error or f"step {state.id} failed: {message}"
        common["also"] = tuple(  # the blocks the failure leaves fail with it
            StepRecord(b, StepStatus.FAILED, 1, None, error=f"{message} (in steps.{state.id})")
            for b in left
        )
        return _move(machine, target, record, error, run_output, common)
    if isinstance(outcome, Skipped):
        record = StepRecord(state.id, StepStatus.SKIPPED, attempt, started_at)
        common["also"] = _skipped(s.id for s in descendants(machine, state.id))
    else:
        if state.catch is not None:  # it did not fail: its catch steps did not run
            common["also"] = _skipped(s.id for s in descendants(machine, state.id, "catch"))
        record = StepRecord(
            state.id, StepStatus.COMPLETED, attempt, started_at, output=outcome.output
        )
        if outcome.emission is not None:
            common["emission"] = outcome.emission
    return _move(machine, state.next, record, run_error, run_output, common)


def _skipped(step_ids: Iterable[str]) -> tuple[StepRecord, ...]:
    return tuple(StepRecord(i, StepStatus.SKIPPED, 0, None) for i in step_ids)


def _move(
    machine: Machine,
    target: str,
    record: StepRecord,
    error: str | None,
    run_output: Callable[[StepRecord], Any],
    common: dict[str, Any],
) -> Transition:
    if target == COMPLETED:
        try:
            output = run_output(record)
        except TemplateError as exc:
            return Transition(RunStatus.FAILED, record, error=f"run output failed: {exc}", **common)
        return Transition(RunStatus.COMPLETED, record, output=output, **common)
    if target == FAILED:
        return Transition(RunStatus.FAILED, record, error=error, **common)
    return Transition(
        RunStatus.RUNNING, record, current_step=target, begin_attempt=1, error=error, **common
    )
