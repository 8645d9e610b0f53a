"""switch, catch and repeat run in-process on both backends (engine/blocks.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import StepContext, step
from engine.errors import LeaseLost
from engine.models import Lease, RunStatus, StepStatus
from engine.pauses import pause_at
from engine.runner import Runner
from engine.store import SqlStore
from tests.engine.helpers import FakeClock, compile_text, store_for

CALLS: list[tuple[str, str, int]] = []  # (step id, idempotency key, attempt)


class PaymentError(Exception):
    pass


class CardDeclined(PaymentError):
    pass


@step("bk.echo")
def echo(ctx: StepContext, value: Any = None) -> Any:
    CALLS.append((ctx.step_id, ctx.idempotency_key, ctx.attempt))
    return value


@step("bk.fail")
def fail(ctx: StepContext, kind: str = "CardDeclined") -> None:
    CALLS.append((ctx.step_id, ctx.idempotency_key, ctx.attempt))
    raise {"CardDeclined": CardDeclined, "ValueError": ValueError}[kind](f"{kind} here")


@step("bk.count")
def count(ctx: StepContext, done_at: int) -> dict[str, Any]:
    CALLS.append((ctx.step_id, ctx.idempotency_key, ctx.attempt))
    n = sum(1 for c in CALLS if c[0] == ctx.step_id)
    return {"n": n, "done": n >= done_at}


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    CALLS.clear()
    s = store_for(db_url)
    yield s
    s.close()


HEAD = 'id: wf\nversion: "1"\ntrigger: {manual: true}\n'


def run_text(store: SqlStore, tmp_path: Path, text: str, payload: Any = None, **kw: Any) -> Any:
    machine = compile_text(tmp_path, HEAD + text)
    return Runner(store, **kw).start(machine, payload if payload is not None else {})


def statuses(store: SqlStore, run_id: str) -> dict[str, str]:
    return {s.step_key: s.status.value for s in store.get_steps(run_id)}


SWITCH = """
steps:
  - id: route
    switch:
      - when: payload.size > 100
        steps:
          - {id: big, call: bk.echo, with: {value: "big"}}
          - {id: big_after, call: bk.echo, with: {value: "{{ steps.big.output }}!"}}
      - when: payload.size > 10
        steps: [{id: medium, call: bk.echo, with: {value: "medium"}}]
      - default: [{id: small, call: bk.echo, with: {value: "small"}}]
  - id: after
    call: bk.echo
    with: {value: "{{ steps.route.output }} {{ steps.big.status }} {{ steps.small.output }}"}
"""


@pytest.mark.parametrize(
    ("size", "output", "ran", "skipped"),
    [
        (500, "big! completed None", ["big", "big_after"], ["medium", "small"]),
        (50, "medium skipped None", ["medium"], ["big", "big_after", "small"]),
        (5, "small skipped small", ["small"], ["big", "big_after", "medium"]),
    ],
)
def test_switch_runs_exactly_one_case(
    store: SqlStore, tmp_path: Path, size: int, output: str, ran: list[str], skipped: list[str]
) -> None:
    run = run_text(store, tmp_path, SWITCH, {"size": size})
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output == output
    assert [c[0] for c in CALLS] == [*ran, "after"]
    got = statuses(store, run.id)
    assert got["route"] == "completed"
    stored = {s.step_key: s for s in store.get_steps(run.id)}
    first = stored[ran[0]]
    assert stored["route"].started_at is not None and first.started_at is not None
    assert stored["route"].started_at <= first.started_at  # a block spans its list
    assert [s for s in skipped if got[s] == "skipped"] == skipped


def test_switch_without_a_matching_case_or_default_is_skipped(
    store: SqlStore, tmp_path: Path
) -> None:
    text = SWITCH.replace(
        '      - default: [{id: small, call: bk.echo, with: {value: "small"}}]\n', ""
    )
    text = text.replace(" {{ steps.small.output }}", "")
    run = run_text(store, tmp_path, text, {"size": 1})
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output == "None skipped"
    got = statuses(store, run.id)
    assert got["route"] == "skipped" and got["big"] == got["medium"] == "skipped"


def test_a_switch_whose_when_is_false_skips_all_its_steps(store: SqlStore, tmp_path: Path) -> None:
    text = SWITCH.replace("    switch:", "    when: false\n    switch:", 1)
    run = run_text(store, tmp_path, text, {"size": 500})
    assert run.status == RunStatus.COMPLETED, run.error
    got = statuses(store, run.id)
    assert {got[s] for s in ("route", "big", "big_after", "medium", "small")} == {"skipped"}


CATCH = """
steps:
  - id: charge
    call: bk.fail
    with: {kind: "{{ payload.kind }}"}
    retry: {max_attempts: 2, min_delay: 1s}
    catch:
      on: [PaymentError]
      steps:
        - id: refund
          call: bk.echo
          with: {value: "{{ steps.charge.status }}: {{ steps.charge.error }}"}
  - id: after
    call: bk.echo
    with: {value: "{{ steps.refund.output }}"}
