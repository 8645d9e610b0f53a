"""switch, catch and repeat run in-process on both backends (engine/blocks.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from engine import StepContext, step
from engine.errors import LeaseLost
from engine.models import Lease, NewRun, RunStatus, StepStatus
from engine.pauses import pause_at
from engine.runner import Runner, new_run_id
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


def test_a_cancelled_run_leaves_no_block_running(store: SqlStore, tmp_path: Path) -> None:
    """Cancelled while parked inside a switch case (the canceller writes), and while a repeat
    body step runs (the holder writes, at the next step boundary): the open blocks end
    `cancelled` with the run, none stays `running` forever."""
    text = """
steps:
  - id: route
    switch:
      - default: [{id: nap, wait: 1h}]
"""
    parked = run_text(store, tmp_path, text, foreground=False)
    assert statuses(store, parked.id) == {"route": "running", "nap": "waiting"}
    store.request_cancel(parked.id, store.now())
    assert statuses(store, parked.id) == {"route": "cancelled", "nap": "cancelled"}

    @step("bk.cancel_me")
    def cancel_me(ctx: StepContext) -> None:
        store.request_cancel(ctx.run_id, store.now())

    text = """
steps:
  - id: poll
    repeat:
      steps: [{id: body, call: bk.cancel_me}, {id: never, call: bk.echo}]
      max: 3
"""
    run = run_text(store, tmp_path, text)
    assert run.status == RunStatus.CANCELLED
    assert statuses(store, run.id) == {"poll": "cancelled", "body": "completed"}


def test_a_blocks_catch_handler_reads_the_failed_step_inside_it(
    store: SqlStore, tmp_path: Path
) -> None:
    text = """
steps:
  - id: poll
    repeat:
      steps:
        - {id: first, call: bk.echo, with: {value: 1}}
        - {id: inner, call: bk.fail, retry: {max_attempts: 1}}
      max: 3
    catch:
      steps:
        - id: handled
          call: bk.echo
          with: {value: "{{ steps.first.output }} {{ steps.inner.status }}: {{ steps.inner.error }}"}
"""
    run = run_text(store, tmp_path, text)
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output == "1 failed: CardDeclined: CardDeclined here"


def test_the_output_reads_error_of_the_last_step(store: SqlStore, tmp_path: Path) -> None:
    """`steps.<id>.error` is a field of every step (null unless failed), the last one's too:
    validate let `output` read it, then the run failed on 'no attribute error'."""
    text = """
steps:
  - {id: charge, call: bk.fail, retry: {max_attempts: 1}, catch: {steps: [{id: done, log: ok}]}}
output: "{{ steps.charge.error }} / {{ steps.done.error }}"
"""
    run = run_text(store, tmp_path, text)
    assert run.status == RunStatus.COMPLETED, run.error
    assert run.output == "CardDeclined: CardDeclined here / None"


class _Died(BaseException):
    """Stands for the process dying: raised before a commit, nothing catches it."""


EFFECTS: list[str] = []


@step("bk.effect")
def effect(ctx: StepContext) -> str:
    EFFECTS.append(ctx.idempotency_key.split(":", 1)[1])
    return ctx.idempotency_key.split(":", 1)[1]


@step("bk.round")
def round_number(ctx: StepContext) -> int:
    key = ctx.idempotency_key.split(":", 1)[1]
    EFFECTS.append(key)
    return int(key.partition("@")[2] or 1)


@step("bk.flaky")
def flaky_effect(ctx: StepContext) -> int:
    EFFECTS.append(ctx.idempotency_key.split(":", 1)[1] + f"#{ctx.attempt}")
    if ctx.attempt == 1:
        raise ConnectionError("the first attempt fails")
    return ctx.attempt


@step("bk.declined")
def declined(ctx: StepContext) -> None:
    EFFECTS.append(ctx.idempotency_key.split(":", 1)[1])
    raise CardDeclined("declined")


EVERYWHERE = """
steps:
  - id: route
    switch:
      - when: "false"
        steps: [{id: never, call: bk.effect}]
      - default:
          - {id: one, call: bk.effect}
          - id: poll
            repeat:
              steps:
                - {id: tick, call: bk.round}
                - {id: fl, call: bk.flaky, retry: {max_attempts: 2, min_delay: 1s, jitter: false}}
              until: steps.tick.output >= 3
              delay: 5s
              max: 4
  - id: charge
    call: bk.declined
    retry: {max_attempts: 1}
    catch:
      steps: [{id: three, call: bk.effect}, {id: four, call: bk.effect}]
  - {id: last, call: bk.effect}
"""


def test_a_process_dying_before_any_commit_loses_and_repeats_nothing(
    store: SqlStore, tmp_path: Path
) -> None:
    """The process dies before its Nth commit, for every N: entering the switch, each step
    in its case, each repeat round, the retry, the delay, the caught failure, each handler
    step. Another runner takes the run over when the lease has expired and ends it as an
    undisturbed run ends: same statuses, same output, no step effect lost, and at most the
    interrupted attempt's effect once more; no block is left running."""
    machine = compile_text(tmp_path, HEAD + EVERYWHERE)
    clock = FakeClock()
    EFFECTS.clear()
    calm = Runner(store, clock=clock, sleep=clock.sleep).start(machine, {})
    assert calm.status == RunStatus.COMPLETED, calm.error
    expected, baseline = statuses(store, calm.id), sorted(EFFECTS)
    commits = 0
    for n in range(1, 100):
        EFFECTS.clear()
        seen = [0]

        def die(n: int = n, seen: list[int] = seen) -> None:
            seen[0] += 1
            if seen[0] == n:
                raise _Died()

        first = Runner(store, Lease(f"a{n}", "h", 1, seconds=5), clock=clock, sleep=clock.sleep)
        with ExitStack() as hooks:
            for status in ("running", "waiting", "completed", "failed"):
                hooks.enter_context(pause_at(f"runner.before_commit.{status}", die))
            try:
                first.start(machine, {})
            except _Died:
                pass
            else:
                commits = n - 1
                break
        run_id = store.list_runs(limit=1)[0].id
        clock.now += 60
        second = Runner(store, Lease(f"b{n}", "h", 2, seconds=30), clock=clock, sleep=clock.sleep)
        run = second.drive(run_id)
        assert run.status == RunStatus.COMPLETED, (n, run.error)
        assert run.output == calm.output
        assert statuses(store, run_id) == expected, n
        extra = Counter(EFFECTS) - Counter(baseline)
        assert not Counter(baseline) - Counter(EFFECTS), (n, EFFECTS)  # nothing lost
        assert sum(extra.values()) <= 1, (n, extra)  # the interrupted attempt, at most
    assert commits >= 20  # every commit of the run was interrupted once


