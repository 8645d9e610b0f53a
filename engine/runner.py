"""The runner: drives one run through its compiled machine, one durable transition per step.

Claiming a run begins its current step; each attempt ends in exactly one committed
transition that records the step and begins the next. Whatever kills the process, the next
claim sees where the run stood: a completed step is never executed again, an interrupted
one is executed again with the same idempotency key.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Protocol

from dsl import Machine, State, TemplateError, compile_expression, render_value

from .errors import EngineError, LeaseLost
from .models import Lease, NewRun, Run, RunStatus, StepRecord, StepState, StepStatus, Transition
from .registry import StepContext, StepLogger, get_step
from .retry import is_retryable
from .store import Store
from .transitions import Done, Failed, Outcome, Skipped, Suspended, decide

__all__ = ["Reporter", "Runner", "new_lease", "new_run_id"]

MAX_INTERRUPTIONS = 3  # extra attempts granted to a step whose process died mid-attempt
TIMER_KINDS = ("wait", "wait_until")


def new_run_id() -> str:
    """Time-ordered, unique: 12 hex digits of milliseconds, then 16 random hex digits."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:16]}"


def new_lease(seconds: float = 30.0) -> Lease:
    return Lease(
        owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        host=socket.gethostname(),
        pid=os.getpid(),
        seconds=seconds,
    )


class Reporter(Protocol):
    def run_started(self, run: Run) -> None: ...
    def step_started(self, run: Run, state: State, attempt: int) -> None: ...
    def step_ended(
        self, run: Run, state: State, attempt: int, outcome: Outcome, seconds: float
    ) -> None: ...
    def waiting(self, run: Run, state: State, until: float | None) -> None: ...


class _Silent:
    def run_started(self, run: Run) -> None: ...
    def step_started(self, run: Run, state: State, attempt: int) -> None: ...
    def step_ended(
        self, run: Run, state: State, attempt: int, outcome: Outcome, seconds: float
    ) -> None: ...
    def waiting(self, run: Run, state: State, until: float | None) -> None: ...


@dataclass
class _Live:
    """What the runner knows of the run it drives, kept in step with what it committed."""

    run: Run
    machine: Machine
    steps: dict[str, StepState]
    started_at: float


class _Heartbeat:
    """Extends the lease and flushes step logs while a long step or a sleep goes on."""

    def __init__(self, store: Store, run_id: str, lease: Lease, logger: StepLogger) -> None:
        self.store, self.run_id, self.lease, self.logger = store, run_id, lease, logger
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat:{run_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease.seconds / 3):
            try:
                if not self.store.heartbeat(
                    self.run_id, self.lease, time.time(), self.logger.drain()
                ):
                    self.lost = True
                    return
            except EngineError:
                continue  # the database may be restarting; the lease outlives a short outage


