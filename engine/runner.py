"""The runner: drives one run through its compiled machine, one durable transition per step.

Claiming a run begins its current step; each attempt ends in exactly one committed
transition that records the step and begins the next. Whatever kills the process, the next
claim sees where the run stood: a completed step is never executed again, an interrupted
one is executed again with the same idempotency key.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from dsl import Machine, State, TemplateError, compile_expression, render_value

from .errors import EngineError, LeaseLost
from .executor import Attempt, Host, execute
from .models import (
    ACTIVE_STATUSES,
    Lease,
    NewRun,
    Run,
    RunStatus,
    StepRecord,
    StepState,
    StepStatus,
    Transition,
)
from .registry import StepLogger
from .store import Store
from .transitions import Done, Failed, Outcome, Skipped, Suspended, decide

__all__ = ["Host", "Reporter", "Runner", "new_lease", "new_run_id"]

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
    def waiting(
        self, run: Run, state: State, until: float | None, wait: dict[str, Any] | None
    ) -> None: ...


class _Silent:
    def run_started(self, run: Run) -> None: ...
    def step_started(self, run: Run, state: State, attempt: int) -> None: ...
    def step_ended(
        self, run: Run, state: State, attempt: int, outcome: Outcome, seconds: float
    ) -> None: ...
    def waiting(
        self, run: Run, state: State, until: float | None, wait: dict[str, Any] | None
    ) -> None: ...


@dataclass
class _Live:
    """What the runner knows of the run it drives, kept in step with what it committed."""

    run: Run
    machine: Machine
    steps: dict[str, StepState]
    started_at: float


class _Heartbeat:
    """Extends the lease and flushes step logs of the run being driven, every third of the
    lease, while a long step or a sleep goes on. One daemon thread per runner, started on
    first use and kept: starting and joining a thread per run would cost more than a step."""

    def __init__(self, store: Store, lease: Lease) -> None:
        self.store, self.lease = store, lease
        self._lock = threading.Lock()
        self._current: tuple[str, StepLogger] | None = None
        self._lost: set[str] = set()
        self._thread: threading.Thread | None = None

    def watch(self, run_id: str, logger: StepLogger) -> None:
        with self._lock:
            self._current = (run_id, logger)
            self._lost.discard(run_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
                self._thread.start()

    def unwatch(self) -> None:
        with self._lock:
            self._current = None

    def lost(self, run_id: str) -> bool:
        return run_id in self._lost

    def renew(self, run_id: str) -> None:
        """The run was claimed again after a deliberate release: it is ours again."""
        with self._lock:
            self._lost.discard(run_id)

    def _beat(self) -> None:
        while True:
            time.sleep(self.lease.seconds / 3)
            with self._lock:
                current = self._current
            if current is None:
                continue
            run_id, logger = current
            try:
                if not self.store.heartbeat(run_id, self.lease, time.time(), logger.drain()):
                    self._lost.add(run_id)
            except EngineError:
                continue  # the database may be restarting; the lease outlives a short outage


class Runner:
    """Drives runs. `foreground` (the `run`/`resume` commands) sleeps through timers and
    back-offs holding the lease and executes child runs inline; otherwise (a worker) every
    wait releases the run to whoever claims it when it is due."""

    def __init__(
        self,
        store: Store,
        lease: Lease | None = None,
        *,
        foreground: bool = True,
        host: Host | None = None,
        reporter: Reporter | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.lease = lease or new_lease()
        self.foreground = foreground
        self.host = host
        self.reporter = reporter or _Silent()
        self.clock = clock
        self.sleep = sleep
        self.should_stop = should_stop
        self._machines: dict[str, Machine] = {}
        self._commit_lock = threading.Lock()
        self._heartbeat = _Heartbeat(store, self.lease)

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
        new: NewRun | None = None,
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
        new = new or NewRun(
            id=new_run_id(),
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
        """Claim the run and drive it until it ends or waits for something that is not ours
        to sleep through."""
        return self.drive_claimed(self.store.claim_run(run_id, self.lease, self.clock()))

    def drive_claimed(self, run: Run) -> Run:
        """Drive a run this runner's lease already holds (claim_run or claim_next_run)."""
        if run.finished or run.lease_owner != self.lease.owner:
            return run
        steps = {s.step_key: s for s in self.store.get_steps(run.id)}
        return self._drive(_Live(run, self.machine(run.definition_hash), steps, self.clock()))

    # the loop ---------------------------------------------------------------------------
    def _drive(self, live: _Live) -> Run:
        logger = StepLogger()
        self._heartbeat.watch(live.run.id, logger)
        try:
            while not live.run.finished and live.run.lease_owner == self.lease.owner:
                if self._heartbeat.lost(live.run.id):
                    raise LeaseLost(f"run {live.run.id}: lease lost")
                if live.run.cancel_requested:
                    self._commit(live, Transition(RunStatus.CANCELLED, error="cancelled"), logger)
                    break
                if self.should_stop():
                    # At a step boundary: the next step is begun but not executed, so hand
                    # the run back un-begun (its first attempt stays attempt 1).
                    self._commit(
                        live,
                        Transition(
                            RunStatus.QUEUED,
                            current_step=live.run.current_step,
                            release=True,
                            next_at=self.clock(),
                        ),
                        logger,
                    )
                    break
                self._step(live, logger)
        except KeyboardInterrupt:
            self.store.release(live.run.id, self.lease, self.clock())
            raise
        finally:
            self._heartbeat.unwatch()
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
                live.run = self._reclaim(run.id)
                return
            resumed = self._resumed(state, stored)
            self.reporter.step_ended(
                run, state, stored.attempts, resumed, now - (stored.started_at or now)
            )
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
        if isinstance(outcome, Suspended) and transition.release:
            self.reporter.waiting(live.run, state, outcome.wake_at, outcome.wait)
            if self.foreground and state.kind == "run_workflow":
                self._park(live, state, live.steps[state.id])

    def _park(self, live: _Live, state: State, stored: StepState) -> None:
        """A step that is not due: sleep through a timer in the foreground, run a child
        inline in the foreground, else let the run go."""
        if live.run.lease_owner == self.lease.owner:
            self.reporter.waiting(live.run, state, stored.wake_at, stored.wait)
        timer = state.kind in TIMER_KINDS or stored.status == StepStatus.RETRYING
        if self.foreground and timer and stored.wake_at is not None:
            if live.run.lease_owner == self.lease.owner:
                self.sleep(max(0.0, stored.wake_at - self.clock()))
            live.run = self._reclaim(live.run.id)
            return
        if live.run.lease_owner == self.lease.owner:
            self._commit(
                live,
                Transition(
                    RunStatus.WAITING,
                    current_step=state.id,
                    release=True,
                    next_at=stored.wake_at,
                    error=live.run.error,
                ),
                StepLogger(),
            )
        child = (stored.wait or {}).get("run_id")
        if self.foreground and state.kind == "run_workflow" and child:
            Runner(
                self.store,
                foreground=True,
                host=self.host,
                reporter=self.reporter,
                clock=self.clock,
                sleep=self.sleep,
            ).drive(child)
            reclaimed = self._reclaim(live.run.id)
            if reclaimed.lease_owner == self.lease.owner and not reclaimed.finished:
                live.run = reclaimed
                live.steps = {s.step_key: s for s in self.store.get_steps(live.run.id)}

    def _reclaim(self, run_id: str) -> Run:
        run = self.store.claim_run(run_id, self.lease, self.clock())
        self._heartbeat.renew(run_id)
        return run

    def _commit(self, live: _Live, transition: Transition, logger: StepLogger) -> None:
        with self._commit_lock:
            logs = transition.logs + tuple(logger.drain())
            transition = replace(
                transition, logs=logs, has_parent=live.run.parent_run_id is not None
            )
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
                finished_at=now if transition.status not in ACTIVE_STATUSES else None,
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
        # The foreground keeps its lease through timers and back-offs it sleeps through; any
        # other wait releases the run at once, so whatever ends the wait can wake it.
        timer = isinstance(outcome, Suspended) and outcome.wait.get("kind") == "timer"
        hold = self.foreground and (timer or isinstance(outcome, Failed))
        return decide(
            live.machine,
            state,
            attempt,
            started_at,
            outcome,
            self.clock(),
            run_error=live.run.error,
            run_output=lambda record: self._output(live, record),
            hold_lease=hold,
            active_seconds=elapsed,
            logs=tuple(logger.drain()),
        )

    # executing one attempt ----------------------------------------------------------------
    def _attempt(
        self, live: _Live, state: State, attempt: int, logger: StepLogger, now: float
    ) -> Outcome:
        field = f"steps.{state.id}"
        machine = live.machine
        timeout = state.timeout
        if machine.timeout is not None:
            remaining = machine.timeout - live.run.active_seconds
            if remaining <= 0:
                return Failed(
                    "RunTimeout",
                    f"the run exceeded its timeout of {machine.timeout:g}s",
                    retryable=False,
                )
            if state.kind in ("call", "for_each"):
                timeout = remaining if timeout is None else min(timeout, remaining)
        scope = self._scope(live)
        try:
            if state.when is not None and not compile_expression(
                "{{ " + state.when + " }}", f"{field}.when"
            ).evaluate(scope, f"{field}.when"):
                return Skipped()
        except TemplateError as exc:
            return Failed("TemplateError", str(exc), retryable=False)
        done_items = (
            {
                int(key[len(state.id) + 1 : -1]): st.output
                for key, st in live.steps.items()
                if key.startswith(state.id + "[") and st.status == StepStatus.COMPLETED
            }
            if state.kind == "for_each"
            else {}
        )

        def record_item(index: int, item_attempt: int, started: float, output: Any) -> None:
            record = StepRecord(
                f"{state.id}[{index}]", StepStatus.COMPLETED, item_attempt, started, output=output
            )
            self._commit(
                live,
                Transition(RunStatus.RUNNING, record, current_step=state.id, begin_attempt=attempt),
                logger,
            )

        return execute(
            Attempt(
                live.run,
                state,
                attempt,
                scope,
                logger,
                now,
                timeout,
                self.host,
                done_items,
                record_item,
                self.sleep,
            )
        )

    def _resumed(self, state: State, stored: StepState) -> Outcome:
        if stored.resume_data is None:  # the wake time passed
            if state.kind in TIMER_KINDS:
                return Done(None)
            return Failed(
                "TimeoutError",
                f"steps.{state.id} timed out after {state.timeout or 0:g}s waiting",
                retryable=True,
                attempt_status="timed_out",
            )
        data = stored.resume_data
        if isinstance(data, dict) and data.get("status") in ("failed", "cancelled"):
            return Failed(
                "ChildFailed",
                f"child run {data.get('run_id')} {data['status']}: {data.get('error')}",
                retryable=True,
            )
        return Done(data.get("output") if isinstance(data, dict) else data)

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
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()
