"""Runs as JSON objects: the shape of `--json` in the CLI and of the HTTP API."""

from __future__ import annotations

import json
import shlex
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dsl import Machine

from .answers import waiting_alternatives
from .models import Attempt, LogEntry, Run, RunStatus, StepState
from .tracebacks import user_traceback

if TYPE_CHECKING:
    from .store import Store  # the store (and SQLAlchemy) only where one is passed in

__all__ = [
    "iso",
    "last_failure",
    "log_view",
    "run_detail",
    "run_summary",
    "schedule_views",
    "user_traceback",
    "waiting_view",
]


def iso(ts: float | None) -> str | None:
    """A POSIX timestamp as ISO-8601 UTC; one beyond what a datetime holds as `+inf`/`-inf`."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, tz=UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        return "+inf" if ts > 0 else "-inf"


def run_summary(run: Run, blocked_by: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run as `runs list --json` and the API list it; `blocked_by` (computed by
    `Engine.blocked_by` / `Store.blocked_by`) says why a queued run has not started."""
    return {
        "id": run.id,
        "workflow": run.workflow_id,
        "version": run.version,
        "status": run.status.value,
        "created_at": iso(run.created_at),
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "output": run.output,
        "error": run.error,
        "current_step": run.current_step,
        "queue": run.queue,
        "parent_run_id": run.parent_run_id,
        "definition_hash": run.definition_hash,
        "tags": list(run.tags),
        "metadata": run.metadata,
        "priority": run.priority,
        "not_before": iso(run.not_before),
        "expires_at": iso(run.expires_at),
        "blocked_by": blocked_by,
    }


def run_detail(store: Store, run: Run) -> dict[str, Any]:
    """The run with its payload, trigger and every step in machine order, with attempts."""
    machine = Machine.from_json(store.load_definition(run.definition_hash))
    stored: dict[str, StepState] = {s.step_key: s for s in store.get_steps(run.id)}
    attempts: dict[str, list[Attempt]] = {}
    for a in store.get_attempts(run.id):
        attempts.setdefault(a.step_key, []).append(a)
    steps = []
    for state in machine.states:
        st = stored.get(state.id)
        status, count = (st.status.value, st.attempts) if st else ("pending", 0)
        if state.id == run.current_step and run.step_running:
            status, count = "running", run.current_attempt
        if st is None and state.handler and status == "pending":
            continue
        history = [_attempt(a) for a in attempts.get(state.id, [])]
        if st is not None and st.status.value in ("completed", "skipped") and st.attempts:
            history.append(
                {
                    "attempt": st.attempts,
                    "status": st.status.value,
                    "started_at": iso(st.started_at),
                    "finished_at": iso(st.finished_at),
                    "error": None,
                }
            )
        steps.append(
            {
                "id": state.id,
                "kind": state.kind,
                "status": status,
                "attempts": count,
                "output": st.output if st else None,
                "error": st.error if st else None,
                "started_at": iso(st.started_at) if st else None,
                "finished_at": iso(st.finished_at) if st else None,
                "wake_at": iso(st.wake_at) if st else None,
                "wait": st.wait if st else None,
                "traceback": next(
                    (h["traceback"] for h in reversed(history) if h.get("traceback")), None
                ),
                "attempt_history": history,
            }
        )
    children = [c.id for c in store.list_runs(parent_run_id=run.id, limit=1000)]
    blocked = store.blocked_by(run, store.now()) if run.status == RunStatus.QUEUED else None
    waiting = waiting_view(run, stored.get(run.current_step or ""), machine)
    return {
        **run_summary(run, blocked),
        "children": children,
        "payload": run.payload,
        "trigger": run.trigger,
        "cancel_requested": run.cancel_requested,
        "steps": steps,
        "waiting": waiting,
    }


