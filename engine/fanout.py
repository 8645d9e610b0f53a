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

from dsl import Machine, State
from dsl.blocks import ancestors

from .errors import EngineError
from .executor import Host, child_run_id
from .models import NewRun, Run, RunStatus, StepStatus, Transition
from .transitions import Done, Failed, Outcome, Suspended

__all__ = [
    "KIND",
    "active_children",
    "branch_child",
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


def active_children(
    run_id: str, step_id: str, attempt: int, wait: dict[str, Any], answers: dict[int, Any]
) -> tuple[str, ...]:
    """The ids of the started children that have not answered."""
    return tuple(
        child_run_id(run_id, item_key(step_id, i), attempt)
        for i in range(int(wait.get("started", 0)))
        if i not in answers
    )
