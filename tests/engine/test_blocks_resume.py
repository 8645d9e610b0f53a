"""`resume` (and the dashboard's queued resume) of a run that failed inside a switch case, a
repeat round or a catch handler goes on exactly there: the step that failed the run is
retried, the blocks its failure left are reopened with their case and round, and no
completed step runs again. SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import StepContext, step
from engine.errors import EngineError
from engine.models import Lease, RunStatus
from engine.pauses import pause_at
from engine.runner import Runner
from engine.service import Engine
from engine.settings import resolve_settings

CALLS: list[tuple[str, str]] = []  # (step id, idempotency key)
BROKEN = {"until_call": 0}  # rs.maybe fails until it has been called more times than this
COUNTS: dict[str, int] = {}  # calls of rs.count and rs.maybe by step id, kept across a failure


@step("rs.echo")
def echo(ctx: StepContext, value: Any = None) -> Any:
    CALLS.append((ctx.step_id, ctx.idempotency_key))
    return value


@step("rs.maybe")
def maybe(ctx: StepContext, value: Any = None) -> Any:
    CALLS.append((ctx.step_id, ctx.idempotency_key))
    COUNTS[ctx.step_id] = COUNTS.get(ctx.step_id, 0) + 1
    if COUNTS[ctx.step_id] <= BROKEN["until_call"]:
        raise ValueError("broken")
    return value


@step("rs.fail")
def fail(ctx: StepContext) -> None:
    CALLS.append((ctx.step_id, ctx.idempotency_key))
    raise KeyError("always")


@step("rs.count")
def count(ctx: StepContext) -> int:
    CALLS.append((ctx.step_id, ctx.idempotency_key))
    COUNTS[ctx.step_id] = COUNTS.get(ctx.step_id, 0) + 1
    return COUNTS[ctx.step_id]


HEAD = 'id: wf\nversion: "1"\ntrigger: {manual: true}\n'


@pytest.fixture
def engine(db_url: str, tmp_path: Path) -> Iterator[Engine]:
    CALLS.clear()
    COUNTS.clear()
    BROKEN["until_call"] = 0
    e = Engine(resolve_settings(db=db_url, workflows=str(tmp_path / "none")), import_steps=False)
    yield e
    e.close()


def failed_run(engine: Engine, tmp_path: Path, text: str, broken: int = 1) -> str:
    """Start the workflow with `rs.maybe` failing its first `broken` calls: the run fails."""
    (tmp_path / "wf.yaml").write_text(HEAD + text)
    BROKEN["until_call"] = broken
    machine = engine.workflow(str(tmp_path / "wf.yaml"))
    run = engine.runner().start(machine, {}, new=engine.new_run(machine, {}, {"kind": "manual"}))
    assert run.status == RunStatus.FAILED, run.error
    CALLS.clear()
    return run.id


def statuses(engine: Engine, run_id: str) -> dict[str, str]:
    return {s.step_key: s.status.value for s in engine.store.get_steps(run_id)}


SWITCH = """
steps:
  - id: route
    switch:
      - when: "false"
        steps: [{id: other, call: rs.echo}]
      - default:
          - {id: first, call: rs.echo, with: {value: 1}}
          - {id: inner, call: rs.maybe, with: {value: 2}, retry: {max_attempts: 1}}
          - {id: last, call: rs.echo, with: {value: 3}}
  - {id: after, call: rs.echo, with: {value: "{{ steps.route.output }}"}}
"""


def test_resume_inside_a_switch_case_goes_on_in_that_case(engine: Engine, tmp_path: Path) -> None:
    run_id = failed_run(engine, tmp_path, SWITCH)
    assert statuses(engine, run_id)["route"] == "failed"
    run = engine.resume(run_id)
    assert run.status == RunStatus.COMPLETED, run.error
    assert [c[0] for c in CALLS] == ["inner", "last", "after"]  # `first` did not run again
    assert run.output == 3
    got = statuses(engine, run_id)
    assert (got["route"], got["first"], got["other"]) == ("completed", "completed", "skipped")


REPEAT = """
steps:
  - id: poll
    repeat:
      steps:
        - {id: c, call: rs.count}
        - id: inner
          call: rs.maybe
          with: {value: "{{ steps.c.output }}"}
          when: steps.c.output >= 2
          retry: {max_attempts: 1}
      until: steps.c.output >= 3
      max: 5
  - {id: after, call: rs.echo, with: {value: "{{ steps.poll.output | length }}"}}