class Runner:
    def __init__(
        self,
        store: Store,
        lease: Lease | None = None,
        *,
        foreground: bool = True,
        reporter: Reporter | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.lease = lease or new_lease()
        self.foreground = foreground
        self.reporter = reporter or _Silent()
        self.clock = clock
        self.sleep = sleep
        self._machines: dict[str, Machine] = {}

    # entry points -----------------------------------------------------------------------
    def machine(self, content_hash: str) -> Machine:
        if content_hash not in self._machines:
            self._machines[content_hash] = Machine.from_json(
                self.store.load_definition(content_hash)
            )
        return self._machines[content_hash]

    def start(
        self,
        machine: Machine,
        payload: Any,
        trigger: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Create a run of `machine` leased to this runner (one commit) and drive it."""
        if machine.content_hash not in self._machines:  # stored once per runner
            self.store.save_definition(
                machine.content_hash,
                machine.workflow_id,
                machine.version,
                machine.to_json(),
                machine.source_path,
            )
            self._machines[machine.content_hash] = machine
        new = NewRun(
            id=run_id or new_run_id(),
            workflow_id=machine.workflow_id,
            version=machine.version,
            definition_hash=machine.content_hash,
            payload=payload,
            first_step=machine.start,
            queue=machine.queue.name,
            priority=machine.priority,
            trigger=trigger or {"kind": "manual"},
        )
        run = self.store.create_run(new, self.clock(), lease=self.lease)
        self.reporter.run_started(run)
        return self._drive(_Live(run, machine, {}, self.clock()))

    def drive(self, run_id: str) -> Run:
        """Claim the run and drive it until it ends, waits for something external, or (in
        the background) waits for a timer."""
        run = self.store.claim_run(run_id, self.lease, self.clock())
        if run.finished:
            return run
        steps = {s.step_key: s for s in self.store.get_steps(run_id)}
        return self._drive(_Live(run, self.machine(run.definition_hash), steps, self.clock()))

    # the loop ---------------------------------------------------------------------------
    def _drive(self, live: _Live) -> Run:
        logger = StepLogger()
        try:
            with _Heartbeat(self.store, live.run.id, self.lease, logger) as beat:
                while not live.run.finished and live.run.lease_owner == self.lease.owner:
                    if beat.lost:
                        raise LeaseLost(f"run {live.run.id}: lease lost")
                    if live.run.cancel_requested:
                        self._commit(
                            live, Transition(RunStatus.CANCELLED, error="cancelled"), logger
                        )
                        break
                    self._step(live, logger)
        except KeyboardInterrupt:
            self.store.release(live.run.id, self.lease, self.clock())
            raise
        return live.run

    def _step(self, live: _Live, logger: StepLogger) -> None:
        """Advance by one transition (or park the run: the lease is then released)."""
        run, machine = live.run, live.machine
        state = machine.state(run.current_step or machine.start)
        stored = live.steps.get(state.id)
        now = self.clock()
        if (
            not run.step_running
            and stored is not None
            and stored.status in (StepStatus.WAITING, StepStatus.RETRYING)
        ):
            due = stored.wake_at is not None and stored.wake_at <= now
            if stored.resume_data is None and not due:
                self._park(live, state, stored)
                return
            if stored.status == StepStatus.RETRYING:  # back-off over: claiming begins an attempt
                live.run = self.store.claim_run(run.id, self.lease, now)
                return
            resumed = self._resumed(state, stored)
            transition = self._decide(
                live, state, stored.attempts, stored.started_at, resumed, logger, 0.0
            )
            if transition.record is not None:  # keep what the step waited for, for history
                kept = replace(transition.record, wake_at=stored.wake_at, wait=stored.wait)
                transition = replace(transition, record=kept)
            self._commit(live, transition, logger)
            return
        attempt = run.current_attempt
        if state.retry and attempt > state.retry.max_attempts + MAX_INTERRUPTIONS:
            outcome: Outcome = Failed(
                "Interrupted",
                f"the step was interrupted {attempt - 1} times "
                "(its process died during each attempt)",
                retryable=False,
            )
        else:
            self.reporter.step_started(run, state, attempt)
            outcome = self._attempt(live, state, attempt, logger, now)
        elapsed = self.clock() - now
        self.reporter.step_ended(run, state, attempt, outcome, elapsed)
        transition = self._decide(live, state, attempt, now, outcome, logger, elapsed)
        self._commit(live, transition, logger)

    def _park(self, live: _Live, state: State, stored: StepState) -> None:
        """A step that is not due: sleep through a timer in the foreground, else let go."""
        self.reporter.waiting(live.run, state, stored.wake_at)
        if (
            self.foreground
            and stored.wake_at is not None
            and (state.kind in TIMER_KINDS or stored.status == StepStatus.RETRYING)
        ):
            self.sleep(max(0.0, stored.wake_at - self.clock()))
            live.run = self.store.claim_run(live.run.id, self.lease, self.clock())
            return
        transition = Transition(
            RunStatus.WAITING,
            current_step=state.id,
            release=True,
            next_at=stored.wake_at,
            error=live.run.error,
        )
        self._commit(live, transition, StepLogger())

    def _commit(self, live: _Live, transition: Transition, logger: StepLogger) -> None:
        logs = transition.logs + tuple(logger.drain())
        transition = replace(transition, logs=logs)
        now = self.clock()
        result = self.store.commit_transition(live.run.id, self.lease, transition, now)
        rec = transition.record
        if rec is not None:
            live.steps[rec.step_key] = StepState(
                live.run.id,
                rec.step_key,
                rec.status,
                rec.attempt,
                rec.output,
                rec.error,
                rec.started_at,
                now,
                rec.wake_at,
                rec.wait,
                None,
            )
        live.run = replace(
            live.run,
            status=transition.status,
            current_step=transition.current_step,
            current_attempt=transition.begin_attempt or live.run.current_attempt,
            step_running=transition.begin_attempt > 0,
            error=transition.error if transition.error is not None else live.run.error,
            output=transition.output
            if transition.status == RunStatus.COMPLETED
            else live.run.output,
            active_seconds=live.run.active_seconds + transition.active_seconds,
            cancel_requested=result.cancel_requested,
            lease_owner=None if transition.release else live.run.lease_owner,
            updated_at=now,
            finished_at=now
            if transition.status not in (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)
            else None,
        )

    def _decide(
        self,
        live: _Live,
        state: State,
        attempt: int,
        started_at: float | None,
        outcome: Outcome,
        logger: StepLogger,
        elapsed: float,
    ) -> Transition:
        return decide(
            live.machine,
            state,
            attempt,
            started_at,
            outcome,
            self.clock(),
            run_error=live.run.error,
            run_output=lambda record: self._output(live, record),
            hold_lease=self.foreground,
            active_seconds=elapsed,
            logs=tuple(logger.drain()),
        )

    # executing one attempt ----------------------------------------------------------------
    def _attempt(
        self, live: _Live, state: State, attempt: int, logger: StepLogger, now: float
    ) -> Outcome:
        field = f"steps.{state.id}"
        machine = live.machine
        remaining = None
        if machine.timeout is not None:
            remaining = machine.timeout - live.run.active_seconds
            if remaining <= 0:
                return Failed(
                    "RunTimeout",
                    f"the run exceeded its timeout of {machine.timeout:g}s",
                    retryable=False,
                )
        try:
            scope = self._scope(live)
            if state.when is not None and not compile_expression(
                "{{ " + state.when + " }}", f"{field}.when"
            ).evaluate(scope, f"{field}.when"):
                return Skipped()
            cfg = state.config
            if state.kind == "log":
                message = str(render_value(cfg["message"], scope, f"{field}.log"))
                logger.bind(state.id, attempt).log(cfg.get("level", "info"), message)
                return Done(message)
            if state.kind == "call":
                timeout = (
                    state.timeout
                    if remaining is None
                    else min(state.timeout or remaining, remaining)
                )
                kwargs = render_value(cfg["with"], scope, f"{field}.with")
                return self._call(
                    live.run,
                    state,
                    cfg["function"],
                    kwargs,
                    attempt,
                    timeout,
                    logger.bind(state.id, attempt),
                )
            if state.kind == "wait":
                return self._timer(now + float(cfg["seconds"]), now)
            if state.kind == "wait_until":
                at = render_value(cfg["at"], scope, f"{field}.wait_until")
                return self._timer(_parse_instant(at, f"{field}.wait_until"), now)
        except TemplateError as exc:
            return Failed("TemplateError", str(exc), retryable=False)
        return Failed(
            "Unsupported",
            f"step kind `{state.kind}` is not executed by this version of durable-yaml yet",
            retryable=False,
        )

    def _timer(self, wake_at: float, now: float) -> Outcome:
        return Done(None) if wake_at <= now else Suspended(wake_at, {"kind": "timer"})

    def _call(
        self,
        run: Run,
        state: State,
        function: str,
        kwargs: dict[str, Any],
        attempt: int,
        timeout: float | None,
        logger: StepLogger,
    ) -> Outcome:
        try:
            registered = get_step(function)
        except EngineError as exc:
            return Failed("UnknownStep", f"{exc} (steps.{state.id}.call)", retryable=False)
        problem = registered.check_arguments(kwargs)
        if problem:
            return Failed("TypeError", f"{problem} (steps.{state.id}.with)", retryable=False)
        ctx = StepContext(run.id, state.id, attempt, f"{run.id}:{state.id}", logger)
        try:
            value = registered.invoke(kwargs, ctx, timeout)
        except Exception as exc:
            retryable = state.retry is not None and is_retryable(state.retry, exc)
            status = "timed_out" if isinstance(exc, TimeoutError) else "failed"
            return Failed(
                type(exc).__name__, str(exc) or repr(exc), retryable, traceback.format_exc(), status
            )
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return Failed(
                "StepOutputInvalid",
                f"steps.{state.id}: `{function}` returned a "
                f"{type(value).__name__}, which is not JSON data ({exc})",
                retryable=False,
            )
        return Done(value)

    def _resumed(self, state: State, stored: StepState) -> Outcome:
        if stored.resume_data is None:  # the wake time passed
            if state.kind in TIMER_KINDS:
                return Done(None)
            return Failed(
                "TimeoutError",
                f"steps.{state.id} timed out waiting",
                retryable=True,
                attempt_status="timed_out",
            )
        data = stored.resume_data
        if isinstance(data, dict) and data.get("status") in ("failed", "cancelled"):
            return Failed("ChildFailed", str(data.get("error")), retryable=True)
        return Done(data.get("output") if isinstance(data, dict) and "output" in data else data)

    # templates ------------------------------------------------------------------------------
    def _scope(self, live: _Live) -> dict[str, Any]:
        run, machine = live.run, live.machine
        steps: dict[str, Any] = {
            s.id: {"output": None, "status": "pending", "attempts": 0} for s in machine.states
        }
        for key, st in live.steps.items():
            if key in steps:
                steps[key] = {
                    "output": st.output,
                    "status": st.status.value,
                    "attempts": st.attempts,
                }
        started = run.started_at or run.created_at
        return {
            "payload": run.payload,
            "steps": steps,
            "run": {
                "id": run.id,
                "workflow": run.workflow_id,
                "version": run.version,
                "started_at": _iso(started),
                "error": run.error,
            },
            "trigger": run.trigger,
            "env": {name: os.environ[name] for name in machine.env if name in os.environ},
        }

    def _output(self, live: _Live, last: StepRecord) -> Any:
        """The run's output, with `last` (the step completing the run) in scope."""
        machine = live.machine
        if machine.output_is_default:
            return last.output
        scope = self._scope(live)
        scope["steps"][last.step_key] = {
            "output": last.output,
            "status": last.status.value,
            "attempts": last.attempt,
        }
        return render_value(machine.output, scope, "output")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def _parse_instant(value: Any, field: str) -> float:
    if not isinstance(value, str):
        raise TemplateError(field, f"expected an ISO-8601 timestamp, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise TemplateError(field, f"{value!r} is not an ISO-8601 timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()
