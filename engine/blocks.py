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

from typing import Any

from dsl import Machine, State, TemplateError, compile_expression
from dsl.blocks import branch_states, descendants

from .models import StepState, StepStatus
from .transitions import Done, Enter, Failed, Outcome, Skipped, Suspended

__all__ = ["close_block", "is_open", "next_round", "open_block", "round_key"]


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
    rounds = [*progress.get("rounds", []), outputs]
    until, limit = state.config.get("until"), state.config.get("max")
    if until is not None and _holds(until, scope, f"steps.{state.id}.repeat.until"):
        return Done(rounds)
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
