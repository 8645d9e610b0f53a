"""The runner in-process on both backends: retries, timeouts, bad outputs and templates,
skips, failure handlers, durable waits, pinning, cancellation, commits per step."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import NonRetryableError, StepContext, step
from engine.models import RunStatus
from engine.runner import Runner
from engine.store import SqlStore
from engine.store.sqlutil import TransactionCounter
from tests.engine.helpers import FakeClock, compile_text, store_for

CALLS: dict[str, list[int]] = {}
GATE = threading.Event()


@step("rt.flaky")
def flaky(fail_times: int, ctx: StepContext) -> dict[str, int]:
    CALLS.setdefault(ctx.run_id, []).append(ctx.attempt)
    if ctx.attempt <= fail_times:
        raise ConnectionError(f"boom {ctx.attempt}")
    return {"attempt": ctx.attempt}


@step("rt.value_error")
def value_error() -> None:
    raise ValueError("bad value")


@step("rt.fatal")
def fatal() -> None:
    raise NonRetryableError("not a picture")


@step("rt.slow")
def slow(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


@step("rt.echo")
def echo(value: Any = None) -> Any:
    return value


@step("rt.not_json")
def not_json() -> object:
    return {"x": object()}


@step("rt.gate")
def gate() -> str:
    GATE.wait(10)
    return "opened"


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    s = store_for(db_url)
    yield s
    s.close()


HEAD = 'id: wf\nversion: "1"\ntrigger: {manual: true}\n'


def run_text(store: SqlStore, tmp_path: Path, text: str, payload: Any = None, **kw: Any) -> Any:
    machine = compile_text(tmp_path, HEAD + text)
    return Runner(store, **kw).start(machine, payload if payload is not None else {})


def test_retry_then_success_records_every_attempt(store: SqlStore, tmp_path: Path) -> None:
    run = run_text(
        store,
        tmp_path,
        """
steps:
  - id: a
    call: rt.flaky
    with: {fail_times: 2}
    retry: {max_attempts: 3, min_delay: 10ms, jitter: false}
""",
    )
    assert run.status == RunStatus.COMPLETED and run.output == {"attempt": 3}
    assert CALLS[run.id] == [1, 2, 3]
    attempts = store.get_attempts(run.id)
    assert [(a.attempt, a.status, a.error_type, a.error_message) for a in attempts] == [
        (1, "failed", "ConnectionError", "ConnectionError: boom 1"),
        (2, "failed", "ConnectionError", "ConnectionError: boom 2"),
    ]
    assert "Traceback" in (attempts[0].traceback or "")
    assert store.get_steps(run.id)[0].attempts == 3


def test_retries_exhausted_fail_the_run(store: SqlStore, tmp_path: Path) -> None:
    run = run_text(
        store,
        tmp_path,
        """
steps:
  - id: a
    call: rt.flaky
    with: {fail_times: 5}
    retry: {max_attempts: 2, min_delay: 10ms}
""",
    )
    assert run.status == RunStatus.FAILED
    assert run.error == "step a failed: ConnectionError: boom 2"
    assert CALLS[run.id] == [1, 2]


def test_non_retryable_error_stops_at_once(store: SqlStore, tmp_path: Path) -> None:
    run = run_text(store, tmp_path, "steps:\n  - id: a\n    call: rt.fatal\n")
    assert run.status == RunStatus.FAILED
    assert run.error == "step a failed: NonRetryableError: not a picture"
    assert store.get_steps(run.id)[0].attempts == 1


def test_retry_on_names_only_those_errors(store: SqlStore, tmp_path: Path) -> None:
    run = run_text(
        store,
        tmp_path,
        """
steps:
  - id: a
    call: rt.value_error
    retry: {max_attempts: 5, min_delay: 10ms, on: [TimeoutError, ConnectionError]}
""",
    )
    assert run.status == RunStatus.FAILED and store.get_steps(run.id)[0].attempts == 1


def test_step_timeout_fails_the_attempt(store: SqlStore, tmp_path: Path) -> None:
    run = run_text(
        store,
        tmp_path,
        """
