"""Worker processes: who they are, whether they are alive, and whose leases are dead.

Every `durable-yaml worker` registers a row in `dy_workers` (id, host, pid, queues,
concurrency, lease time) and heartbeats it with the database's clock. Its executors lease
runs as `<worker id>/<slot>`, so every worker lease names its worker. Such a lease is dead at
once when its worker's row is gone (a graceful stop deregisters) or stale (no heartbeat for
longer than the worker's lease time); otherwise it lives until it expires. No process ids or
hostnames are compared across processes: containers that share a hostname but not a PID
namespace keep their leases.

Foreground commands (`run`, `resume`) are not workers. Their lease owner names their process
as `fg:<pid namespace>:<pid>:<random>` (see `foreground_owner`); such a lease is dead at once
only when it belongs to this host's PID namespace and its process is gone, and otherwise
lives until it expires.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection

from ..models import ACTIVE_STATUSES, RunStatus, WorkerInfo
from ..pauses import pause_point
from . import schema as t
from .db import Db
from .sqlutil import pid_alive

__all__ = [
    "Workers",
    "foreground_owner",
    "lease_owner",
    "new_worker_id",
    "owner_worker",
    "pid_namespace",
]

_ACTIVE = [s.value for s in ACTIVE_STATUSES]


def pid_namespace() -> str:
    """This process's PID namespace and boot: pids are comparable only within one."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
    except OSError:
        boot = socket.gethostname()[:16]
    return f"{boot}.{ns}"


def new_worker_id() -> str:
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def lease_owner(worker_id: str, slot: int) -> str:
    """The lease owner of executor `slot` of a worker: attributable to the worker."""
    return f"{worker_id}/{slot}"


def owner_worker(owner: str | None) -> str | None:
    """The worker id a lease owner belongs to, None for a foreground process's lease."""
    if not owner or "/" not in owner:
        return None
    return owner.rsplit("/", 1)[0]


def foreground_owner() -> str:
    return f"fg:{pid_namespace()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _foreground_alive(owner: str) -> bool:
    """A foreground process is known dead only if it ran in this PID namespace and is gone."""
    parts = owner.split(":")
    if len(parts) != 4 or parts[0] != "fg" or parts[1] != pid_namespace():
        return True
    try:
        return pid_alive(int(parts[2]))
    except ValueError:
        return True


