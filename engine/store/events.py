"""Recording events and triggers: new runs, resumed waits and idempotency keys, all in one
transaction; completing tokens.

An idempotency key is kept 30 days and creates at most one set of runs (the database's
primary key guarantees it); a key whose runs failed may be used again. An event emitted by a
run's `send_event` step is stored once per (run, step): a step re-executed after a crash finds
its event and neither emits nor starts anything twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from ..errors import NotFound, TokenError
from ..models import NewEvent, NewRun, RunStatus, Sent, StepStatus
from . import schema as t
from .sqlutil import INSERT_RUN, translate

__all__ = ["IDEMPOTENCY_SECONDS", "EventOps", "new_run_values", "payload_matches"]

IDEMPOTENCY_SECONDS = 30 * 86400
NOTIFY_CHANNEL = "durable_yaml"


def payload_matches(match: Any, payload: Any) -> bool:
    """True when `payload` contains every value of `match` (mappings compared recursively)."""
    if isinstance(match, dict):
        return isinstance(payload, dict) and all(
            k in payload and payload_matches(v, payload[k]) for k, v in match.items()
        )
    return bool(match == payload)


class EventOps:
    engine: sa.Engine
    dialect: str

    def notify(self, c: Connection) -> None:
        """Wake listening workers (PostgreSQL NOTIFY, delivered at commit)."""
        if self.dialect == "postgresql":
            c.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    @translate
    def send(
        self,
        new_runs: Sequence[NewRun],
        now: float,
        *,
        event: NewEvent | None = None,
        idempotency_key: str | None = None,
    ) -> Sent:
        """Atomically: check the key, store the event, create the runs, resume the waits."""
        with self.engine.begin() as c:
            if event is not None and event.source_run_id is not None:
                emitted = c.execute(
                    select(t.events.c.id).where(
                        t.events.c.source_run_id == event.source_run_id,
                        t.events.c.source_step == event.source_step,
                    )
                ).first()
                if emitted is not None:  # the step ran before a crash: it is done already
                    return Sent((), (), duplicate=True, event_id=emitted.id)
            if idempotency_key is not None:
                earlier = self._claim_key(c, idempotency_key, [r.id for r in new_runs], now)
                if earlier is not None:
                    return Sent(tuple(earlier), (), duplicate=True)
            resumed: list[str] = []
            if event is not None:
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
                resumed = self._resume_waits(c, event, now)
            for run in new_runs:
                c.execute(INSERT_RUN, new_run_values(run, now))
            if new_runs or resumed:
                self.notify(c)
        return Sent(
            tuple(r.id for r in new_runs), tuple(resumed), event_id=event.id if event else None
        )

    def _claim_key(
        self, c: Connection, key: str, run_ids: list[str], now: float
    ) -> list[str] | None:
        """Take the key for `run_ids`; return the earlier runs if the key is taken."""
        q = select(t.idempotency_keys).where(t.idempotency_keys.c.key == key)
        if self.dialect == "postgresql":
            q = q.with_for_update()
        row = c.execute(q).mappings().first()
        if row is not None:
            earlier: list[str] = list(row["run_ids"])
            failed = c.execute(
                select(sa.func.count())
                .select_from(t.runs)
                .where(t.runs.c.id.in_(earlier), t.runs.c.status == RunStatus.FAILED.value)
            ).scalar_one()
            if row["expires_at"] > now and not failed:
                return earlier
            c.execute(delete(t.idempotency_keys).where(t.idempotency_keys.c.key == key))
        c.execute(
            insert(t.idempotency_keys).values(
                key=key, run_ids=run_ids, created_at=now, expires_at=now + IDEMPOTENCY_SECONDS
            )
        )
        return None

    def _resume_waits(self, c: Connection, event: NewEvent, now: float) -> list[str]:
        q = select(t.steps.c.run_id, t.steps.c.step_key, t.steps.c.wait).where(
            t.steps.c.wait_event == event.name,
            t.steps.c.status == StepStatus.WAITING.value,
            t.steps.c.resume_data.is_(None),
        )
        if self.dialect == "postgresql":
            q = q.with_for_update()
        resumed = []
        for row in c.execute(q).all():
            if not payload_matches((row.wait or {}).get("match") or {}, event.payload):
                continue
            self._resume_step(
                c, row.run_id, row.step_key, {"output": event.payload, "event_id": event.id}, now
            )
            resumed.append(row.run_id)
        return resumed

    def _resume_step(
        self, c: Connection, run_id: str, step_key: str, data: Any, now: float
    ) -> None:
        """Give a waiting step what it waited for (the first answer wins) and make its run
        claimable now, unless a process holds it (that process sees the answer itself)."""
        c.execute(
            update(t.steps)
            .where(
                t.steps.c.run_id == run_id,
                t.steps.c.step_key == step_key,
                t.steps.c.status == StepStatus.WAITING.value,
                t.steps.c.resume_data.is_(None),
            )
            .values(resume_data=data)
        )
        c.execute(
            update(t.runs)
            .where(
                t.runs.c.id == run_id,
                t.runs.c.status == RunStatus.WAITING.value,
                t.runs.c.lease_owner.is_(None),
            )
            .values(next_at=now, updated_at=now)
        )

    @translate
    def complete_token(self, token: str, data: Any, now: float) -> str:
        """Resume the run waiting on `token` with `data`; its run id. TokenError if the token
        was completed already, NotFound if no run ever had it."""
        with self.engine.begin() as c:
            q = select(t.tokens).where(t.tokens.c.token == token)
            if self.dialect == "postgresql":
                q = q.with_for_update()
            row = c.execute(q).mappings().first()
            if row is None:
                raise NotFound(f"no run is waiting for token {token}")
            if row["completed_at"] is not None:
                raise TokenError(
                    f"token {token} was already completed (run {row['run_id']}, "
                    f"step {row['step_key']}); a token completes once"
                )
            step = c.execute(
                select(t.steps.c.status).where(
                    t.steps.c.run_id == row["run_id"], t.steps.c.step_key == row["step_key"]
                )
            ).first()
            if step is None or step.status != StepStatus.WAITING.value:
                raise TokenError(f"token {token}: run {row['run_id']} no longer waits for it")
            c.execute(
                update(t.tokens)
                .where(t.tokens.c.token == token)
                .values(completed_at=now, data=data)
            )
            self._resume_step(
                c, row["run_id"], row["step_key"], {"output": data, "token": token}, now
            )
            self.notify(c)
            return str(row["run_id"])

    @translate
    def purge_idempotency_keys(self, now: float) -> int:
        with self.engine.begin() as c:
            res = c.execute(
                delete(t.idempotency_keys).where(t.idempotency_keys.c.expires_at <= now)
            )
            return int(res.rowcount or 0)


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
        "idempotency_key": new.idempotency_key,
        "next_at": new.available_at if new.available_at is not None else now,
        "active_seconds": 0.0,
        "created_at": now,
        "updated_at": now,
        "cancel_requested": False,
    }
