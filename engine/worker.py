"""`durable-yaml worker`: executes queued runs, fires cron schedules, wakes timers.

N executor threads each claim one run at a time (`claim_next_run`) and drive it until it ends
or waits; waits release the run, so a waiting run never holds an executor. Idle executors
sleep until the next run is due, a PostgreSQL NOTIFY, or a local wake-up; nothing spins.
SIGTERM/SIGINT: stop claiming, let in-flight steps finish within the grace period, release
what is still held (the interrupted attempt is recorded as crashed and runs again elsewhere).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from .errors import EngineError
from .models import Lease
from .runner import Runner, new_lease
from .scheduler import CronScheduler
from .service import Engine

__all__ = ["Worker"]

log = logging.getLogger("durable_yaml.worker")


class Worker:
    def __init__(
        self,
        engine: Engine,
        *,
        concurrency: int = 4,
        queues: Sequence[str] = (),
        poll_interval: float = 1.0,
        grace: float = 30.0,
        lease_seconds: float = 30.0,
        schedules: bool = True,
    ) -> None:
        self.engine = engine
        self.concurrency = concurrency
        self.queues = list(queues) or None
        self.poll_interval = poll_interval
        self.grace = grace
        self.lease_seconds = lease_seconds
        self.schedules = schedules
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = threading.Event()
        self._wake = threading.Condition()
        self._held: dict[int, tuple[str, Lease]] = {}
        self._threads: list[threading.Thread] = []

    # lifecycle ------------------------------------------------------------------------------
    def status_line(self) -> str:
        catalog = self.engine.catalog
        crons = sum(1 for m in catalog.workflows.values() if m.trigger.kind == "cron")
        url = self.engine.store.engine.url.render_as_string(hide_password=True)
        queues = ", ".join(self.queues) if self.queues else "all"
        problems = f", {len(catalog.problems)} problem(s) in files" if catalog.problems else ""
        return (
            f"worker {self.id}: database {url}; queues {queues}; "
            f"{len(catalog.workflows)} workflows ({crons} scheduled){problems}; "
            f"concurrency {self.concurrency}"
        )

    def start(self) -> None:
        self.engine.save_all_definitions()
        for i in range(self.concurrency):
            self._spawn(self._execute_forever, f"executor-{i}", i)
        if self.schedules:
            scheduler = CronScheduler(self.engine, self.wake)
            self._spawn(scheduler.run_forever, "scheduler", self.stopping)
        if self.engine.store.dialect == "postgresql":
            self._spawn(self._listen, "listener")
        else:
            self._spawn(self._watch_sqlite, "watcher")
        self._spawn(self._refresh_workflows, "reloader")

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, name=name, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def run(self) -> None:
        """Start, then block until SIGTERM/SIGINT; shut down gracefully."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.start()
        while not self.stopping.wait(0.5):
            pass
        self.shutdown()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: finishing in-flight steps (grace %.0fs)", signum, self.grace)
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        self.wake()

    def shutdown(self) -> None:
        deadline = time.time() + self.grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.time()))
        for run_id, lease in list(self._held.values()):
            try:
                self.engine.store.release(run_id, lease, self.engine.store.now())
                log.info(
                    "released run %s (its step did not finish within the grace period)", run_id
                )
            except EngineError as exc:
                log.error("could not release run %s: %s", run_id, exc)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # executing ------------------------------------------------------------------------------
    def _execute_forever(self, slot: int) -> None:
        lease = new_lease(self.lease_seconds)
        runner = Runner(
            self.engine.store,
            lease,
            foreground=False,
            host=self.engine,
            should_stop=self.stopping.is_set,
        )
        while not self.stopping.is_set():
            try:
                run = self.engine.store.claim_next_run(lease, self.engine.store.now(), self.queues)
            except EngineError as exc:
                log.error("claiming failed: %s", exc)
                self._idle(self.poll_interval)
                continue
            if run is None:
                self._idle(self._until_next_due())
                continue
            self._held[slot] = (run.id, lease)
            try:
                runner.drive_claimed(run)
            except EngineError as exc:
                log.error("run %s: %s", run.id, exc)
            finally:
                self._held.pop(slot, None)

    def _until_next_due(self) -> float:
        try:
            due = self.engine.store.next_due_at(self.queues)
        except EngineError:
            return self.poll_interval
        if due is None:
            return self.poll_interval
        return max(0.0, min(self.poll_interval, due - self.engine.store.now()))

    def _idle(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._wake:
            self._wake.wait(seconds)

    def _listen(self) -> None:
        """PostgreSQL LISTEN: wake executors when runs are queued or resumed anywhere."""
        import psycopg

        from .store.db import NOTIFY_CHANNEL

        url = self.engine.store.engine.url.set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        while not self.stopping.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while not self.stopping.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self.wake()
            except psycopg.Error as exc:
                log.warning("LISTEN failed (%s); polling until it is back", exc)
                self.stopping.wait(self.poll_interval)

    def _watch_sqlite(self) -> None:
        """SQLite has no NOTIFY: `PRAGMA data_version` changes when another connection
        commits, so a cheap look every 50 ms wakes executors soon after a send."""
        import sqlite3

        path = self.engine.store.engine.url.database
        if not path or path == ":memory:":
            return
        conn = sqlite3.connect(path, timeout=5)
        try:
            last = None
            while not self.stopping.wait(0.05):
                try:
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                except sqlite3.Error:
                    continue
                if version != last and last is not None:
                    self.wake()
                last = version
        finally:
            conn.close()

    def _refresh_workflows(self) -> None:
        """Every 2 s: reload changed workflow files; free leases of dead local processes.
        Every hour: forget idempotency keys older than 30 days."""
        next_purge = 0.0
        while not self.stopping.wait(2.0):
            try:
                if time.time() >= next_purge:
                    self.engine.store.purge_idempotency_keys(self.engine.store.now())
                    next_purge = time.time() + 3600
                if self.engine.store.expire_dead_leases(
                    socket.gethostname(), self.engine.store.now()
                ):
                    self.wake()
                if self.engine.refresh_catalog():
                    self.engine.save_all_definitions()
                    log.info("workflows reloaded: %d", len(self.engine.catalog.workflows))
            except EngineError as exc:
                log.error("reloading workflows: %s", exc)