@step("bk.big")
def big(ctx: StepContext, kb: int) -> str:
    return "x" * (kb * 1024)


def test_a_repeats_rounds_together_are_bounded_like_a_values(
    store: SqlStore, tmp_path: Path
) -> None:
    """Each round's outputs are kept on the repeat's record: unbounded, 5 rounds of 900 KiB
    made a 4.6 MB value (any limit of the store's values broken, rewritten every round);
    like a for_each's items, the rounds together stop at JSON_SIZE_MAX."""
    text = """
steps:
  - id: poll
    repeat:
      steps: [{id: chunk, call: bk.big, with: {kb: 400}}]
      max: 5
"""
    run = run_text(store, tmp_path, text)
    assert run.status == RunStatus.FAILED
    assert run.error == (
        "step poll failed: StepOutputInvalid: steps.poll: the outputs of its rounds together "
        "exceed 1048576 bytes of JSON (at round 3)"
    )
    poll = {s.step_key: s for s in store.get_steps(run.id)}["poll"]
    assert len(poll.output) == 2  # the rounds that fit


@pytest.mark.parametrize("end", ["bulk cancel", "expiry"])
def test_a_run_handed_back_inside_a_block_and_ended_queued_leaves_no_block_running(
    store: SqlStore, tmp_path: Path, end: str
) -> None:
    """A worker stopping hands a run back queued at a step boundary, here inside a switch
    case; ended while queued (a bulk cancel's one UPDATE of queued runs, or its TTL, which
    a queued run meets again), the switch ended with it: it stayed running."""
    stop = [False]

    @step("bk.then_stop")
    def then_stop(ctx: StepContext) -> int:
        stop[0] = True
        return 1

    machine = compile_text(
        tmp_path,
        HEAD + "steps:\n  - id: route\n    switch:\n"
        "      - default: [{id: a, call: bk.then_stop}, {id: b, call: bk.echo}]\n",
    )
    clock = FakeClock()
    runner = Runner(store, foreground=False, should_stop=lambda: stop[0], clock=clock)
    new = NewRun(
        id=new_run_id(),
        workflow_id=machine.workflow_id,
        version=machine.version,
        definition_hash=machine.content_hash,
        payload={},
        first_step=machine.start,
        queue=machine.queue.name,
        trigger={"kind": "manual"},
        ttl=60.0,
    )
    run = runner.start(machine, {}, new=new)
    assert run.status == RunStatus.QUEUED
    assert statuses(store, run.id) == {"route": "running", "a": "completed"}
    if end == "bulk cancel":
        assert store.cancel_runs_batch([run.id], clock.now) == 1
    else:
        assert store.expire_runs(clock.now + 61) == [run.id]
    assert store.get_run(run.id).status.value == (
        "cancelled" if end == "bulk cancel" else "expired"
    )
    assert statuses(store, run.id) == {"route": "cancelled", "a": "completed"}


@pytest.mark.parametrize("due", [False, True])
def test_a_lease_expiring_during_a_repeats_delay(
    store: SqlStore, tmp_path: Path, due: bool
) -> None:
    """The foreground sleeps through a repeat's delay holding the lease; its lease expires
    meanwhile (no heartbeat: the process was stopped) and a worker claims the run. Before
    the delay is over the worker parks it again; after, it runs round 2 and parks at the
    next delay. The foreground wakes, reclaims the run and goes on: each round runs once,
    in order, none is skipped."""
    machine = compile_text(tmp_path, HEAD + REPEAT)
    clock = FakeClock()
    worker = Runner(store, Lease("worker", "h", 2, seconds=30), foreground=False, clock=clock)
    took: list[str] = []

    def stopped_sleep(seconds: float) -> None:
        if not took:
            run_id = store.list_runs(limit=1)[0].id
            took.append(run_id)
            clock.now += seconds + 1 if due else 6  # past the delay, or only past the lease
            parked = worker.drive(run_id)
            assert parked.status == RunStatus.WAITING and parked.lease_owner is None
            rounds = 2 if due else 1
            assert [c[0] for c in CALLS] == ["check"] * rounds
        clock.now += max(0.0, seconds)

    first = Runner(store, Lease("fg", "h", 1, seconds=5), clock=clock, sleep=stopped_sleep)
    run = first.start(machine, {"done_at": 3})
    assert took == [run.id]
    assert run.status == RunStatus.COMPLETED, run.error
    keys = [c[1] for c in CALLS if c[0] == "check"]
    assert keys == [f"{run.id}:check", f"{run.id}:check@2", f"{run.id}:check@3"]
    poll = {s.step_key: s for s in store.get_steps(run.id)}["poll"]
    assert [r["check"]["n"] for r in poll.output] == [1, 2, 3]
