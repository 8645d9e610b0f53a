"""Executing block steps: `switch` and `repeat`, whose own state opens a nested list and,
when the list has run, closes it.

A block's state runs twice for each list it opens. Entering it opens the list: the block's
record becomes `running`, holding its progress (the case taken, the round and the rounds
so far), and the run moves to the list's first state, all in one transition. The list's
last state goes back to the block, which finds its record open and closes it: the switch
completes with the case's output; the repeat checks `until` and completes, fails (`max`
rounds spent), or sleeps `delay` and opens the next round. Each of these is one committed
transition, so a crash anywhere resumes at the step it interrupted: a completed step of
the list is never run again, and a round's progress is on the block's record.

Templates see a block's nested steps as any others: `steps.<id>` of a repeat body is the
latest round's.
"""

from __future__ import annotations

import json
from typing import Any

from dsl import Machine, State, TemplateError, compile_expression
from dsl.blocks import branch_states, descendants
from dsl.limits import JSON_SIZE_MAX

from .models import StepState, StepStatus
from .transitions import Done, Enter, Failed, Outcome, Skipped, Suspended

__all__ = ["close_block", "is_open", "next_round", "open_block", "resume_point", "round_key"]


def is_open(stored: StepState | None) -> bool:
    """The block's record says one of its lists is running (the run came back to close it)."""
    return stored is not None and stored.status == StepStatus.RUNNING


def _holds(expression: str, scope: dict[str, Any], field: str) -> bool:
    return bool(compile_expression("{{ " + expression + " }}", field).evaluate(scope, field))


def open_block(
    machine: Machine, state: State, steps: dict[str, StepState], scope: dict[str, Any], now: float
) -> Outcome:
    """Entering the block (its `when` held): open its first list."""
    try:
        if state.kind == "switch":
            return _open_switch(machine, state, scope)
        return _start_round(machine, state, 1, [])
    except TemplateError as exc:
        return Failed("TemplateError", str(exc), retryable=False)


def close_block(
    machine: Machine, state: State, steps: dict[str, StepState], scope: dict[str, Any], now: float
) -> Outcome:
    """The list the block opened has run: end the block, or open its next round."""
    progress = steps[state.id].output or {}
    try:
        if state.kind == "switch":
            last = branch_states(machine, state.id, progress.get("case", ""))[-1]
            record = steps.get(last.id)
            return Done(record.output if record is not None else None)
        return _round_ended(machine, state, progress, steps, scope, now)
    except TemplateError as exc:
        return Failed("TemplateError", str(exc), retryable=False)


def _open_switch(machine: Machine, state: State, scope: dict[str, Any]) -> Outcome:
    cases: list[dict[str, Any]] = state.config["cases"]
    for i, case in enumerate(cases):
        field = f"steps.{state.id}.switch[{i}].when"
        if case["when"] is None or _holds(case["when"], scope, field):
            first = branch_states(machine, state.id, case["branch"])[0]
            others = [
                s.id
                for other in cases
                if other["branch"] != case["branch"]
                for s in descendants(machine, state.id, other["branch"])
            ]
            return Enter(first.id, {"case": case["branch"]}, tuple(others))
    return Skipped()  # no case held and there is no default: every case's steps are skipped


def _start_round(machine: Machine, state: State, number: int, rounds: list[Any]) -> Enter:
    first = branch_states(machine, state.id, "body")[0]
    return Enter(first.id, {"round": number, "rounds": rounds})