steps:
  - id: a
    call: rt.slow
    with: {seconds: 2}
    timeout: 200ms
    retry: {max_attempts: 1}
""",
    )
    assert run.status == RunStatus.FAILED
    assert run.error == "step a failed: StepTimeout: step timed out after 0.2s"
    assert [a.status for a in store.get_attempts(run.id)] == ["timed_out"]


def test_run_timeout_counts_execution_time(store: SqlStore, tmp_path: Path) -> None:
    run = run_text(
        store,
        tmp_path,
        """
timeout: 300ms
steps:
  - id: a
    call: rt.slow
    with: {seconds: 0.2}
  - id: b
    call: rt.slow
    with: {seconds: 0.2}
    retry: {max_attempts: 1}
""",
    )
    assert run.status == RunStatus.FAILED
    assert "step b failed" in (run.error or "")


def test_non_json_output_names_step_and_type(store: SqlStore, tmp_path: Path) -> None:
    run = run_text(store, tmp_path, "steps:\n  - id: make\n    call: rt.not_json\n")
    assert run.status == RunStatus.FAILED
    assert run.error is not None
    assert "steps.make: `rt.not_json` returned a dict, which is not JSON data" in run.error
    assert "(steps.make.x: a value of type object is not JSON data)" in run.error
    steps = store.get_steps(run.id)
    assert steps[0].output is None and steps[0].attempts == 1


def test_template_failing_at_run_time_names_the_field(store: SqlStore, tmp_path: Path) -> None:
    run = run_text(
        store,
        tmp_path,
        """
steps:
  - id: first
    call: rt.echo
    with: {value: 1}
  - id: second
    call: rt.echo
    with: {value: "{{ payload.user.name }}"}
""",
        payload={"user": {}},
    )
    assert run.status == RunStatus.FAILED
    assert run.error == (
        "step second failed: TemplateError: steps.second.with.value: 'dict object' has no "
        "attribute 'name' in '{{ payload.user.name }}'"
    )
    steps = {s.step_key: s for s in store.get_steps(run.id)}
    assert steps["first"].status.value == "completed" and steps["second"].status.value == "failed"


def test_when_false_skips_with_null_output(store: SqlStore, tmp_path: Path) -> None:
    run = run_text(
        store,
        tmp_path,
        """
steps:
  - id: maybe
    call: rt.echo
    with: {value: 5}
    when: payload.go
  - id: after
    call: rt.echo
    with: {value: "{{ steps.maybe.status }}/{{ steps.maybe.output }}"}
""",
        payload={"go": False},
    )
    assert run.status == RunStatus.COMPLETED
    assert run.output == "skipped/None"


def test_on_failure_handlers_see_run_error(store: SqlStore, tmp_path: Path) -> None:
    run = run_text(
        store,
        tmp_path,
        """
steps:
  - id: a
    call: rt.fatal
  - id: never
    call: rt.echo
on_failure:
  - id: alert
    call: rt.echo
    with: {value: "alert: {{ run.error }}"}
  - id: note
    log: "handled {{ steps.alert.output }}"
""",
    )
    assert run.status == RunStatus.FAILED
    steps = {s.step_key: s for s in store.get_steps(run.id)}
    assert "never" not in steps
    assert steps["alert"].output == "alert: step a failed: NonRetryableError: not a picture"
    assert steps["note"].status.value == "completed"
    assert run.error == "step a failed: NonRetryableError: not a picture"


def test_durable_wait_stores_the_wake_time_first(store: SqlStore, tmp_path: Path) -> None:
    clock = FakeClock()
    start = clock.now
    run = run_text(
        store,
        tmp_path,
        """
steps:
  - id: nap
    wait: 90 minutes
  - id: until
    wait_until: "{{ payload.at }}"
  - id: done
    call: rt.echo
    with: {value: ok}