"""


def keys(run_id: str) -> list[str]:
    """The calls since the run failed, by idempotency key less the run id."""
    return [key.removeprefix(run_id + ":") for _, key in CALLS]


def test_resume_in_round_two_keeps_round_one_and_the_round_number(
    engine: Engine, tmp_path: Path
) -> None:
    run_id = failed_run(engine, tmp_path, REPEAT)  # round 2's inner fails
    assert statuses(engine, run_id)["poll"] == "failed"
    run = engine.resume(run_id)
    assert run.status == RunStatus.COMPLETED, run.error
    # round 2's inner is retried under round 2's key; round 1 and round 2's `c` do not run
    # again, and the next round is round 3
    assert keys(run_id) == ["inner@2", "c@3", "inner@3", "after"]
    poll = {s.step_key: s for s in engine.store.get_steps(run_id)}["poll"]
    assert poll.output == [{"c": 1, "inner": None}, {"c": 2, "inner": 2}, {"c": 3, "inner": 3}]
    assert run.output == 3


CATCH = """
steps:
  - id: charge
    call: rs.fail
    retry: {max_attempts: 1}
    catch:
      steps:
        - {id: note, call: rs.echo, with: {value: "{{ steps.charge.error }}"}}
        - {id: refund, call: rs.maybe, with: {value: refunded}, retry: {max_attempts: 1}}
  - {id: after, call: rs.echo, with: {value: "{{ steps.refund.output }}"}}
