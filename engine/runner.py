"""The runner: drives one run through its compiled machine, one durable transition per step.

Claiming a run begins its current step; each attempt ends in exactly one committed
transition that records the step and begins the next. Whatever kills the process, the next
claim sees where the run stood: a completed step is never executed again, an interrupted
one is executed again with the same idempotency key.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from dsl import BLOCK_KINDS, Machine, State, TemplateError, compile_expression, render_value

from . import answers, blocks, fanout
from .errors import LeaseLost, RunBusy, ValueNotStorable
from .executor import Attempt, Host, execute
from .models import (
    ACTIVE_STATUSES,
    Answer,
    Lease,
    NewRun,
    Run,
    RunStatus,
    StepRecord,
    StepState,
    StepStatus,
    Transition,
)
from .observe import observed_attempt
from .pauses import pause_point
from .registry import StepLogger
from .store import Store
from .store.workers import foreground_owner
from .transitions import Done, Failed, Outcome, Skipped, Suspended, decide

__all__ = [
    "ForegroundDriver",
    "Host",
    "Reporter",
    "Runner",
    "WorkerDriver",
    "new_lease",
    "new_run_id",
]

log = logging.getLogger("durable_yaml.runner")
D = TypeVar("D")
MAX_INTERRUPTIONS = 3  # extra attempts granted to a step whose process died mid-attempt
TIMER_KINDS = ("wait", "wait_until")
LOG_FLUSH_SECONDS = 0.5  # a step's log lines reach the store this soon (with a heartbeat)


def new_run_id() -> str:
    """Time-ordered, unique: 12 hex digits of milliseconds, then 16 random hex digits."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:16]}"


