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
from typing import Any

from dsl import State

from .errors import EngineError
from .executor import Host, child_run_id
from .models import NewRun, Run
from .transitions import Done, Failed, Outcome, Suspended

__all__ = ["KIND", "active_children", "item_key", "items_problem", "next_round"]

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
    run: Run,
    state: State,
    attempt: int,
    count: int,
    answers: dict[int, Any],
    wait: dict[str, Any] | None,
    payload_of: Callable[[int], Any],
    host: Host | None,
    wake_at: float | None,
) -> Outcome | None:
    """What the step does now that `answers` (item index -> the child's result) have come,
    `wait` being what it parked with (None on its first execution). None: nothing new."""
    failed = sorted(i for i, data in answers.items() if data.get("status") in _FAILED)
    if failed:
        data = answers[failed[0]]
        return Failed(
            "ChildFailed",
            f"item {failed[0]}: child run {data.get('run_id')} {data['status']}: "
            f"{data.get('error')}",
            retryable=False,
        )
    if len(answers) >= count:
        return Done([answers[i].get("output") for i in range(count)])
    started = int((wait or {}).get("started", 0))
    limit = max(1, int(state.config.get("concurrency") or 1))
    new = min(count - started, limit - (started - len(answers)))
    if wait is not None and new <= 0 and len(answers) == wait.get("answered"):
        return None
    if host is None:
        return Failed("Unsupported", f"steps.{state.id}: run_workflow needs the engine", False)
    children: list[NewRun] = []
    workflow = state.config["workflow"]
    for index in range(started, started + max(0, new)):
        key = item_key(state.id, index)
        try:
            children.append(
                host.prepare_child(
                    workflow,
                    payload_of(index),
                    (run.id, key, attempt),
                    child_run_id(run.id, key, attempt),
                )
            )
        except EngineError as exc:
            return Failed(type(exc).__name__, f"steps.{state.id} item {index}: {exc}", False)
    parked = {
        "kind": KIND,
        "workflow": workflow,
        "items": count,
        "started": started + len(children),
        "answered": len(answers),
    }
    return Suspended(wake_at, parked, tuple(children))


def active_children(
    run_id: str, step_id: str, attempt: int, wait: dict[str, Any], answers: dict[int, Any]
) -> tuple[str, ...]:
    """The ids of the started children that have not answered."""
    return tuple(
        child_run_id(run_id, item_key(step_id, i), attempt)
        for i in range(int(wait.get("started", 0)))
        if i not in answers
    )
