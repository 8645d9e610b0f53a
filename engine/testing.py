"""Testing workflows on a virtual clock (SPEC §6).

`workflow_env(workflows=..., modules=[...])` gives an `Env`: the real compiled machines,
store and runner, on a throwaway SQLite database, with a clock that moves only when told.
Waits, back-offs, timeouts and cron fires happen at once, in order, as `advance` or
`run_until_idle` move the clock past them. Steps can be stubbed per attempt.

    def test_report(workflow_env):
        env = workflow_env(workflows="workflows", modules=["steps"])
        env.stub("analytics.fetch", [ConnectionError("down"), {"rows": 3}])
        run = env.start("hourly-report", payload={"timestamp": "2026-01-01T00:30:00Z"})
        env.advance("1h")
        assert run.status == "completed" and run.steps["fetch_analytics"].attempts == 2

The package registers `workflow_env` as a pytest fixture (a pytest plugin).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from dsl import parse_duration

from .errors import ConfigError
from .models import LogEntry, Run, StepState
from .registry import _REGISTRY, RegisteredStep, import_modules
from .runner import Runner
from .scheduler import CronScheduler, next_fire
from .service import Engine
from .settings import resolve_settings
from .testfiles import exception_named

__all__ = ["Env", "RunHandle", "VirtualClock", "exception_named", "workflow_env"]

MAX_ROUNDS = 100_000  # a bound on the work one advance may do (a runaway loop is an error)


class VirtualClock:
    """Seconds since the epoch that move only when the test moves them."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def now(self) -> float:
        return self._now

    __call__ = now

    def set(self, at: float) -> None:
        self._now = max(self._now, at)

    def sleep(self, seconds: float) -> None:
        self._now += max(0.0, seconds)


class RunHandle:
    """A run under test; every attribute reads the current state from the store."""

    def __init__(self, env: Env, run_id: str) -> None:
        self.env, self.id = env, run_id

    @property
    def run(self) -> Run:
        return self.env.engine.store.get_run(self.id)

    @property
    def status(self) -> str:
        return self.run.status.value

    @property
    def output(self) -> Any:
        return self.run.output

    @property
    def error(self) -> str | None:
        return self.run.error

    @property
    def steps(self) -> dict[str, StepState]:
        return {s.step_key: s for s in self.env.engine.store.get_steps(self.id)}

    @property
    def logs(self) -> list[LogEntry]:
        return self.env.engine.store.get_logs(self.id)

    def token(self, step_id: str | None = None) -> str:
        """The token a waiting `wait_for_token` step shows."""
        for step in self.steps.values():
            wait = step.wait or {}
            if wait.get("kind") == "token" and (step_id is None or step.step_key == step_id):
                return str(wait["token"])
        raise LookupError(f"run {self.id} has no token" + (f" at {step_id}" if step_id else ""))

    def __repr__(self) -> str:
        run = self.run
        return f"<run {self.id} {run.workflow_id} {run.status.value} at {run.current_step}>"