def new_lease(seconds: float = 30.0) -> Lease:
    return Lease(
        owner=foreground_owner(),  # liveness: see store/workers.py
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
    answer: Answer | None = None  # found when the run parked: it stayed leased to go on
    inherited: dict[str, StepState] | None = None  # a branch run's: the steps before it
    root: Run | None = None  # a branch run's: the run whose parallel step started it
    copied: tuple[StepRecord, ...] = ()  # a parallel that ends: its branches' step records


class _Heartbeats:
    """Extends the leases of the runs being driven in this process and flushes their step
    logs, each a third of its lease after the last beat, or `LOG_FLUSH_SECONDS` after it
    when log lines wait (so `runs logs --follow` and the SSE stream see them while the step
    works). One daemon thread per process, however many runners: a runner that ends
    leaves nothing behind."""

    _shared: _Heartbeats | None = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> _Heartbeats:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # lease owner -> (store, lease, run id, logger, the runner's commit lock, last beat)
        self._watched: dict[str, tuple[Store, Lease, str, StepLogger, threading.Lock, float]] = {}
        self._lost: set[tuple[str, str]] = set()
        self._thread: threading.Thread | None = None

    def watch(
        self,
        store: Store,
        lease: Lease,
        run_id: str,
        logger: StepLogger,
        commit_lock: threading.Lock,
    ) -> None:
        """Beat for `run_id` under `lease`; `commit_lock` is the lock the runner holds while
        it commits a step: a beat takes lines and writes them under it, so a commit that
        ends the run (and its lease) never comes between, leaving the lines unwritable."""
        with self._lock:
            now = time.monotonic()
            self._watched[lease.owner] = (store, lease, run_id, logger, commit_lock, now)
            self._lost.discard((lease.owner, run_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
                self._thread.start()

    def unwatch(self, lease: Lease) -> None:
        with self._lock:
            self._watched.pop(lease.owner, None)

    def lost(self, lease: Lease, run_id: str) -> bool:
        return (lease.owner, run_id) in self._lost

    def renew(self, lease: Lease, run_id: str) -> None:
        """The run was claimed again after a deliberate release: it is ours again."""
        with self._lock:
            self._lost.discard((lease.owner, run_id))

    def _beat(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                due = [
                    w
                    for w in self._watched.values()
                    if time.monotonic() - w[5] >= w[1].seconds / 3
                    or (w[3].pending and time.monotonic() - w[5] >= LOG_FLUSH_SECONDS)
                ]
            for store, lease, run_id, logger, commit_lock, _ in due:
                if not commit_lock.acquire(blocking=False):
                    continue  # a commit is under way: it takes the lines and renews the lease
                try:
                    lines = logger.drain()
                    pause_point("runner.heartbeat.drained")
                    held = store.heartbeat(run_id, lease, store.now(), lines)
                except Exception as exc:  # the database may be restarting: the lease outlives it
                    log.warning("heartbeat of run %s failed: %s", run_id, exc)
                    continue
                finally:
                    commit_lock.release()
                with self._lock:
                    if not held:
                        self._lost.add((lease.owner, run_id))
                    current = self._watched.get(lease.owner)
                    if current is not None and current[2] == run_id:
                        self._watched[lease.owner] = (*current[:5], time.monotonic())


class Runner:
    """Drives runs through their machines: one step executor, and a driver deciding what a
    wait does. `WorkerDriver` (a worker) releases the run at every wait, to whoever claims
    it when it is due; `ForegroundDriver` (the `run`/`resume` commands) sleeps through timers
    and back-offs holding the lease, runs child runs inline, and waits for its queue's
    limits before it starts a run."""

    def __init__(
        self,
        store: Store,
        lease: Lease | None = None,
        *,
        foreground: bool = True,
        host: Host | None = None,
        reporter: Reporter | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.lease = lease or new_lease()
        self.host = host
        self.reporter = reporter or _Silent()
        self.clock = clock or store.now
        self.sleep = sleep
        self.should_stop = should_stop
        self.driver: Driver = ForegroundDriver(self) if foreground else WorkerDriver(self)
        self._machines: dict[str, Machine] = {}
        self._commit_lock = threading.Lock()
        self._heartbeats = _Heartbeats.shared()

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
        """Create a run of `machine` leased to this runner and drive it."""
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
            first_wait_event=_wait_event(machine, machine.start),
        )
        run = self.driver.create(machine, new)
        self.reporter.run_started(run)
        if run.lease_owner != self.lease.owner:
            return run
        return self._drive(_Live(run, machine, {}, self.clock()))

    def drive(self, run_id: str) -> Run:
        """Claim the run and drive it until it ends or waits for something that is not ours
        to sleep through."""
        return self.drive_claimed(self.driver.claim(run_id))

    def drive_claimed(self, run: Run) -> Run:
        """Drive a run this runner's lease already holds (claim_run or claim_next_run)."""
        if run.finished or run.lease_owner != self.lease.owner:
            return run
        # a run this claim started for the first time has no step recorded: nothing to read
        steps = {} if run.fresh else {s.step_key: s for s in self.store.get_steps(run.id)}
        return self._drive(_Live(run, self.machine(run.definition_hash), steps, self.clock()))

    # the loop ---------------------------------------------------------------------------
    def _drive(self, live: _Live) -> Run:
        logger = StepLogger(
            run_id=live.run.id, listener=getattr(self.reporter, "log_written", None)
        )
        self._heartbeats.watch(self.store, self.lease, live.run.id, logger, self._commit_lock)
        try:
            while not live.run.finished and live.run.lease_owner == self.lease.owner:
                if self._heartbeats.lost(self.lease, live.run.id):
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
            self._heartbeats.unwatch(self.lease)
        return live.run

    def _step(self, live: _Live, logger: StepLogger) -> None:
        """Advance by one transition (or park the run: the lease is then released)."""
        run, machine = live.run, live.machine
        state = machine.state(run.current_step or machine.start)
        stored = live.steps.get(state.id)
        if (
            not run.step_running
            and stored is not None
            and stored.status in (StepStatus.WAITING, StepStatus.RETRYING)
        ):
            self._continue_wait(live, state, stored, logger)
            return
        now = self.clock()
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
            with observed_attempt(run, state, attempt) as ended:
                outcome = self._attempt(live, state, attempt, logger, now)
                ended(outcome, self.clock() - now)
        elapsed = self.clock() - now
        self.reporter.step_ended(run, state, attempt, outcome, elapsed)
        started = now
        if stored is not None and state.kind in BLOCK_KINDS and blocks.is_open(stored):
            started = stored.started_at or now  # a block closing: it began when it opened
        transition = self._decide(live, state, attempt, started, outcome, logger, elapsed)
        self._commit(live, transition, logger)
        if isinstance(outcome, Suspended) and live.run.lease_owner is None:
            self.reporter.waiting(live.run, state, outcome.wake_at, outcome.wait)
            self.driver.parked(live, state, live.steps[state.id])

    def _continue_wait(
        self, live: _Live, state: State, stored: StepState, logger: StepLogger
    ) -> None:
        """The current step waits or backs off: end it if its answer or its time has come."""
        now = self.clock()
        due = stored.wake_at is not None and stored.wake_at <= now
        if stored.status == StepStatus.RETRYING:
            if not due:
                self.driver.not_due(live, state, stored)
            else:  # back-off over: claiming begins the next attempt
                self._reclaim_live(live)
            return
        if (stored.wait or {}).get("kind") == fanout.KIND:
            self._continue_children(live, state, stored, logger, due)
            return
        if state.kind == "repeat":  # the delay between two rounds
            if not due:
                self.driver.not_due(live, state, stored)
                return
            outcome: Outcome = blocks.next_round(live.machine, state, stored)
            self._commit(
                live,
                self._decide(live, state, stored.attempts, stored.started_at, outcome, logger, 0.0),
                logger,
            )
            return
        if state.kind in TIMER_KINDS:
            answer: Answer | None = Answer("timeout", None) if due else None
        else:
            answer = live.answer or self.store.take_answer(
                live.run.id, state.id, stored.attempts, now, timed_out=due
            )
        live.answer = None
        if answer is None:
            self.driver.not_due(live, state, stored)
            return
        outcome = _answered(state, stored, answer)
        self.reporter.step_ended(
            live.run, state, stored.attempts, outcome, now - (stored.started_at or now)
        )
        child = (stored.wait or {}).get("run_id")
        cancel = (child,) if child and answer.kind != "child" else ()  # never orphaned
        transition = self._decide(
            live, state, stored.attempts, stored.started_at, outcome, logger, 0.0, cancel
        )
        if transition.record is not None:  # keep what the step waited for, for history
            kept = replace(transition.record, wake_at=stored.wake_at, wait=stored.wait)
            transition = replace(transition, record=kept)
        self._commit(live, transition, logger)

    def _continue_children(
        self, live: _Live, state: State, stored: StepState, logger: StepLogger, due: bool
    ) -> None:
        """A for_each's child runs: start the next ones, or end the step (engine/fanout.py)."""
        live.answer = None
        answers = self.store.child_answers(live.run.id, state.id, stored.attempts)
        wait = stored.wait or {}
        outcome: Outcome | None
        if due:  # the step's timeout
            outcome = Failed(
                "TimeoutError",
                f"steps.{state.id} timed out after {state.timeout or 0:g}s waiting for its "
                f"child runs ({len(answers)} of {wait.get('items')} ended)",
                retryable=True,
                attempt_status="timed_out",
            )
        else:
            outcome = self._children_round(live, state, stored.attempts, answers, wait)
        if outcome is None:
            self.driver.not_due(live, state, stored)
            return
        cancel: tuple[str, ...] = ()
        if isinstance(outcome, Failed):  # its still active children are withdrawn with it
            cancel = fanout.active_children(live.run.id, state.id, stored.attempts, wait, answers)
        self.reporter.step_ended(live.run, state, stored.attempts, outcome, 0.0)
        transition = self._decide(
            live, state, stored.attempts, stored.started_at, outcome, logger, 0.0, cancel
        )
        self._commit(live, transition, logger)
        if isinstance(outcome, Suspended) and live.run.lease_owner is None:
            self.reporter.waiting(live.run, state, outcome.wake_at, outcome.wait)
            self.driver.parked(live, state, live.steps[state.id])

    def _children_round(
        self,
        live: _Live,
        state: State,
        attempt: int,
        answers: dict[int, Any],
        wait: dict[str, Any] | None,
    ) -> Outcome | None:
        """One round of a step that starts child runs (engine/fanout.py)."""
        if self.host is None:
            return Failed("Unsupported", f"steps.{state.id}: child runs need the engine", False)
        stored = live.steps.get(state.id)
        outcome, live.copied = fanout.children_round(
            self.store,
            self.host,
            live.machine,
            live.run,
            state,
            attempt,
            answers,
            wait,
            stored.wake_at if stored is not None and wait is not None else None,
            self.clock(),
            lambda: self._scope(live),
        )
        return outcome

    def park(self, live: _Live, state: State, stored: StepState) -> None:
        """Release a waiting run to whoever claims it when it is due, unless its answer is
        there by the time the park commits (the run then stays leased and goes on)."""
        if live.run.lease_owner != self.lease.owner:
            return
        pause_point("runner.before_park")
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

    def _reclaim(self, run_id: str) -> Run:
        run = self.store.claim_run(run_id, self.lease, self.clock())
        self._heartbeats.renew(self.lease, run_id)
        return run

    def _reclaim_live(self, live: _Live) -> None:
        """Claim the run again after sleeping through a timer or a back-off holding its
        lease, and read its steps again: the lease may have expired meanwhile (the process
        stopped) and a worker may have driven the run on (the rounds of a repeat, the steps
        after a wait) before parking it; going on from what this process knew would run
        them again."""
        live.run = self._reclaim(live.run.id)
        live.steps = {s.step_key: s for s in self.store.get_steps(live.run.id)}

    def _commit(self, live: _Live, transition: Transition, logger: StepLogger) -> None:
        with self._commit_lock:
            logs = transition.logs + tuple(logger.drain())
            reaches = transition.current_step not in (None, live.run.current_step)
            transition = evolve(
                transition,
                logs=logs,
                has_parent=live.run.parent_run_id is not None,
                reach_event=_wait_event(live.machine, transition.current_step) if reaches else None,
            )
            pause_point(f"runner.before_commit.{transition.status.value}")
            now = self.clock()
            try:
                result = self.store.commit_transition(live.run.id, self.lease, transition, now)
            except ValueNotStorable as exc:
                transition = self._unstorable(live, transition, exc)
                result = self.store.commit_transition(live.run.id, self.lease, transition, now)
            for other in transition.also:
                live.steps[other.step_key] = StepState(
                    live.run.id,
                    other.step_key,
                    other.status,
                    other.attempt,
                    other.output,
                    other.error,
                    other.started_at,
                    now,
                    None,
                    None,
                )
            rec = transition.record
            if rec is not None:
                live.steps[rec.step_key] = StepState(
                    live.run.id,
                    rec.step_key,
                    rec.status,
                    rec.attempt,
                    result.output if rec.status == StepStatus.COMPLETED else rec.output,
                    rec.error,
                    rec.started_at,
                    now,
                    rec.wake_at,
                    rec.wait,
                )
            live.answer = result.answer
            kept = result.answer is not None or result.cancel_requested
            released = transition.release and not kept and transition.status in ACTIVE_STATUSES
            live.run = evolve(
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
                lease_owner=None if released else live.run.lease_owner,
                updated_at=now,
                finished_at=now if transition.status not in ACTIVE_STATUSES else None,
            )

    def _unstorable(self, live: _Live, transition: Transition, exc: ValueNotStorable) -> Transition:
        """The database refuses a step's result: the step fails for good (retrying would
        produce the same value; crash-looping would call it again after every lease)."""
        done = transition.record
        if done is None or done.status != StepStatus.COMPLETED or "[" in done.step_key:
            raise exc
        outcome = Failed(
            "StepOutputInvalid",
            f"steps.{done.step_key}: the result cannot be stored: {exc}",
            retryable=False,
        )
        state = live.machine.state(done.step_key)
        return replace(
            self._decide(live, state, done.attempt, done.started_at, outcome, StepLogger(), 0.0),
            active_seconds=transition.active_seconds,
            logs=transition.logs,
            has_parent=transition.has_parent,
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
        cancel_runs: tuple[str, ...] = (),
    ) -> Transition:
        transition = decide(
            live.machine,
            state,
            attempt,
            started_at,
            outcome,
            self.clock(),
            run_error=live.run.error,
            run_output=lambda record: self._output(live, record),
            hold_lease=self.driver.holds(outcome),
            active_seconds=elapsed,
            logs=tuple(logger.drain()),
            cancel_runs=cancel_runs,
            open_blocks={
                key: (st.started_at, st.output)
                for key, st in live.steps.items()
                if blocks.is_open(st)
            },
        )
        if live.copied:  # a parallel ended: its branches' step records go with it
            transition = replace(transition, also=(*live.copied, *transition.also))
            live.copied = ()
        return fanout.within_branch(live.machine, live.run, transition)

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
        if state.kind in BLOCK_KINDS and blocks.is_open(live.steps.get(state.id)):
            return blocks.close_block(machine, state, live.steps, scope, now)
        try:
            if state.when is not None and not compile_expression(
                "{{ " + state.when + " }}", f"{field}.when"
            ).evaluate(scope, f"{field}.when"):
                return Skipped()
        except TemplateError as exc:
            return Failed("TemplateError", str(exc), retryable=False)
        if state.kind == "parallel" or (state.kind == "for_each" and "workflow" in state.config):
            return self._children_round(live, state, attempt, {}, None) or Failed(
                "Empty", "nothing to start", retryable=False
            )
        if state.kind in BLOCK_KINDS:
            return blocks.open_block(machine, state, live.steps, scope, now)
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
                blocks.round_key(machine, state, live.steps),
            )
        )

    # templates ------------------------------------------------------------------------------
    def _scope(self, live: _Live) -> dict[str, Any]:
        run, machine = live.run, live.machine
        steps: dict[str, Any] = {
            s.id: {"output": None, "status": "pending", "attempts": 0, "error": None}
            for s in machine.states
        }
        if run.trigger.get("kind") == "branch" and live.inherited is None:
            live.root, live.inherited = self._inherited(run)  # what ran before the parallel
        for key, st in [*(live.inherited or {}).items(), *live.steps.items()]:
            if key in steps:
                steps[key] = {
                    "output": st.output,
                    "status": st.status.value,
                    "attempts": st.attempts,
                    "error": st.error if st.status == StepStatus.FAILED else None,
                }
        run = live.root or run  # a branch's templates see the run it is a branch of
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

    def _inherited(self, run: Run) -> tuple[Run, dict[str, StepState]]:
        """What a branch run's templates see beside its own steps: the run whose parallel
        step started it (`run.*`, `trigger`) and that run's step records (and, for a branch
        of a branch, its parent's), which do not change while the parallel step runs."""
        out: dict[str, StepState] = {}
        while run.trigger.get("kind") == "branch" and run.parent_run_id is not None:
            run = self.store.get_run(run.parent_run_id)
            out = {**{s.step_key: s for s in self.store.get_steps(run.id)}, **out}
        return run, out

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
            "error": last.error if last.status == StepStatus.FAILED else None,
        }
        return render_value(machine.output, scope, "output")


def _wait_event(machine: Machine, step_id: str | None) -> str | tuple[str, ...] | None:
    """The event(s) step `step_id` waits for, if it is a wait_for_event or wait_for_any."""
    if step_id is None:
        return None
    return machine.state(step_id).listens_for


def _answered(state: State, stored: StepState, answer: Answer) -> Outcome:
    """The outcome of a wait, from the answer that won it."""
    if state.kind == "wait_for_any" and answer.kind != "cancel":
        winner, data = answers.decided(stored.wait or {}, answer)
        return Done({"winner": winner, "data": data})
    if answer.kind == "timeout":
        if state.kind in TIMER_KINDS:
            return Done(None)
        return Failed(
            "TimeoutError",
            f"steps.{state.id} timed out after {state.timeout or 0:g}s waiting",
            retryable=True,
            attempt_status="timed_out",
        )
    if answer.kind == "cancel":
        return Failed("Cancelled", "the run was cancelled", retryable=False)
    data = answer.data
    if answer.kind == "child" and isinstance(data, dict):
        if data.get("status") in ("failed", "cancelled", "expired"):
            return Failed(
                "ChildFailed",
                f"child run {data.get('run_id')} {data['status']}: {data.get('error')}",
                retryable=True,
            )
        return Done(data.get("output"))
    return Done(data)


class Driver(Protocol):
    def create(self, machine: Machine, new: NewRun) -> Run: ...
    def claim(self, run_id: str) -> Run: ...
    def holds(self, outcome: Outcome) -> bool: ...
    def not_due(self, live: _Live, state: State, stored: StepState) -> None: ...
    def parked(self, live: _Live, state: State, stored: StepState) -> None: ...


class WorkerDriver:
    """A worker: every wait and back-off releases the run; nothing is slept through."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def create(self, machine: Machine, new: NewRun) -> Run:
        r = self.runner
        return r.store.create_run(new, r.clock(), lease=r.lease)

    def claim(self, run_id: str) -> Run:
        r = self.runner
        return r.store.claim_run(run_id, r.lease, r.clock())

    def holds(self, outcome: Outcome) -> bool:
        return False

    def not_due(self, live: _Live, state: State, stored: StepState) -> None:
        self.runner.park(live, state, stored)

    def parked(self, live: _Live, state: State, stored: StepState) -> None:
        pass


class ForegroundDriver:
    """`run`/`resume`: sleeps through timers and back-offs holding the lease, executes child
    runs inline, and starts a run only when its queue's limits allow it."""

    QUEUE_POLL = 0.2

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def create(self, machine: Machine, new: NewRun) -> Run:
        r = self.runner
        q = machine.queue
        if q.concurrency is None and q.rate_limit is None:
            return r.store.create_run(new, r.clock(), lease=r.lease)
        run = r.store.create_run(new, r.clock())
        return self.claim(run.id)

    def claim(self, run_id: str) -> Run:
        """Claim the run when its queue has room (a worker's claim obeys the same limits)."""
        r = self.runner
        while True:
            run = r.store.claim_run(run_id, r.lease, r.clock(), within_limits=True)
            if run.lease_owner == r.lease.owner or run.finished:
                return run
            if run.status != RunStatus.QUEUED:
                return run
            r.sleep(self.QUEUE_POLL)

    def holds(self, outcome: Outcome) -> bool:
        timer = isinstance(outcome, Suspended) and outcome.wait.get("kind") == "timer"
        return timer or isinstance(outcome, Failed)

    def not_due(self, live: _Live, state: State, stored: StepState) -> None:
        r = self.runner
        if live.run.lease_owner == r.lease.owner:
            r.reporter.waiting(live.run, state, stored.wake_at, stored.wait)
        timer = state.kind in (*TIMER_KINDS, "repeat") or stored.status == StepStatus.RETRYING
        if timer and stored.wake_at is not None:
            r.sleep(max(0.0, stored.wake_at - r.clock()))
            r._reclaim_live(live)  # and see whether it was cancelled (or driven on) meanwhile
            return
        r.park(live, state, stored)
        if live.run.lease_owner is None:
            self.parked(live, state, stored)

    def parked(self, live: _Live, state: State, stored: StepState) -> None:
        """A child run is executed here and now (unless a worker has it); when it has ended
        the parent goes on here, or is followed while a worker drives it. A child that waits
        for something external leaves its parent waiting too."""
        r = self.runner
        wait = stored.wait or {}
        if wait.get("kind") == fanout.KIND:  # a for_each's children, one after another
            answers = r.store.child_answers(live.run.id, state.id, stored.attempts)
            kids = fanout.active_children(live.run.id, state.id, stored.attempts, wait, answers)
        elif state.kind == "run_workflow" and wait.get("run_id"):
            kids = (wait["run_id"],)
        else:
            return
        runner = Runner(
            r.store, foreground=True, host=r.host, reporter=r.reporter, clock=r.clock, sleep=r.sleep
        )
        for child in kids:
            try:
                kid: Run | None = runner.drive(child)
            except RunBusy:
                kid = None  # a worker executes it
                r.sleep(self.QUEUE_POLL)
            if kid is not None and not kid.finished:
                return
        while True:
            try:
                reclaimed = r._reclaim(live.run.id)
            except RunBusy:  # a worker drives the parent on: follow it
                r.sleep(self.QUEUE_POLL)
                continue
            if reclaimed.finished or reclaimed.lease_owner == r.lease.owner:
                live.run = reclaimed
                live.steps = {s.step_key: s for s in r.store.get_steps(live.run.id)}
            return


@functools.lru_cache(maxsize=1024)  # a run's steps all render its start time
def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


def evolve(obj: D, **changes: Any) -> D:
    """`dataclasses.replace` for the runner's per-step copies of a run and a transition:
    the same new frozen object, without running `__init__` again field by field (11 µs a
    copy, two of them a step, issue #15). Only for dataclasses without `__post_init__` and
    without slots (tests/engine/test_runner.py checks both, and the result against
    `replace`)."""
    new = object.__new__(type(obj))
    fields = new.__dict__
    fields.update(obj.__dict__)
    fields.update(changes)
    return new