on_failure:
  - {id: alert, call: bk.echo, with: {value: "{{ run.error }}"}}
"""


def test_catch_runs_after_retries_are_spent_then_goes_on(store: SqlStore, tmp_path: Path) -> None:
    clock = FakeClock()
    run = run_text(store, tmp_path, CATCH, {"kind": "CardDeclined"}, clock=clock, sleep=clock.sleep)
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.error is None
    assert [c[0] for c in CALLS] == ["charge", "charge", "refund", "after"]
    assert run.output == "failed: CardDeclined: CardDeclined here"
    steps = {s.step_key: s for s in store.get_steps(run.id)}
    assert steps["charge"].status == StepStatus.FAILED and steps["charge"].output is None
    assert steps["charge"].attempts == 2
    assert "alert" not in steps


def test_catch_on_filters_by_class_name_and_bases(store: SqlStore, tmp_path: Path) -> None:
    clock = FakeClock()
    run = run_text(store, tmp_path, CATCH, {"kind": "ValueError"}, clock=clock, sleep=clock.sleep)
    assert run.status == RunStatus.FAILED
    assert run.error == "step charge failed: ValueError: ValueError here"
    assert [c[0] for c in CALLS] == ["charge", "charge", "alert"]


def test_a_step_that_succeeds_leaves_its_catch_steps_skipped(
    store: SqlStore, tmp_path: Path
) -> None:
    text = CATCH.replace("call: bk.fail\n    with: {kind:", "call: bk.echo\n    with: {value:")
    run = run_text(store, tmp_path, text, {"kind": "fine"})
    assert run.status == RunStatus.COMPLETED, run.error
    assert statuses(store, run.id) == {
        "charge": "completed",
        "refund": "skipped",
        "after": "completed",
    }
    assert run.output is None


def test_a_failure_inside_a_switch_is_caught_by_the_switch(store: SqlStore, tmp_path: Path) -> None:
    text = """
steps:
  - id: route
    switch:
      - default:
          - {id: inner, call: bk.fail, retry: {max_attempts: 1}}
          - {id: never, call: bk.echo}
    catch:
      steps: [{id: handled, call: bk.echo, with: {value: "{{ steps.route.error }}"}}]
"""
    run = run_text(store, tmp_path, text)
    assert run.status == RunStatus.COMPLETED, run.error
    got = statuses(store, run.id)
    assert (got["inner"], got["route"], got["handled"]) == ("failed", "failed", "completed")
    assert "never" not in got
    assert run.output == "CardDeclined: CardDeclined here (in steps.inner)"


def test_a_failing_catch_step_fails_the_run(store: SqlStore, tmp_path: Path) -> None:
    text = """
steps:
  - id: charge
    call: bk.fail
    retry: {max_attempts: 1}
    catch:
      steps: [{id: refund, call: bk.fail, with: {kind: ValueError}, retry: {max_attempts: 1}}]
  - {id: after, call: bk.echo}
"""
    run = run_text(store, tmp_path, text)
    assert run.status == RunStatus.FAILED
    assert run.error == "step refund failed: ValueError: ValueError here"
    assert [c[0] for c in CALLS] == ["charge", "refund"]


REPEAT = """
steps:
  - id: poll
    repeat:
      steps:
        - {id: check, call: bk.count, with: {done_at: "{{ payload.done_at }}"}}
      until: steps.check.output.done
      delay: 30s
      max: 4
  - id: after
    call: bk.echo
    with: {value: "{{ steps.check.output.n }} {{ steps.poll.output | length }}"}