"""


def test_resume_after_a_catch_handler_failed_retries_the_handler_step(
    engine: Engine, tmp_path: Path
) -> None:
    """Both `charge` (caught) and `refund` are failed: the resume retries `refund`, the step
    that failed the run, not `charge`, whose failure the catch took (its effect would run
    again, and a success would leave the handler's steps half done)."""
    run_id = failed_run(engine, tmp_path, CATCH)
    assert statuses(engine, run_id)["charge"] == statuses(engine, run_id)["refund"] == "failed"
    run = engine.resume(run_id)
    assert run.status == RunStatus.COMPLETED, run.error
    assert [c[0] for c in CALLS] == ["refund", "after"]
    assert run.output == "refunded"
    assert statuses(engine, run_id)["charge"] == "failed"


def test_resume_of_a_failure_caught_by_a_switch_whose_handler_failed(
    engine: Engine, tmp_path: Path
) -> None:
    text = """
steps:
  - id: route
    switch:
      - default:
          - {id: inner, call: rs.fail, retry: {max_attempts: 1}}
    catch:
      steps: [{id: handler, call: rs.maybe, with: {value: handled}, retry: {max_attempts: 1}}]
  - {id: after, call: rs.echo, with: {value: "{{ steps.handler.output }}"}}
"""
    run_id = failed_run(engine, tmp_path, text)
    run = engine.resume(run_id)
    assert run.status == RunStatus.COMPLETED, run.error
    assert [c[0] for c in CALLS] == ["handler", "after"]
    got = statuses(engine, run_id)
    assert (got["route"], got["inner"], got["handler"]) == ("failed", "failed", "completed")


def test_resume_of_an_exhausted_repeat_runs_one_more_round(engine: Engine, tmp_path: Path) -> None:
    text = """
steps:
  - id: poll
    repeat:
      steps: [{id: c, call: rs.count}]
      until: steps.c.output >= 3
      max: 2
"""
    run_id = failed_run(engine, tmp_path, text)
    assert engine.store.get_run(run_id).error is not None
    run = engine.resume(run_id)
    assert run.status == RunStatus.COMPLETED, run.error
    assert keys(run_id) == ["c@3"]  # round 3, the two earlier rounds kept
    assert run.output == [{"c": 1}, {"c": 2}, {"c": 3}]


def test_resume_reopens_every_block_the_failure_left(engine: Engine, tmp_path: Path) -> None:
    """A repeat inside a switch case: both are reopened, each with its progress."""
    text = """
steps:
  - id: route
    switch:
      - default:
          - {id: before, call: rs.echo, with: {value: 0}}
          - id: poll
            repeat:
              steps:
                - {id: c, call: rs.count}
                - id: inner
                  call: rs.maybe
                  when: steps.c.output >= 2
                  retry: {max_attempts: 1}
              max: 2
          - {id: last, call: rs.echo, with: {value: "{{ steps.poll.output | length }}"}}
"""
    run_id = failed_run(engine, tmp_path, text)
    got = statuses(engine, run_id)
    assert (got["route"], got["poll"], got["inner"]) == ("failed", "failed", "failed")
    run = engine.resume(run_id)
    assert run.status == RunStatus.COMPLETED, run.error
    assert keys(run_id) == ["inner@2", "last"]
    assert run.output == 2


def test_the_dashboards_queued_resume_goes_on_inside_the_block(
    engine: Engine, tmp_path: Path
) -> None:
    """The worker path: queue_resume reopens the same rows, a worker's claim drives on."""
    run_id = failed_run(engine, tmp_path, SWITCH)
    engine.queue_resume(run_id)
    run = Runner(engine.store, foreground=False, host=engine).drive(run_id)
    assert run.status == RunStatus.COMPLETED, run.error
    assert [c[0] for c in CALLS] == ["inner", "last", "after"]
    with pytest.raises(EngineError, match="only a failed run resumes"):  # a second click
        engine.queue_resume(run_id)


def test_the_queued_resume_of_an_exhausted_repeat_is_taken_by_a_worker(
    engine: Engine, tmp_path: Path
) -> None:
    text = """
steps:
  - id: poll
    repeat:
      steps: [{id: c, call: rs.count}]
      until: steps.c.output >= 2
      max: 1
"""
    run_id = failed_run(engine, tmp_path, text)
    engine.queue_resume(run_id)
    waiting = {s.step_key: s for s in engine.store.get_steps(run_id)}["poll"]
    assert (waiting.status.value, waiting.error) == ("waiting", None)
    claimed = engine.store.claim_next_run(Lease("w", "h", 1, seconds=30), engine.store.now())
    assert claimed is not None and claimed.id == run_id
    run = Runner(engine.store, Lease("w", "h", 1, seconds=30), foreground=False, host=engine)
    done = run.drive_claimed(claimed)
    assert done.status == RunStatus.COMPLETED, done.error
    assert keys(run_id) == ["c@2"]
    assert done.output == [{"c": 1}, {"c": 2}]


def test_a_run_failed_after_a_caught_failure_has_no_step_to_resume(
    engine: Engine, tmp_path: Path
) -> None:
    """The catch took `charge`'s failure; the run then failed on its output. Resuming
    would retry `charge` (it did), whose failure was handled: the resume is refused with
    the replay hint, and the dashboard offers no Resume button."""
    text = CATCH.replace("rs.maybe", "rs.echo") + 'output: "{{ payload.missing }}"\n'
    run_id = failed_run(engine, tmp_path, text)
    assert "run output failed" in (engine.store.get_run(run_id).error or "")
    with pytest.raises(EngineError, match="failed outside its steps"):
        engine.resume(run_id)
    with pytest.raises(EngineError, match="failed outside its steps"):
        engine.queue_resume(run_id)
    assert CALLS == []
    from fastapi.testclient import TestClient

    from engine.server import create_app

    app = create_app(engine, None, port=8080)
    page = TestClient(app, base_url="http://127.0.0.1:8080").get(f"/runs/{run_id}")
    assert page.status_code == 200 and 'id="resume"' not in page.text


@pytest.mark.parametrize("path", ["resume", "queue_resume"])
def test_a_resume_that_read_a_step_another_resume_retried_since_changes_nothing(
    engine: Engine, tmp_path: Path, path: str
) -> None:
    """The other writer: a second resume, between this one's reading of the failed step and
    its reopening. The second retries `first` (it succeeds) and the run fails again at
    `second`. This resume's reopening of `first`, no longer failed, is refused: it had set
    the run back to `first`, which then ran again."""
    text = """
steps:
  - {id: first, call: rs.maybe, with: {value: 1}, retry: {max_attempts: 1}}
  - {id: second, call: rs.fail, retry: {max_attempts: 1}}
"""
    run_id = failed_run(engine, tmp_path, text)
    other: list[str] = []

    def another_resume() -> None:
        if not other:
            other.append("resuming")  # its own pass through the point goes straight on
            other[0] = engine.resume(run_id).status.value

    with pause_at("service.resume.checked", another_resume):
        getattr(engine, path)(run_id)
    assert other == ["failed"]
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.FAILED and run.error is not None and "second" in run.error
    Runner(engine.store, foreground=False, host=engine).drive(run_id)  # nothing to claim
    assert [c[0] for c in CALLS] == ["first", "second"]  # `first` ran once after the failure