def _round_ended(
    machine: Machine,
    state: State,
    progress: dict[str, Any],
    steps: dict[str, StepState],
    scope: dict[str, Any],
    now: float,
) -> Outcome:
    number = int(progress.get("round", 1))
    outputs = {
        s.id: steps[s.id].output for s in descendants(machine, state.id, "body") if s.id in steps
    }
    earlier = list(progress.get("rounds", []))
    rounds = [*earlier, outputs]
    if len(json.dumps(rounds)) > JSON_SIZE_MAX:  # the repeat's output would break the limit
        return Failed(
            "StepOutputInvalid",
            f"steps.{state.id}: the outputs of its rounds together exceed {JSON_SIZE_MAX} "
            f"bytes of JSON (at round {number})",
            retryable=False,
            output=earlier,
        )
    until, limit = state.config.get("until"), state.config.get("max")
    try:
        if until is not None and _holds(until, scope, f"steps.{state.id}.repeat.until"):
            return Done(rounds)
    except TemplateError as exc:  # the rounds are kept: a resume runs the next one
        return Failed("TemplateError", str(exc), retryable=False, output=rounds)
    if limit is not None and number >= limit:
        if until is None:
            return Done(rounds)  # `max` rounds were asked for, and have run
        return Failed(
            "RepeatExhausted",
            f"`until` did not hold after {number} rounds (max: {limit})",
            retryable=False,
            output=rounds,
        )
    delay = state.config.get("delay")
    if delay:
        return Suspended(
            now + float(delay), {"kind": "timer", "round": number + 1, "rounds": rounds}
        )
    return _start_round(machine, state, number + 1, rounds)


def next_round(machine: Machine, state: State, stored: StepState) -> Outcome:
    """The delay between two rounds is over: open the next one."""
    wait = stored.wait or {}
    return _start_round(machine, state, int(wait.get("round", 1)), list(wait.get("rounds", [])))


def round_key(machine: Machine, state: State, steps: dict[str, StepState]) -> str:
    """What tells this round of a step inside `repeat` bodies from the others: "" in every
    first round, else `@2` (`@2.1` for nested repeats, outermost first). Idempotency keys
    and sent events' sources carry it, so round 2 is not taken for a retry of round 1."""
    rounds: list[int] = []
    s = state
    while s.parent is not None:
        parent = machine.state(s.parent)
        if parent.kind == "repeat" and s.branch == "body":
            record = steps.get(parent.id)
            progress = record.output if record is not None and is_open(record) else None
            rounds.append(int((progress or {}).get("round", 1)))
        s = parent
    if all(r == 1 for r in rounds):
        return ""
    return "@" + ".".join(str(r) for r in reversed(rounds))


def resume_point(
    machine: Machine, steps: dict[str, StepState], now: float
) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """Where a resume of a failed run goes on: the step whose failure failed the run (not
    a step whose failure a `catch` took, nor a block a failure left), and the rows of
    `dy_steps` to reopen with it (step key -> the columns it takes), or None if no step
    failed the run (its output, say).

    A block the failure left is reopened where it stood (`running`, holding the case or the
    round it had), so its list goes on after the step and comes back to close it. A
    `repeat` that failed on its own (`max` rounds spent, `until` failing) gets one more
    round, its earlier rounds kept, as if its delay had just ended. Any other step becomes
    a due retry (the store's default).
    """
    failed = {k: st for k, st in steps.items() if st.status == StepStatus.FAILED}
    cause = next(
        (
            s
            for s in machine.main_states()
            if s.id in failed and (failed[s.id].wait or {}).get("kind") not in ("left", "caught")
        ),
        None,
    )
    if cause is None:
        return None
    reopen: dict[str, dict[str, Any]] = {}
    rounds = failed[cause.id].output
    if cause.kind == "repeat" and isinstance(rounds, list):
        wait = {"kind": "timer", "round": len(rounds) + 1, "rounds": rounds}
        reopen[cause.id] = {
            "status": StepStatus.WAITING.value,
            "wake_at": now,
            "wait": wait,
            "error": None,
        }
    for key, st in failed.items():
        how = st.wait or {}
        progress = how.get("progress")
        if how.get("kind") == "left" and how.get("failed_in") == cause.id and progress:
            reopen[key] = {
                "status": StepStatus.RUNNING.value,
                "output": progress,
                "wait": None,
                "error": None,
            }
    return cause.id, reopen