class Workers:
    def __init__(self, db: Db) -> None:
        self.db = db

    def register(self, worker: WorkerInfo, now: float) -> None:
        """Insert or refresh this worker's row (started and heartbeat now); idempotent."""
        values = {
            "id": worker.id,
            "host": worker.host,
            "pid": worker.pid,
            "queues": list(worker.queues) if worker.queues else None,
            "concurrency": worker.concurrency,
            "lease_seconds": worker.lease_seconds,
            "started_at": now,
            "heartbeat_at": now,
        }
        self.db.transact(
            lambda c: self.db.upsert(
                c, t.workers, values, ["id"], ["heartbeat_at", "queues", "concurrency"]
            )
        )

    def heartbeat(self, worker_id: str, now: float) -> bool:
        """Stamp the worker alive; False if its row is gone (a sweeper found it stale and
        freed its leases): the caller registers again."""
        pause_point("workers.heartbeat")

        def work(c: Connection) -> bool:
            row = c.execute(
                update(t.workers)
                .where(t.workers.c.id == worker_id)
                .values(heartbeat_at=now)
                .returning(t.workers.c.id)
            ).first()
            return row is not None

        return self.db.transact(work)

    def deregister(self, worker_id: str) -> None:
        """A graceful stop: the worker's remaining leases (if any) are dead at once."""
        self.db.transact(lambda c: c.execute(delete(t.workers).where(t.workers.c.id == worker_id)))

    def owner_alive(self, c: Connection, owner: str | None, now: float) -> bool:
        """Whether the holder of a lease (not expired at `now`) is alive, read in the
        claiming transaction. The worker's row is share-locked (PostgreSQL; SQLite's write
        lock is held already), so the worker's own heartbeat cannot land between this read
        and the takeover: it waits, and the worker then loses the run at its next lease
        write (every one is conditional on the lease)."""
        if not owner:
            return False
        worker_id = owner_worker(owner)
        if worker_id is None:
            return _foreground_alive(owner)
        q = select(t.workers.c.heartbeat_at, t.workers.c.lease_seconds).where(
            t.workers.c.id == worker_id
        )
        if self.db.is_postgres:
            q = q.with_for_update(read=True)
        row = c.execute(q).first()
        return row is not None and row.heartbeat_at + row.lease_seconds >= now

    def expire_dead_leases(self, now: float) -> list[str]:
        """Runs leased by dead workers become claimable now, and stale workers' rows are
        removed; atomic. Returns the runs.

        A stale worker's row is locked (PostgreSQL: FOR UPDATE, SQLite: the write lock)
        and its staleness checked under that lock, so its own heartbeat either lands
        first (it is alive: nothing changes) or waits and then finds no row (it registers
        again; its runs' leases are conditional on their owner and it keeps only those
        nobody took over meanwhile)."""

        def work(c: Connection) -> list[str]:
            stale_q = select(t.workers.c.id).where(
                t.workers.c.heartbeat_at + t.workers.c.lease_seconds < now
            )
            stale = list(c.execute(self.db.locked(stale_q, skip_locked=True)).scalars())
            pause_point("workers.expire.locked")
            owner = t.runs.c.lease_owner
            held_by = [
                func.substr(owner, 1, len(w) + 1) == w + "/" for w in stale
            ]  # a prefix test free of LIKE's wildcards
            live_worker = (
                select(t.workers.c.id)
                .where(
                    func.substr(owner, 1, func.length(t.workers.c.id) + 1) == t.workers.c.id + "/"
                )
                .exists()
            )
            orphan = sa.and_(owner.like("%/%"), ~live_worker)
            dead = sa.or_(orphan, *held_by) if held_by else orphan
            dead_leases = select(t.runs.c.id).where(
                # a leased run's next_at is its lease expiry: read by that index
                t.runs.c.next_at > now,
                t.runs.c.lease_expires_at > now,
                t.runs.c.status.in_(_ACTIVE),
                dead,
            )
            # a run locked by a claimer is skipped: that claimer decides (locking it here
            # after the worker rows would invert claim_run's order, run then worker); if it
            # is left leased to a removed worker, the next sweep finds it an orphan
            ids = list(c.execute(self.db.locked(dead_leases, skip_locked=True)).scalars())
            if ids:
                c.execute(
                    update(t.runs)
                    .where(t.runs.c.id.in_(ids), t.runs.c.lease_expires_at > now)
                    .values(lease_expires_at=now, next_at=now, updated_at=now)
                )
                self.db.notify(c)
            if stale:
                c.execute(delete(t.workers).where(t.workers.c.id.in_(stale)))
            return ids

        return self.db.transact(work)

    def list_workers(self, now: float) -> list[dict[str, Any]]:
        """Live workers (heartbeat within their lease time), each with how many runs its
        executors hold now, oldest first."""
        running = (
            select(func.count())
            .select_from(t.runs)
            .where(
                t.runs.c.status == RunStatus.RUNNING.value,
                t.runs.c.lease_expires_at > now,
                func.substr(t.runs.c.lease_owner, 1, func.length(t.workers.c.id) + 1)
                == t.workers.c.id + "/",
            )
            .scalar_subquery()
        )
        q = (
            select(t.workers, running.label("running"))
            .where(t.workers.c.heartbeat_at + t.workers.c.lease_seconds >= now)
            .order_by(t.workers.c.started_at, t.workers.c.id)
        )
        with self.db.read() as c:
            rows = c.execute(q).mappings().all()
        return [
            {
                "id": r["id"],
                "host": r["host"],
                "pid": r["pid"],
                "queues": r["queues"],
                "concurrency": r["concurrency"],
                "running": int(r["running"] or 0),
                "lease_seconds": r["lease_seconds"],
                "started_at": r["started_at"],
                "heartbeat_at": r["heartbeat_at"],
            }
            for r in rows
        ]