""",
        payload={"at": "2038-01-16T00:00:00Z"},
        clock=clock,
        sleep=clock.sleep,
    )
    assert run.status == RunStatus.COMPLETED
    steps = {s.step_key: s for s in store.get_steps(run.id)}
    assert steps["nap"].wake_at == start + 5400
    until = 2_147_212_800.0  # 2038-01-16T00:00:00Z, 16 h after the start
    assert steps["until"].wake_at == until
    assert clock.slept == [5400, until - (start + 5400)]
    assert run.output == "ok"


def test_background_runner_parks_a_wait_and_a_new_runner_finishes_it(
    store: SqlStore, tmp_path: Path
) -> None:
    run = run_text(
        store,
        tmp_path,
        """
steps:
  - id: nap
    wait: 300ms
  - id: done
    call: rt.echo
    with: {value: ok}
""",
        foreground=False,
    )
    assert run.status == RunStatus.WAITING
    stored = store.get_run(run.id)
    assert stored.lease_owner is None and stored.next_at is not None
    time.sleep(0.35)
    finished = Runner(store).drive(run.id)
    assert finished.status == RunStatus.COMPLETED and finished.output == "ok"


def test_run_is_pinned_to_its_definition(store: SqlStore, tmp_path: Path) -> None:
    text = """
steps:
  - id: nap
    wait: 200ms
  - id: done
    call: rt.echo
    with: {value: "version one"}
"""
    run = run_text(store, tmp_path, text, foreground=False)
    assert run.status == RunStatus.WAITING
    (tmp_path / "wf.yaml").write_text(HEAD + text.replace("version one", "version two"))
    time.sleep(0.25)
    finished = Runner(store).drive(run.id)
    assert finished.output == "version one"
    assert store.get_run(run.id).definition_hash == run.definition_hash


def test_cancel_stops_a_running_run_at_the_next_step_boundary(
    store: SqlStore, tmp_path: Path
) -> None:
    GATE.clear()
    machine = compile_text(
        tmp_path,
        HEAD
        + """
steps:
  - id: blocked
    call: rt.gate
  - id: next
    call: rt.echo
    with: {value: should not run}
""",
    )
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("run", Runner(store).start(machine, {}))
    )
    worker.start()
    deadline = time.time() + 10
    while not store.list_runs() and time.time() < deadline:
        time.sleep(0.01)
    run_id = store.list_runs()[0].id
    flagged = store.request_cancel(run_id, time.time())
    assert flagged.status == RunStatus.RUNNING and flagged.cancel_requested
    GATE.set()
    worker.join(10)
    run = result["run"]
    assert run.status == RunStatus.CANCELLED
    steps = {s.step_key: s for s in store.get_steps(run_id)}
    assert steps["blocked"].output == "opened" and "next" not in steps


def test_one_commit_per_step_beyond_the_claim(store: SqlStore, tmp_path: Path) -> None:
    counter = TransactionCounter(store.db)
    machine = compile_text(
        tmp_path,
        HEAD
        + """
steps:
  - {id: a, call: rt.echo, with: {value: 1}}
  - {id: b, call: rt.echo, with: {value: 2}}
  - {id: c, call: rt.echo, with: {value: 3}}
""",
    )
    runner = Runner(store)
    store.save_definition(
        machine.content_hash, machine.workflow_id, machine.version, machine.to_json(), ""
    )
    counter.reset()
    run = runner.start(machine, {})
    counter.close()
    assert run.status == RunStatus.COMPLETED and run.output == 3
    # create+claim, one per step, save_definition (a no-op upsert)
    assert counter.count == 1 + 3 + 1


@step("rt.async_sleep")
async def async_sleep(seconds: float, ctx: StepContext) -> dict[str, Any]:
    import asyncio

    await asyncio.sleep(seconds)
    return {"attempt": ctx.attempt, "loop": id(asyncio.get_running_loop())}


def test_async_steps_share_one_event_loop_and_time_out(store: SqlStore, tmp_path: Path) -> None:
    first = run_text(
        store, tmp_path, "steps:\n  - {id: a, call: rt.async_sleep, with: {seconds: 0.01}}\n"
    )
    second = run_text(
        store, tmp_path, "steps:\n  - {id: a, call: rt.async_sleep, with: {seconds: 0.01}}\n"
    )
    assert first.status == RunStatus.COMPLETED and first.output["attempt"] == 1
    assert first.output["loop"] == second.output["loop"]
    slow = run_text(
        store,
        tmp_path,
        """
