"""The inbox: one rule for every wake-up.

A wait is one attempt of one step of one run. Whatever ends it (an event, a token, a child's
result, its timeout, a cancel) is an `Answer` written as a row keyed by (run, step, attempt)
with `ON CONFLICT DO NOTHING`: the first writer wins, atomically, and every later writer
learns it lost. Answer writers lock the run's row after writing (`deliver`), and the commit
that parks a run locks that row before it reads the inbox (`find_answer`), so an answer is
either seen by the park or makes the parked run claimable: none is missed.

Event senders and waiters of one event name also serialise on a lock of that name, so an
event and a park that run at the same time see each other one way or the other.

A `wait_for_any` is one wait like any other: its alternatives all answer the same
(run, step, attempt), so the first of them wins by the same conflict (engine/answers.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.engine import Connection

from ..answers import ANY, SEPARATOR, alternative_rows, wait_names
from ..models import Answer, RunStatus, StepStatus
from ..pauses import pause_point
from . import schema as t
from .db import Db
from .sqlutil import dialect_insert

__all__ = ["Inbox", "event_winner", "payload_matches"]

NOT_ANSWERED = object()  # a stored event that does not answer the wait looking at it


def payload_matches(match: Any, payload: Any) -> bool:
    """True when `payload` contains every value of `match` (mappings compared recursively)."""
    if isinstance(match, dict):
        return isinstance(payload, dict) and all(
            k in payload and payload_matches(v, payload[k]) for k, v in match.items()
        )
    return bool(match == payload)


def event_winner(wait: dict[str, Any], name: str, payload: Any) -> str | None:
    """The first alternative of a wait_for_any (in document order) that an event `name`
    with `payload` answers, or None."""
    for alt in wait.get("alternatives") or []:
        if (
            alt["kind"] == "event"
            and alt["event"] == name
            and payload_matches(alt["match"], payload)
        ):
            return str(alt["name"])
    return None


WAKE_RUN = (
    sa.update(t.runs)
    .where(t.runs.c.id == sa.bindparam("w_id"))
    .values(
        # Matches every row, so it always takes the row lock (see the module docstring);
        # only a waiting run that nobody holds becomes claimable: a holder finds the answer.
        next_at=sa.case(
            (
                sa.and_(t.runs.c.status == RunStatus.WAITING.value, t.runs.c.lease_owner.is_(None)),
                sa.bindparam("w_now", type_=sa.Float),
            ),
            else_=t.runs.c.next_at,
        ),
        updated_at=sa.bindparam("w_now", type_=sa.Float),
    )
)


class Inbox:
    def __init__(self, db: Db) -> None:
        self.db = db

    def deliver(
        self,
        c: Connection,
        run_id: str,
        step_key: str,
        attempt: int,
        kind: str,
        data: Any,
        now: float,
        *,
        event_id: str | None = None,
        wake: bool = True,
    ) -> bool:
        """Answer the wait (run, step, attempt) unless something answered it first; True if
        this answer won. With `wake`, the run becomes claimable now if it is parked, and an
        answer for a run that is gone (purged since the caller looked: a token's, a child's
        result for its parent) is taken back and loses, so no answer outlives its run."""
        stmt = (
            dialect_insert(self.db.dialect)(t.inbox)
            .values(
                run_id=run_id,
                step_key=step_key,
                attempt=attempt,
                kind=kind,
                data=data,
                event_id=event_id,
                created_at=now,
            )
            .on_conflict_do_nothing()
            .returning(t.inbox.c.run_id)
        )
        if c.execute(stmt).first() is None:
            return False
        if wake and not c.execute(WAKE_RUN, {"w_id": run_id, "w_now": now}).rowcount:
            c.execute(
                sa.delete(t.inbox).where(
                    t.inbox.c.run_id == run_id,
                    t.inbox.c.step_key == step_key,
                    t.inbox.c.attempt == attempt,
                )
            )
            return False
        return True

    def read(self, c: Connection, run_id: str, step_key: str, attempt: int) -> Answer | None:
        row = c.execute(
            select(t.inbox.c.kind, t.inbox.c.data, t.inbox.c.event_id).where(
                t.inbox.c.run_id == run_id,
                t.inbox.c.step_key == step_key,
                t.inbox.c.attempt == attempt,
            )
        ).first()
        return None if row is None else Answer(row.kind, row.data, row.event_id)

    def take(
        self, run_id: str, step_key: str, attempt: int, now: float, *, timed_out: bool
    ) -> Answer | None:
        """The answer of a wait; with `timed_out` (its deadline passed), the timeout is
        written first unless an answer is there already: whichever was first wins."""

        def work(c: Connection) -> Answer | None:
            if timed_out:
                self.deliver(c, run_id, step_key, attempt, "timeout", None, now, wake=False)
            return self.read(c, run_id, step_key, attempt)

        pause_point("inbox.before_take")
        return self.db.transact(work)

    def find_answer(self, c: Connection, run: Any, step_key: str, now: float) -> Answer | None:
        """While parking `run` (its row locked): the answer its waiting step already has, or
        can take now - an event recorded since it reached the step (less `lookback`), a
        child that already ended."""
        step = c.execute(
            select(t.steps.c.status, t.steps.c.attempts, t.steps.c.wait).where(
                t.steps.c.run_id == run["id"], t.steps.c.step_key == step_key
            )
        ).first()
        if step is None or step.status != StepStatus.WAITING.value:
            return None
        answer = self.read(c, run["id"], step_key, step.attempts)
        if answer is not None:
            return answer
        wait = step.wait or {}
        if wait.get("kind") == ANY and wait_names(wait):
            since = run["step_since"] or run["created_at"]
            own = (run["trigger"] or {}).get("event_id")

            def alternative(name: str, payload: Any) -> Any:
                winner = event_winner(wait, name, payload)
                return NOT_ANSWERED if winner is None else {"winner": winner, "data": payload}

            return self._take_stored(
                c,
                run["id"],
                step_key,
                step.attempts,
                wait_names(wait),
                since,
                now,
                own,
                alternative,
            )
        if wait.get("kind") == "event":
            since = (run["step_since"] or run["created_at"]) - float(wait.get("lookback") or 0)
            own = (run["trigger"] or {}).get("event_id")
            match = wait.get("match") or {}
            return self._take_stored(
                c,
                run["id"],
                step_key,
                step.attempts,
                [wait["event"]],
                since,
                now,
                own,
                lambda _name, payload: payload if payload_matches(match, payload) else NOT_ANSWERED,
            )
        if wait.get("kind") == "children":  # for_each with run_workflow (engine/fanout.py)
            count = len(self.item_answers(c, run["id"], step_key, step.attempts))
            return Answer("children", count) if count > int(wait.get("answered") or 0) else None
        if wait.get("kind") == "child" and wait.get("run_id"):
            child = c.execute(
                select(t.runs.c.status, t.runs.c.output, t.runs.c.error).where(
                    t.runs.c.id == wait["run_id"]
                )
            ).first()
            if child is not None and child.status not in _ACTIVE:
                data = child_result(wait["run_id"], child.status, child.output, child.error)
                if self.deliver(
                    c, run["id"], step_key, step.attempts, "child", data, now, wake=False
                ):
                    return Answer("child", data)
                return self.read(c, run["id"], step_key, step.attempts)
        return None

    def _take_stored(
        self,
        c: Connection,
        run_id: str,
        step_key: str,
        attempt: int,
        names: Sequence[str],
        since: float,
        now: float,
        trigger_event: str | None,
        answer_of: Callable[[str, Any], Any],
    ) -> Answer | None:
        """The first event of `names` recorded since `since` that is not the run's own (the
        event that started it, or one it sent), that no other wait of it consumed, and that
        `answer_of(name, payload)` turns into the step's answer (NOT_ANSWERED: not this
        wait's; a null payload is an answer like any other)."""
        consumed = select(t.inbox.c.event_id).where(
            t.inbox.c.run_id == run_id, t.inbox.c.event_id.isnot(None)
        )
        rows = c.execute(
            select(t.events.c.id, t.events.c.name, t.events.c.payload)
            .where(
                t.events.c.name.in_(list(names)),
                t.events.c.created_at >= since,
                t.events.c.id.not_in(consumed),
                sa.or_(t.events.c.source_run_id.is_(None), t.events.c.source_run_id != run_id),
                t.events.c.id != (trigger_event or ""),
            )
            .order_by(t.events.c.created_at, t.events.c.id)
        )
        for row in rows:
            data = answer_of(row.name, row.payload)
            if data is NOT_ANSWERED:
                continue
            if self.deliver(
                c, run_id, step_key, attempt, "event", data, now, event_id=row.id, wake=False
            ):
                return Answer("event", data, row.id)
            return self.read(c, run_id, step_key, attempt)
        return None

    def item_answers(
        self, c: Connection, run_id: str, step_id: str, attempt: int
    ) -> dict[int, Any]:
        """The answers of the child runs a for_each step's attempt started, by item index
        (each child answers the key `<step>[index]`)."""
        rows = c.execute(
            select(t.inbox.c.step_key, t.inbox.c.data).where(
                t.inbox.c.run_id == run_id,
                t.inbox.c.step_key.startswith(step_id + "[", autoescape=True),
                t.inbox.c.attempt == attempt,
            )
        )
        return {int(row.step_key[len(step_id) + 1 : -1]): row.data for row in rows}

    def index_alternatives(
        self, c: Connection, run_id: str, step_key: str, attempt: int, wait: dict[str, Any]
    ) -> None:
        """A wait_for_any parks: one `dy_steps` row per event alternative, found by the
        event index (`wait_event`) and answering the step's attempt (answers.py)."""
        for row in alternative_rows(step_key, attempt, wait):
            values = {
                "run_id": run_id,
                "status": StepStatus.WAITING.value,
                "output": None,
                "error": None,
                "started_at": None,
                "finished_at": None,
                "wake_at": None,
                **row,
            }
            updates = ["status", "attempts", "wait", "wait_event"]
            self.db.upsert(c, t.steps, values, ["run_id", "step_key"], updates)

    def withdraw_alternatives(self, c: Connection, run_id: str, step_key: str) -> None:
        """A wait_for_any's wait has ended: its alternatives' index rows go."""
        c.execute(
            sa.delete(t.steps).where(
                t.steps.c.run_id == run_id,
                t.steps.c.step_key.startswith(step_key + SEPARATOR, autoescape=True),
            )
        )

    def deliver_event(
        self, c: Connection, event_id: str, name: str, payload: Any, now: float
    ) -> list[str]:
        """An event was just stored (its name locked): answer every parked wait for it that
        matches; the ids of the runs it resumed."""
        found = c.execute(
            select(t.steps.c.run_id, t.steps.c.step_key, t.steps.c.attempts, t.steps.c.wait)
            .where(
                t.steps.c.wait_event == name,
                t.steps.c.status == StepStatus.WAITING.value,
            )
            .order_by(t.steps.c.run_id, t.steps.c.step_key)
        ).all()
        # a wait_for_any's alternatives of one step in document order: the first that
        # matches is the one this event answers for
        rows = sorted(found, key=_answering_order)
        pause_point("inbox.deliver_event.matched")
        resumed = []
        for row in rows:
            wait = row.wait or {}
            if not payload_matches(wait.get("match") or {}, payload):
                continue
            target = wait.get("answers")
            if target is None:
                if self.deliver(
                    c, row.run_id, row.step_key, row.attempts, "event", payload, now,
                    event_id=event_id,
                ):  # fmt: skip
                    resumed.append(row.run_id)
                continue
            data = {"winner": wait["alternative"], "data": payload}
            if self.deliver(
                c, row.run_id, target, row.attempts, "event", data, now, event_id=event_id
            ):
                resumed.append(row.run_id)
            # won or lost (a timeout, a token or another event was first): the wait is over
            self.withdraw_alternatives(c, row.run_id, target)
        return resumed


def _answering_order(row: Any) -> tuple[str, str, int]:
    wait = row.wait or {}
    return (row.run_id, wait.get("answers") or row.step_key, wait.get("index", 0))


_ACTIVE = (RunStatus.QUEUED.value, RunStatus.RUNNING.value, RunStatus.WAITING.value)


def child_result(run_id: str, status: str, output: Any, error: str | None) -> dict[str, Any]:
    return {"status": status, "output": output, "error": error, "run_id": run_id}