"""


def test_repeat_runs_rounds_until_it_holds_sleeping_durably(
    store: SqlStore, tmp_path: Path
) -> None:
    clock = FakeClock()
    start = clock.now
    run = run_text(store, tmp_path, REPEAT, {"done_at": 3}, clock=clock, sleep=clock.sleep)
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output == "3 3"
    assert clock.now - start == pytest.approx(60.0)  # two delays of 30s, between three rounds
    keys = [c[1] for c in CALLS if c[0] == "check"]
    assert keys == [f"{run.id}:check", f"{run.id}:check@2", f"{run.id}:check@3"]
    poll = {s.step_key: s for s in store.get_steps(run.id)}["poll"]
    assert poll.output == [{"check": {"n": i, "done": i == 3}} for i in (1, 2, 3)]


def test_repeat_fails_after_max_rounds_keeping_them(store: SqlStore, tmp_path: Path) -> None:
    clock = FakeClock()
    run = run_text(store, tmp_path, REPEAT, {"done_at": 9}, clock=clock, sleep=clock.sleep)
    assert run.status == RunStatus.FAILED
    assert (
        run.error
        == "step poll failed: RepeatExhausted: `until` did not hold after 4 rounds (max: 4)"
    )
    poll = {s.step_key: s for s in store.get_steps(run.id)}["poll"]
    assert [r["check"]["n"] for r in poll.output] == [1, 2, 3, 4]


def test_repeat_with_only_max_runs_that_many_rounds(store: SqlStore, tmp_path: Path) -> None:
    text = REPEAT.replace("      until: steps.check.output.done\n", "").replace(
        "delay: 30s", "delay: 0s"
    )
    run = run_text(store, tmp_path, text, {"done_at": 1})
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output == "4 4"


def test_repeat_delay_on_the_virtual_clock(workflow_env: Any, tmp_path: Path) -> None:
    (tmp_path / "poll.yaml").write_text(
        HEAD.replace("id: wf", "id: poll-job")
        + """
steps:
  - id: poll
    repeat:
      steps: [{id: check, call: vc.status}]
      until: steps.check.output == 'done'
      delay: 10m
      max: 5
"""
    )
    env = workflow_env(workflows=str(tmp_path))
    env.stub("vc.status", lambda ctx: "done" if env.now() - started >= 20 * 60 else "busy")
    started = env.now()
    run = env.start("poll-job")
    assert run.status == "waiting"
    assert run.steps["poll"].wake_at == pytest.approx(started + 600)
    env.advance("9m")
    assert run.status == "waiting" and len(run.steps["poll"].wait["rounds"]) == 1
    env.advance("1m")  # round 2 at 10m: still busy
    assert run.status == "waiting" and run.steps["poll"].wake_at == pytest.approx(started + 1200)
    env.advance("10m")  # round 3 at 20m: done
    assert run.status == "completed"
    assert run.output == [{"check": "busy"}, {"check": "busy"}, {"check": "done"}]


def test_a_switch_whose_lease_was_taken_writes_none_of_its_records(
    store: SqlStore, tmp_path: Path
) -> None:
    """The other writer: a second runner claims the run after the first one's lease expired,
    between the first one's decision to enter a case and its commit. The entry (the switch's
    record, the skipped cases) is refused whole; the second runner drives the run."""
    machine = compile_text(tmp_path, HEAD + SWITCH)
    clock = FakeClock()
    first = Runner(store, Lease("runner-a", "h", 1, seconds=5), clock=clock, sleep=clock.sleep)
    second = Lease("runner-b", "h", 2, seconds=30)
    taken: list[str] = []

    def take_over() -> None:
        if not taken:
            run = store.list_runs()[0]
            taken.append(run.id)
            store.claim_run(run.id, second, clock.now + 60)

    with pause_at("runner.before_commit.running", take_over), pytest.raises(LeaseLost):
        first.start(machine, {"size": 500})
    run_id = taken[0]
    assert store.get_steps(run_id) == []  # nothing of the refused entry was written
    clock.now += 60
    run = Runner(store, second, clock=clock, sleep=clock.sleep).drive(run_id)
    assert run.status == RunStatus.COMPLETED, run.error
    got = statuses(store, run_id)
    assert (got["route"], got["big"], got["medium"], got["small"]) == (
        "completed",
        "completed",
        "skipped",
        "skipped",
    )
    assert [c[0] for c in CALLS] == ["big", "big_after", "after"]
