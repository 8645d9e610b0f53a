"""`for_each` with `run_workflow`: one child run per item, at most `concurrency` at once.

The step is one wait, `{"kind": "children", "items": n, "started": s, "answered": a}`.
Items are started in order; child `i` has the deterministic id of (run, `<step>[i]`,
attempt) and answers the inbox key (run, `<step>[i]`, attempt) when it ends, which makes the
parent claimable. Each time the parent is driven it reads its children's answers and
commits one transition: it starts as many children as `concurrency` allows (created in that
same transaction, so a crash before it starts none and one after it started them all: a
child is never created twice - its id is its primary key - nor lost), or completes with
the outputs in item order, or fails when a child failed (its still active brothers are
cancelled in that transaction). A parked parent's commit counts the answers under the run's
lock (`Inbox.find_answer`): one that came while it was busy keeps it going.

Pure: the runner reads the answers and commits what `next_round` decides.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from dsl import Machine, State, TemplateError, render_value
from dsl.blocks import ancestors, descendants

from .errors import EngineError
from .executor import Host, child_run_id
from .models import NewRun, Run, RunStatus, StepRecord, StepStatus, Transition
from .store import Store
from .transitions import Done, Failed, Outcome, Suspended

__all__ = [
    "KIND",
    "active_children",
    "branch_child",
    "children_round",
    "item_child",
    "item_key",
    "items_problem",
    "next_round",
    "within_branch",
]

KIND = "children"
_FAILED = ("failed", "cancelled", "expired")


def item_key(step_id: str, index: int) -> str:
    return f"{step_id}[{index}]"


def items_problem(field: str, items: Any) -> Failed | None:
    if isinstance(items, list):
        return None
    return Failed(
        "TypeError",
        f"{field}.for_each must give a list, not "
        f"{type(items).__name__}: {json.dumps(items, default=str)[:80]}",
        retryable=False,
    )


def next_round(
    state: State,
    count: int,
    limit: int,
    answers: dict[int, Any],
    wait: dict[str, Any] | None,
    make_child: Callable[[int], NewRun],
    wake_at: float | None,
    name_of: Callable[[int], str] = lambda i: f"item {i}",
) -> Outcome | None:
    """What the step does now that `answers` (child index -> the child's result) have come,
    `wait` being what it parked with (None on its first execution): start the next children
    (at most `limit` active), end with their outputs in order, or fail with the first that
    failed. None: nothing new since it parked."""
    failed = sorted(i for i, data in answers.items() if data.get("status") in _FAILED)
    if failed:
        data = answers[failed[0]]
        return Failed(
            "ChildFailed",
            f"{name_of(failed[0])}: child run {data.get('run_id')} {data['status']}: "
            f"{data.get('error')}",
            retryable=True,
        )
    if len(answers) >= count:
        return Done([answers[i].get("output") for i in range(count)])
    started = int((wait or {}).get("started", 0))
    new = min(count - started, max(1, limit) - (started - len(answers)))
    if wait is not None and new <= 0 and len(answers) == wait.get("answered"):
        return None
    children: list[NewRun] = []
    for index in range(started, started + max(0, new)):
        try:
            children.append(make_child(index))
        except EngineError as exc:
            return Failed(type(exc).__name__, f"steps.{state.id} {name_of(index)}: {exc}", False)
    parked = {
        "kind": KIND,
        "items": count,
        "started": started + len(children),
        "answered": len(answers),
    }
    return Suspended(wake_at, parked, tuple(children))


def item_child(
    host: Host, run: Run, state: State, attempt: int, payload: Any, index: int
) -> NewRun:
    """Child `index` of a for_each with run_workflow: a run of the current definition of
    the workflow it names."""
    key = item_key(state.id, index)
    return host.prepare_child(
        state.config["workflow"],
        payload,
        (run.id, key, attempt),
        child_run_id(run.id, key, attempt),
    )


def branch_child(
    host: Host, run: Run, machine: Machine, state: State, attempt: int, index: int
) -> NewRun:
    """Branch `index` of a parallel step: a run of the parent's own definition (pinned like
    the parent) from the branch's first state; its payload is the parent's. It ends when the
    branch's last step has (`within_branch`)."""
    branch = state.config["branches"][index]
    key = item_key(state.id, index)
    new = host.prepare_child(
        machine.workflow_id, run.payload, (run.id, key, attempt), child_run_id(run.id, key, attempt)
    )
    trigger = {**new.trigger, "kind": "branch", "branch": branch["name"]}
    return replace(
        new,
        version=run.version,
        definition_hash=run.definition_hash,
        first_step=branch["first"],
        first_wait_event=machine.state(branch["first"]).listens_for,
        trigger=trigger,
    )