steps:
  - id: a
    call: rt.async_sleep
    with: {seconds: 5}
    timeout: 100ms
    retry: {max_attempts: 1}
""",
    )
    assert slow.status == RunStatus.FAILED
    assert slow.error == "step a failed: StepTimeout: step timed out after 0.1s"


def test_a_foreground_waking_after_a_worker_drove_its_run_on_does_not_go_back(
    store: SqlStore, tmp_path: Path
) -> None:
    """`run` sleeps through a `wait` holding the lease; the process is stopped, the lease
    expires and a worker drives the run past the wait, through `mid`, to the next wait. The
    foreground wakes and reclaims the run: it must go on from the store's state, not from
    what it knew before its sleep (it restarted the second wait's timer from scratch and its
    templates saw `mid` pending)."""
    from engine.models import Lease

    machine = compile_text(
        tmp_path,
        HEAD
        + """
steps:
  - {id: nap, wait: 30s}
  - {id: mid, call: rt.echo, with: {value: 7}}
  - {id: nap2, wait: 30s}
  - {id: last, call: rt.echo, with: {value: "{{ steps.mid.output }}"}}
""",
    )
    clock = FakeClock()
    start = clock.now
    worker = Runner(store, Lease("worker", "h", 2, seconds=30), foreground=False, clock=clock)
    took: list[float] = []

    def stopped_sleep(seconds: float) -> None:
        if not took:
            took.append(seconds)
            clock.now += 31  # the first wait is over, and the foreground's lease (5s)
            parked = worker.drive(store.list_runs(limit=1)[0].id)
            assert parked.status == RunStatus.WAITING and parked.current_step == "nap2"
        clock.now += max(0.0, seconds)

    run = Runner(store, Lease("fg", "h", 1, seconds=5), clock=clock, sleep=stopped_sleep).start(
        machine, {}
    )
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output == 7
    nap2 = {s.step_key: s for s in store.get_steps(run.id)}["nap2"]
    assert nap2.started_at == pytest.approx(start + 31)  # the worker's wait, not a new one
    assert clock.now == pytest.approx(start + 61)


def test_evolve_makes_what_replace_makes_for_a_run_and_a_transition() -> None:
    """The runner's per-step copies (`evolve`) skip `__init__`: sound only while Run and
    Transition have no `__post_init__` and no slots, and then equal to `replace`."""
    import dataclasses

    from engine.models import Lease, Run, StepRecord, StepStatus, Transition
    from engine.runner import evolve
    from engine.store.sqlutil import run_from_row

    for cls in (Run, Transition, StepRecord, Lease):
        assert dataclasses.is_dataclass(cls) and not hasattr(cls, "__post_init__")
        assert "__slots__" not in cls.__dict__ and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    run = run_from_row(
        {
            "id": "r",
            "workflow_id": "w",
            "version": "1",
            "definition_hash": "h",
            "status": "running",
            "queue": "default",
            "created_at": 1.0,
            "updated_at": 1.0,
            "payload": {"a": [1]},
            "tags": ["x:y"],
        }
    )
    changes: dict[str, Any] = {"status": RunStatus.COMPLETED, "current_step": "b", "output": 3}
    assert evolve(run, **changes) == dataclasses.replace(run, **changes)
    assert run.status == RunStatus.RUNNING  # the original is untouched
    transition = Transition(RunStatus.RUNNING, StepRecord("a", StepStatus.COMPLETED, 1, 1.0))
    assert evolve(transition, logs=(), has_parent=True) == dataclasses.replace(
        transition, logs=(), has_parent=True
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolve(run, status=RunStatus.FAILED).status = RunStatus.RUNNING  # type: ignore[misc]