class Env:
    """Workflows on a virtual clock. Use as a context manager, or call `close`."""

    def __init__(
        self,
        workflows: str = "workflows",
        modules: Sequence[str] = (),
        *,
        start: float | None = None,
        project_dir: str = ".",
        schedules: bool = False,
    ) -> None:
        self._folder = tempfile.mkdtemp(prefix="durable-yaml-test-")
        if modules:
            import_modules(modules, project_dir)
        settings = resolve_settings(
            db=f"sqlite:///{self._folder}/state.db", workflows=workflows, cwd=project_dir
        )
        self.engine = Engine(settings, import_steps=False)
        if self.engine.catalog.problems:
            first = self.engine.catalog.problems[0]
            raise ConfigError(f"the workflows are invalid: {first}")
        self.clock = VirtualClock(start)
        self.engine.store.db.clock = self.clock  # type: ignore[assignment]
        self.runner = Runner(
            self.engine.store,
            foreground=False,
            host=self.engine,
            clock=self.clock.now,
            sleep=self.clock.sleep,
        )
        self.scheduler = CronScheduler(self.engine, lambda: None, clock=self.clock.now)
        # cron fires happen as `advance` passes them, when asked for (`schedules=True`)
        self._crons = schedules
        self._stubbed: dict[str, RegisteredStep | None] = {}

    # the clock ------------------------------------------------------------------------------
    def now(self) -> float:
        return self.clock.now()

    def advance(self, duration: str | float) -> None:
        """Move the clock forward by `duration`, doing everything that falls due on the way,
        in order."""
        target = self.now() + parse_duration(duration)
        for _ in range(MAX_ROUNDS):
            self._pump()
            due = self._next_due()
            if due is None or due > target:
                break
            self.clock.set(due)
        else:
            raise RuntimeError(f"advance did not settle after {MAX_ROUNDS} rounds")
        self.clock.set(target)
        self._pump()

    def run_until_idle(self, horizon: str | float = "365d") -> None:
        """Do everything that is due, moving the clock from one due time to the next, until
        nothing is left to do but wait for an event or a token (or `horizon` has passed).
        No cron fires here: a schedule is never idle; `advance` fires them."""
        limit = self.now() + parse_duration(horizon)
        for _ in range(MAX_ROUNDS):
            self._pump(crons=False)
            due = self.engine.store.next_due_at()
            if due is None or due > limit:
                return
            self.clock.set(due)
        raise RuntimeError(f"run_until_idle did not settle after {MAX_ROUNDS} rounds")

    def _next_due(self) -> float | None:
        due = self.engine.store.next_due_at()
        if self._crons:
            self.scheduler.tick()
            now = self.now()
            for machine in self.scheduler.schedules():
                fire = next_fire(machine, now)
                due = fire if due is None else min(due, fire)
        return due

    def _pump(self, crons: bool = True) -> None:
        """Act as a worker at the current virtual time until nothing is claimable."""
        store = self.engine.store
        for _ in range(MAX_ROUNDS):
            if crons and self._crons:
                self.scheduler.tick()
            run = store.claim_next_run(self.runner.lease, self.now())
            if run is None:
                return
            self.runner.drive_claimed(run)
        raise RuntimeError(f"the runs did not settle after {MAX_ROUNDS} steps")

    # acting ------------------------------------------------------------------------------------
    def stub(self, name: str, outcomes: Sequence[Any] | Callable[..., Any]) -> None:
        """Replace step `name`: a callable, or a list with one outcome per attempt (the last
        repeats); an outcome that is an exception (or exception class) is raised."""
        if name not in self._stubbed:
            self._stubbed[name] = _REGISTRY.get(name)
        if callable(outcomes) and not isinstance(outcomes, type):
            fn: Callable[..., Any] = outcomes
        else:
            plan = list(outcomes)  # type: ignore[arg-type]
            if not plan:
                raise ValueError(f"stub {name}: give at least one outcome")

            def fn(ctx: Any, **_: Any) -> Any:
                outcome = plan[min(ctx.attempt, len(plan)) - 1]
                if isinstance(outcome, type) and issubclass(outcome, BaseException):
                    raise outcome(f"{outcome.__name__} (stubbed)")
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome

        ctx_param = "ctx" if fn.__code__.co_varnames[:1] == ("ctx",) else None
        _REGISTRY[name] = RegisteredStep(name, fn, ctx_param, False, "engine.testing")

    def start(self, workflow: str, payload: Any = None) -> RunHandle:
        """Queue a run and drive it as far as it goes at the current virtual time."""
        sent = self.engine.trigger(workflow, payload)
        self._pump()
        return RunHandle(self, sent.run_ids[0])

    def send_event(self, name: str, payload: Any = None) -> list[RunHandle]:
        sent = self.engine.send_event(name, {} if payload is None else payload)
        self._pump()
        return [RunHandle(self, r) for r in sent.run_ids]

    def complete_token(self, token: str, data: Any = None) -> None:
        self.engine.complete_token(token, data)
        self._pump()

    def run(self, run_id: str) -> RunHandle:
        return RunHandle(self, run_id)

    # the end -------------------------------------------------------------------------------------
    def close(self) -> None:
        for name, original in self._stubbed.items():
            if original is None:
                _REGISTRY.pop(name, None)
            else:
                _REGISTRY[name] = original
        self._stubbed.clear()
        self.engine.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> Env:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _workflow_env() -> Iterator[Callable[..., Env]]:
    """A factory of `Env`s, each closed after the test."""
    made: list[Env] = []

    def make(workflows: str = "workflows", modules: Sequence[str] = (), **kw: Any) -> Env:
        env = Env(workflows, modules, **kw)
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


try:  # a pytest plugin when pytest is there (the package registers it under pytest11)
    import pytest
except ImportError:  # pragma: no cover - the Python API works without pytest
    workflow_env = _workflow_env
else:
    workflow_env = pytest.fixture(name="workflow_env")(_workflow_env)
