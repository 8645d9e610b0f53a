"""Recording events and triggers: new runs, answered waits and idempotency keys, all in one
transaction; completing tokens.

An idempotency key is kept 30 days and creates at most one set of runs (the database's
primary key guarantees it, also for concurrent first uses); a key's runs that failed may be
started again by using it again, and only those. An event emitted by a run's `send_event`
step is stored in the transaction that records the step (and once per run step: the
database refuses a second), so nothing is emitted for a result that was not committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from ..answers import ANY, decided
from ..errors import NotFound, TokenError
from ..models import Emission, NewEvent, NewRun, RunStatus, Sent
from ..pauses import pause_point
from . import schema as t
from .db import Db
from .sqlutil import INSERT_RUN
from .waits import Inbox

__all__ = ["IDEMPOTENCY_SECONDS", "Events", "insert_tags", "new_run_values"]

IDEMPOTENCY_SECONDS = 30 * 86400


class Events:
    def __init__(self, db: Db, inbox: Inbox) -> None:
        self.db, self.inbox = db, inbox

    def send(
        self,
        new_runs: Sequence[NewRun],
        now: float,
        *,
        event: NewEvent | None = None,
        idempotency_key: str | None = None,
    ) -> Sent:
        """Atomically: check the key, store the event, create the runs, answer the waits."""

        def work(c: Connection) -> Sent:
            runs = list(new_runs)
            names = [event.name if event else None, *(r.first_wait_event for r in runs)]
            locked_now = self.db.lock_names(c, names, now)
            if idempotency_key is not None:
                scope = f"event:{event.name}" if event else f"trigger:{runs[0].workflow_id}"
                earlier, runs = self._claim_key(c, f"{scope}:{idempotency_key}", runs, now)
                if earlier is not None and not runs:
                    return Sent(tuple(earlier), (), duplicate=True)
                if earlier is not None:  # only the failed runs of a used key start again
                    self.insert_runs(c, runs, locked_now)
                    return Sent(tuple(r.id for r in runs), ())
            if event is not None:
                return self.store_emission(c, Emission(event, tuple(runs)), locked_now)
            self.insert_runs(c, runs, locked_now)
            return Sent(tuple(r.id for r in runs), ())

        return self.db.transact(work)

    def insert_runs(self, c: Connection, runs: Sequence[NewRun], now: float) -> None:
        """Queue new runs (the names of their first waits locked by the caller)."""
        for run in runs:
            c.execute(INSERT_RUN, new_run_values(run, now))
        insert_tags(c, runs, now)
        if runs:
            self.db.notify(c)

    def store_emission(self, c: Connection, emission: Emission, now: float) -> Sent:
        """Store an event and its runs and answer the parked waits it matches, in the
        caller's transaction, which holds the locks of the names involved and read `now`
        under them (`Db.lock_names`)."""
        event = emission.event
        c.execute(
            insert(t.events).values(
                id=event.id,
                name=event.name,
                payload=event.payload,
                idempotency_key=event.idempotency_key,
                source_run_id=event.source_run_id,
                source_step=event.source_step,
                created_at=now,
            )
        )
        resumed = self.inbox.deliver_event(c, event.id, event.name, event.payload, now)
        self.insert_runs(c, emission.runs, now)
        if resumed:
            self.db.notify(c)
        return Sent(tuple(r.id for r in emission.runs), tuple(resumed), event_id=event.id)

    def _claim_key(
        self, c: Connection, key: str, runs: list[NewRun], now: float
    ) -> tuple[list[str] | None, list[NewRun]]:
        """Take `key` for `runs`. If it was taken (and has not expired): the earlier runs,
        and those of `runs` that replace an earlier run of the same workflow that failed."""
        fresh = {
            "key": key,
            "run_ids": [r.id for r in runs],
            "created_at": now,
            "expires_at": now + IDEMPOTENCY_SECONDS,
        }
        if self.db.insert_ignore(c, t.idempotency_keys, fresh, ["key"]):
            return None, runs
        row = (
            c.execute(
                self.db.locked(select(t.idempotency_keys).where(t.idempotency_keys.c.key == key))
            )
            .mappings()
            .one()
        )
        if row["expires_at"] <= now:
            c.execute(
                update(t.idempotency_keys).where(t.idempotency_keys.c.key == key).values(**fresh)
            )
            return None, runs
        earlier: list[str] = list(row["run_ids"])
        states = c.execute(
            select(t.runs.c.id, t.runs.c.workflow_id, t.runs.c.status).where(
                t.runs.c.id.in_(earlier)
            )
        ).all()
        failed = {s.workflow_id: s.id for s in states if s.status == RunStatus.FAILED.value}
        again = [r for r in runs if r.workflow_id in failed]
        if again:
            kept = [rid for rid in earlier if rid not in {failed[r.workflow_id] for r in again}]
            c.execute(
                update(t.idempotency_keys)
                .where(t.idempotency_keys.c.key == key)
                .values(run_ids=kept + [r.id for r in again])
            )
        return earlier, again

    def complete_token(self, token: str, data: Any, now: float) -> str:
        """Answer the wait of `token` with `data`; its run id. TokenError if the wait was
        answered already (by this token, a timeout or a cancel), NotFound if no run had it."""

        def work(c: Connection) -> str:
            row = c.execute(select(t.tokens).where(t.tokens.c.token == token)).mappings().first()
            if row is None:
                raise NotFound(f"no run is waiting for token {token}")
            run_id, step_key = row["run_id"], row["step_key"]
            pause_point("store.token.found")
            if self.inbox.deliver(c, run_id, step_key, row["attempt"], "token", data, now):
                c.execute(
                    update(t.tokens)
                    .where(t.tokens.c.token == token)
                    .values(completed_at=now, data=data)
                )
                self.db.notify(c)
                return str(run_id)
            winner = self.inbox.read(c, run_id, step_key, row["attempt"])
            if winner is None and not self._run_exists(c, run_id):  # purged meanwhile
                raise NotFound(f"no run is waiting for token {token}")
            wait = (
                c.execute(
                    select(t.steps.c.wait).where(
                        t.steps.c.run_id == run_id, t.steps.c.step_key == step_key
                    )
                ).scalar()
                or {}
            )
            if (
                winner is not None
                and winner.kind not in ("cancel", "token")
                and wait.get("kind") == ANY
            ):
                first, _ = decided(wait, winner)
                raise TokenError(
                    f"token {token} (run {run_id}, step {step_key}) was withdrawn: "
                    f"the wait_for_any's alternative `{first}` happened first"
                )
            why = {
                "token": "was already completed; a token completes once",
                "timeout": "timed out before it was completed",
                "cancel": "belongs to a run that was cancelled",
            }.get(winner.kind if winner else "", "is no longer waited for")
            raise TokenError(f"token {token} (run {run_id}, step {step_key}) {why}")

        return self.db.transact(work)

    @staticmethod
    def _run_exists(c: Connection, run_id: str) -> bool:
        return c.execute(select(t.runs.c.id).where(t.runs.c.id == run_id)).first() is not None

    def purge_idempotency_keys(self, now: float) -> int:
        def work(c: Connection) -> int:
            res = c.execute(
                delete(t.idempotency_keys).where(t.idempotency_keys.c.expires_at <= now)
            )
            return int(res.rowcount or 0)

        return self.db.transact(work)


def new_run_values(new: NewRun, now: float) -> dict[str, Any]:
    return {
        "id": new.id,
        "workflow_id": new.workflow_id,
        "version": new.version,
        "definition_hash": new.definition_hash,
        "status": RunStatus.QUEUED.value,
        "payload": new.payload,
        "current_step": new.first_step,
        "current_attempt": 0,
        "step_running": False,
        "queue": new.queue,
        "concurrency_key": new.concurrency_key,
        "priority": new.priority,
        "trigger": new.trigger,
        "parent_run_id": new.parent_run_id,
        "parent_step": new.parent_step,
        "parent_attempt": new.parent_attempt,
        "idempotency_key": new.idempotency_key,
        "next_at": new.available_at if new.available_at is not None else now,
        "step_since": now,
        "active_seconds": 0.0,
        "created_at": now,
        "updated_at": now,
        "cancel_requested": False,
        "tags": list(new.tags) or None,
        "not_before": new.available_at,
        "expires_at": now + new.ttl if new.ttl is not None else None,
    }


def insert_tags(c: Connection, runs: Sequence[NewRun], now: float) -> None:
    """The search rows of new runs' tags, stamped with the runs' created_at (`now`)."""
    rows = [
        {"tag": tag, "created_at": now, "run_id": run.id}
        for run in runs
        for tag in dict.fromkeys(run.tags)
    ]
    if rows:
        c.execute(insert(t.run_tags), rows)