def waiting_view(run: Run, step: StepState | None, machine: Machine) -> dict[str, Any] | None:
    """What a waiting run waits for, and the command that answers it: `kind` (event, token,
    timer, child), the step, since when, `wake_at` for a timer, `deadline` (the step's
    timeout, null without one), the event and its `match` values, or the token; `command`
    sends an answer carrying the match values and every field the workflow later reads
    from that step's output (placeholders to edit). None unless the run is waiting."""
    if run.status != RunStatus.WAITING or step is None or step.status.value != "waiting":
        return None
    wait = step.wait or {}
    kind = str(wait.get("kind") or "timer")
    view: dict[str, Any] = {"step": step.step_key, "kind": kind, "since": iso(step.started_at)}
    if kind == "timer":
        view["wake_at"] = iso(step.wake_at)
        view["command"] = f"durable-yaml resume {run.id}"
        return view
    from dsl.reads import example_answer  # jinja2: only for a run that waits for an answer

    view["deadline"] = iso(step.wake_at)
    if kind == "event":
        answer = example_answer(machine, step.step_key, wait.get("match") or {})
        view |= {"event": wait["event"], "match": wait.get("match") or {}}
        view["command"] = (
            f"durable-yaml send {shlex.quote(wait['event'])} --payload {_quoted(answer)}"
        )
    elif kind == "token":
        answer = example_answer(machine, step.step_key, {})
        view["token"] = wait["token"]
        view["command"] = f"durable-yaml complete {wait['token']} --data {_quoted(answer)}"
    elif kind == "child":
        view |= {"run_id": wait.get("run_id"), "workflow": wait.get("workflow")}
        view["command"] = f"durable-yaml runs show {wait.get('run_id')}"
    elif kind == "children":  # a for_each's child runs, a parallel's branch runs
        view |= {
            "items": wait.get("items"),
            "started": wait.get("started"),
            "ended": wait.get("answered"),
        }
        view["command"] = f"durable-yaml runs show {run.id}"  # its children are listed there
    elif kind == "any":  # wait_for_any: each alternative as its own wait would show
        view["wake_at"] = iso(step.wake_at)  # the earliest `wait` alternative wins then
        view["alternatives"] = [
            _alternative_view(run, machine, step.step_key, alt)
            for alt in waiting_alternatives(wait)
        ]
        view["command"] = view["alternatives"][0]["command"] if view["alternatives"] else None
    else:  # a kind this view does not know yet: what is stored, as it is
        view["wait"] = wait
    return view


def _alternative_view(
    run: Run, machine: Machine, step_key: str, alt: dict[str, Any]
) -> dict[str, Any]:
    """One alternative of a waiting wait_for_any, with the command that makes it win. The
    answer's fields are read from the step's output's `data` (`steps.<id>.output.data`)."""
    from dsl.reads import example_answer

    view = dict(alt)
    if alt["kind"] == "event":
        answer = example_answer(machine, step_key, alt["match"] or {}, under=("data",))
        view["command"] = (
            f"durable-yaml send {shlex.quote(alt['event'])} --payload {_quoted(answer)}"
        )
    elif alt["kind"] == "token":
        answer = example_answer(machine, step_key, {}, under=("data",))
        view["command"] = f"durable-yaml complete {alt['token']} --data {_quoted(answer)}"
    else:
        view["wake_at"] = iso(view.pop("at"))
        view["command"] = f"durable-yaml resume {run.id}"
    return view


def _quoted(value: Any) -> str:
    return shlex.quote(json.dumps(value, default=str))


def _attempt(a: Attempt) -> dict[str, Any]:
    return {
        "attempt": a.attempt,
        "status": a.status,
        "started_at": iso(a.started_at),
        "finished_at": iso(a.finished_at),
        "error": a.error_message,
        "error_type": a.error_type,
        "traceback": user_traceback(a.traceback),  # the user's frames only
        "traceback_full": a.traceback,  # as stored, the engine's frames included
    }


def last_failure(store: Store, run_id: str) -> Attempt | None:
    """The run's latest failed attempt that left a traceback, if any."""
    failed = [a for a in store.get_attempts(run_id) if a.traceback]
    return max(failed, key=lambda a: a.finished_at or 0.0, default=None)


def log_view(entry: LogEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "run_id": entry.run_id,
        "time": iso(entry.created_at),
        "level": entry.level,
        "step": entry.step_key,
        "attempt": entry.attempt,
        "message": entry.message,
        "extra": entry.extra,
    }


def schedule_views(engine: Any, now: float, count: int = 5) -> list[dict[str, Any]]:
    """Each cron workflow with its next `count` fires (UTC and local) and its last fire."""
    from dsl import CronError, next_fires
    from dsl.cron import check_timezone  # zoneinfo: only where schedules are shown

    last = engine.store.last_fires()
    out = []
    for machine in sorted(engine.catalog.workflows.values(), key=lambda m: m.workflow_id):
        trigger = machine.trigger
        if trigger.kind != "cron" or trigger.cron is None:
            continue
        problem = None
        try:
            tz = check_timezone(trigger.timezone)
            fires = next_fires(
                trigger.cron, trigger.timezone, datetime.fromtimestamp(now, tz=UTC), count
            )
        except CronError as exc:  # a schedule stored before validate refused it
            problem, fires, tz = str(exc), [], None
        out.append(
            {
                "workflow": machine.workflow_id,
                "cron": trigger.cron,
                "timezone": trigger.timezone,
                "missed": trigger.missed,
                "overlap": trigger.overlap,
                "last_fire": iso(last.get(machine.workflow_id)),
                "next": [
                    {"utc": f.isoformat(), "local": f.astimezone(tz).isoformat()} for f in fires
                ],
                "error": problem,
            }
        )
    return out