def within_branch(machine: Machine, run: Run, tr: Transition) -> Transition:
    """In a branch run (a parallel step's child), a transition that would leave the branch
    ends the run instead: back to the parallel step - the branch has run, the run completes
    with its last step's output; a failure that leaves the parallel - the run fails."""
    if run.trigger.get("kind") != "branch" or tr.record is None:
        return tr
    block = str(run.trigger.get("step", "")).split("[", 1)[0]
    outside = {block, *(b for b, _ in ancestors(machine, block))}
    if tr.status == RunStatus.RUNNING and tr.current_step == block:
        return replace(
            tr, status=RunStatus.COMPLETED, current_step=None, begin_attempt=0,
            output=tr.record.output,
        )  # fmt: skip
    left = [a for a in tr.also if a.step_key in outside]
    if left or (tr.status == RunStatus.RUNNING and not _inside(machine, tr.current_step, block)):
        if tr.record.status != StepStatus.FAILED:
            return tr
        also = tuple(a for a in tr.also if a.step_key not in outside)
        return replace(
            tr, status=RunStatus.FAILED, current_step=None, begin_attempt=0, also=also,
            error=tr.error or tr.record.error,
        )  # fmt: skip
    return tr


def _inside(machine: Machine, step_id: str | None, block: str) -> bool:
    if step_id is None or step_id.startswith("$"):
        return False
    return any(b == block for b, _ in ancestors(machine, step_id))


def children_round(
    store: Store,
    host: Host,
    machine: Machine,
    run: Run,
    state: State,
    attempt: int,
    answers: dict[int, Any],
    wait: dict[str, Any] | None,
    deadline: float | None,
    now: float,
    scope_of: Callable[[], dict[str, Any]],
) -> tuple[Outcome | None, tuple[StepRecord, ...]]:
    """One round of a for_each's items or a parallel's branches: `next_round` with the
    children these steps make; a parallel that ends also returns its branches' step
    records, to copy into the run. `deadline`: the parked step's (None on its first round,
    which sets it from the step's `timeout`)."""
    field = f"steps.{state.id}"
    cfg = state.config
    if wait is None and state.timeout is not None:
        deadline = now + state.timeout
    if state.kind == "parallel":
        branches = cfg["branches"]
        outcome = next_round(
            state,
            len(branches),
            len(branches),
            answers,
            wait,
            lambda i: branch_child(host, run, machine, state, attempt, i),
            deadline,
            lambda i: f"branch {branches[i]['name']}",
        )
        return _branches_ended(store, machine, run, state, attempt, answers, outcome)
    scope = scope_of()
    try:
        items = render_value(cfg["items"], scope, f"{field}.for_each")
        problem = items_problem(field, items)
        if problem is not None:
            return problem, ()

        def make_child(index: int) -> NewRun:
            item_scope = {**scope, cfg["as"]: items[index]}
            payload = render_value(cfg["payload"], item_scope, f"{field}.payload")
            return item_child(host, run, state, attempt, payload, index)

        limit = int(cfg.get("concurrency") or 1)
        return next_round(state, len(items), limit, answers, wait, make_child, deadline), ()
    except TemplateError as exc:
        return Failed("TemplateError", str(exc), retryable=False), ()


def _branches_ended(
    store: Store,
    machine: Machine,
    run: Run,
    state: State,
    attempt: int,
    answers: dict[int, Any],
    outcome: Outcome | None,
) -> tuple[Outcome | None, tuple[StepRecord, ...]]:
    """A parallel step ends: its output maps each branch to its output, and the records of
    the ended branches' steps go with it (`steps.<id>` reads them after the step)."""
    if not isinstance(outcome, Done | Failed):
        return outcome, ()
    branches = state.config["branches"]
    copied: list[StepRecord] = []
    for index in sorted(answers):
        child = child_run_id(run.id, item_key(state.id, index), attempt)
        inside = {s.id for s in descendants(machine, state.id, branches[index]["name"])}
        copied += [
            StepRecord(
                s.step_key,
                s.status,
                s.attempts,
                s.started_at,
                output=s.output,
                error=s.error,
                wake_at=s.wake_at,
                wait=s.wait,
            )
            for s in store.get_steps(child)
            if s.step_key in inside
        ]
    if isinstance(outcome, Done):
        output = {b["name"]: out for b, out in zip(branches, outcome.output, strict=True)}
        return Done(output), tuple(copied)
    return outcome, tuple(copied)


def active_children(
    run_id: str, step_id: str, attempt: int, wait: dict[str, Any], answers: dict[int, Any]
) -> tuple[str, ...]:
    """The ids of the started children that have not answered."""
    return tuple(
        child_run_id(run_id, item_key(step_id, i), attempt)
        for i in range(int(wait.get("started", 0)))
        if i not in answers
    )
