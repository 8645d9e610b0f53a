"""`durable-yaml worker`: executes queued runs, fires cron schedules, wakes timers.

A worker registers itself in the workers table and heartbeats it; its N executor threads each
claim one run at a time (`claim_next_run`, leased as `<worker id>/<slot>`) and drive it until
it ends or waits; waits release the run, so a waiting run never holds an executor.

Idle executors sleep until something can change: a commit elsewhere that may make a run
claimable (PostgreSQL LISTEN/NOTIFY; on SQLite a watcher of `PRAGMA data_version`), or the
earliest time a run becomes claimable by itself (`next_claim_at`: a timer, a delayed run, a
lease expiry, the end of a rate window). A full or rate-limited queue never makes them spin.

On SQLite, executors' step results that are ready together are committed in one transaction
(group commit, store/group.py): an executor goes on only once its own result is committed.
Their claims ride along: an executor whose run ended claims its next in the next flush.

Every thread survives any exception: it is logged, what the thread holds is released, and
the thread goes on (a thread that still dies is restarted). A run whose driving raises
anything but a database error fails with that error instead of being retried forever.
SIGTERM/SIGINT: stop claiming, let in-flight steps finish within the grace period, release
what is still held, deregister.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, cast

from .errors import DatabaseError, EngineError, LeaseLost, RunBusy, ValueNotStorable
from .metrics import observe_claim
from .models import Lease, Run, RunStatus, Transition, WorkerInfo
from .pauses import pause_point
from .runner import Runner
from .scheduler import CronScheduler
from .service import Engine
from .store import Store
from .store.group import GroupCommit
from .store.workers import lease_owner, new_worker_id

__all__ = ["Worker"]

log = logging.getLogger("durable_yaml.worker")
RETENTION_EVERY = 60.0  # seconds between retention purges (the first at a random point)
MAX_IDLE = 5.0  # while notifications flow, one idle executor looks this often anyway
MISSED_FIRST = 0.05  # a due run a claim left behind: looked for again this soon, then 2x
LONG_IDLE = 60.0  # ... and the other idle executors this often (a look that finds work
# wakes them all)
TRANSIENT = (DatabaseError, LeaseLost, RunBusy)  # the run is fine: someone drives it later


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
        group_commit: bool | None = None,
    ) -> None:
        self.engine = engine
        self.concurrency = concurrency
        self.queues = list(queues) or None
        self.poll_interval = poll_interval
        self.grace = grace
        self.lease_seconds = lease_seconds
        self.schedules = schedules
        self.group_commit = group_commit
        self._commits: GroupCommit | None = None  # made at start: the executors' commits
        self.id = new_worker_id()
        self.stopping = threading.Event()
        self._wake = threading.Condition()
        self._wake_count = 0  # bumped by every wake-up: a sleeper checks it did not miss one
        self._notified = threading.Event()  # LISTEN (or the SQLite watcher) is working
        self._poller = threading.Lock()  # held by the idle executor that looks every MAX_IDLE
        self._held: dict[int, tuple[str, Lease]] = {}
        self._threads: list[threading.Thread] = []

    @property
    def info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=tuple(self.queues or ()),
            concurrency=self.concurrency,
            lease_seconds=self.lease_seconds,
        )

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
        store = self.engine.store
        # by default on SQLite only: there one COMMIT is one fsync of the one database file,
        # which grouping shares; PostgreSQL commits a lone step in one autocommit round trip
        # and shares WAL flushes across connections itself (grouping measured 0.87x there)
        if self.group_commit or (self.group_commit is None and store.dialect == "sqlite"):
            self._commits = GroupCommit(store, busy=self._held.__len__)  # executors with runs
        store.register_worker(self.info, store.now())  # before any lease names this worker
        self.engine.save_all_definitions()
        # listening first: a commit from now on wakes the executors (each listener also
        # wakes them once when it starts, for what was committed before)
        if store.dialect == "postgresql":
            self._spawn(self._listen, "listener")
        else:
            self._spawn(self._watch_sqlite, "watcher")
        for i in range(self.concurrency):
            self._spawn(self._execute_forever, f"executor-{i}", i)
        self._spawn(self._heartbeat_forever, "heartbeat")
        if self.schedules:
            scheduler = CronScheduler.from_environment(self.engine, self.wake)
            self._spawn(scheduler.run_forever, "scheduler", self.stopping)
        self._spawn(self._refresh_workflows, "reloader")
        self._spawn(self._retention_forever, "retention")

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(
            target=self._supervised, name=name, args=(target, name, *args), daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _supervised(self, target: Callable[..., None], name: str, *args: Any) -> None:
        """Run a thread's loop; if anything escapes it, log it and start the loop again."""
        while not self.stopping.is_set():
            try:
                target(*args)
            except Exception:
                log.exception("worker thread %s failed; restarting it", name)
                self.stopping.wait(1.0)
            else:
                return

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
        self.wake(everyone=True)

    def shutdown(self) -> None:
        deadline = time.monotonic() + self.grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        store = self.engine.store
        for run_id, lease in list(self._held.values()):
            try:
                store.release(run_id, lease, store.now())
                log.info(
                    "released run %s (its step did not finish within the grace period)", run_id
                )
            except Exception as exc:
                log.error("could not release run %s: %s", run_id, exc)
        if self._commits is not None and self._commits.flushes:
            log.info(
                "group commit: %d step results in %d transactions",
                self._commits.grouped,
                self._commits.flushes,
            )
        if self._commits is not None and self._commits.claims:
            log.info(
                "group commit: %d claims in %d transactions (%d of claims alone)",
                self._commits.claimed,
                self._commits.claims,
                self._commits.claims_alone,
            )
        try:
            store.deregister_worker(self.id)
        except Exception as exc:
            log.error("could not deregister worker %s: %s", self.id, exc)

    def wake(self, everyone: bool = False) -> None:
        """Something may have become claimable: one sleeping executor looks (if it finds
        a run it wakes the next one, so a burst of runs is taken up by all of them, and an
        empty look costs one claim, not one per executor)."""
        with self._wake:
            self._wake_count += 1
            if everyone:
                self._wake.notify_all()
            else:
                self._wake.notify()

    # executing ------------------------------------------------------------------------------
    def _execute_forever(self, slot: int) -> None:
        lease = Lease(
            owner=lease_owner(self.id, slot),
            host=socket.gethostname(),
            pid=os.getpid(),
            seconds=self.lease_seconds,
        )
        runner = Runner(
            cast(Store, self._commits or self.engine.store),  # steps' results: group commit
            lease,
            foreground=False,
            host=self.engine,
            should_stop=self.stopping.is_set,
        )
        missed = 0  # empty claims in a row that left a due run behind (see below)
        while not self.stopping.is_set():
            seen = self._wake_count  # a wake-up from now on cuts the sleep below short
            try:
                pause_point("worker.claim")
                began = time.monotonic()
                run, exhausted, claimed_at = self._claim(lease)
                observe_claim(run is not None, time.monotonic() - began)
            except Exception as exc:
                log.error("claiming failed: %s", exc, exc_info=not isinstance(exc, EngineError))
                self._idle(self.poll_interval, seen)
                continue
            if run is None:
                if not exhausted:
                    continue  # runs were held back by limits or past the look: look again
                pause_point("worker.after_empty_claim")
                missed = self._idle_until_claimable(claimed_at, seen, missed)
                continue
            missed = 0
            self.wake()  # there may be more: the next sleeping executor looks too
            self._held[slot] = (run.id, lease)
            try:
                pause_point("worker.drive")
                runner.drive_claimed(run)
            except ValueNotStorable as exc:  # never storable: trying again cannot help
                log.error("run %s: %s", run.id, exc)
                self._fail(run, lease, exc)
            except TRANSIENT as exc:
                log.error("run %s: %s", run.id, exc)
                self._release(run, lease)
            except Exception as exc:
                log.exception("run %s: could not be executed", run.id)
                self._fail(run, lease, exc)
            finally:
                self._held.pop(slot, None)
                self._slot_freed(run)

    def _claim(self, lease: Lease) -> tuple[Run | None, bool, float]:
        """The next run for `lease` (None if none), whether the candidates ran out, and
        the time the claim used. With group commit, in the next flush (store/group.py)."""
        if self._commits is not None:
            claimed = self._commits.claim(lease, self.queues)
            return claimed.run, claimed.exhausted, claimed.at
        claimed_at = self.engine.store.now()
        run = self.engine.store.claim_next_run(lease, claimed_at, self.queues)
        return run, run is None, claimed_at

    def _release(self, run: Run, lease: Lease) -> None:
        try:
            self.engine.store.release(run.id, lease, self.engine.store.now())
        except Exception as exc:  # the lease then expires: the run is claimable again
            log.error("could not release run %s: %s", run.id, exc)

    def _fail(self, run: Run, lease: Lease, exc: Exception) -> None:
        """A run whose driving raised something unexpected fails with that error, once,
        instead of being claimed and crashing again forever (a poison run)."""
        error = (
            f"durable-yaml could not execute this run: {type(exc).__name__}: {exc} "
            "(see the worker's log)"
        )
        store = self.engine.store
        try:
            store.commit_transition(
                run.id, lease, Transition(RunStatus.FAILED, error=error), store.now()
            )
        except Exception as again:
            log.error("run %s: could not record its failure: %s", run.id, again)
            self._release(run, lease)

    def _slot_freed(self, run: Run) -> None:
        """The run stopped executing here: wake claimers waiting for its queue's slot."""
        try:
            limited = self.engine.store.announce_slot_freed(run.queue)
        except Exception as exc:
            log.warning("could not announce a free slot of queue %s: %s", run.queue, exc)
            limited = True
        if limited:
            self.wake()

    def _idle_until_claimable(self, claimed_at: float, seen: int, missed: int = 0) -> int:
        """Sleep after a claim at `claimed_at` found nothing, until a wake-up or the
        earliest time a run may become claimable by itself. While notifications flow,
        one idle executor (the poller) also looks every MAX_IDLE seconds in case one was
        missed, the others every LONG_IDLE; without them, every `poll_interval`.

        A run due by then that the claim did not take (`next_claim_at` gives `claimed_at`:
        on PostgreSQL, a transaction held its row locked while the claim looked, and let
        it go without taking it or sending a NOTIFY) is looked for again after MISSED_FIRST
        seconds, twice as long each time it is still so (`missed`, returned: how many
        times in a row), up to the longest sleep, each sleep jittered by a quarter so that
        executors which missed it together do not look again together: before, it waited
        for the poller, up to MAX_IDLE (found by the reviewer helper)."""
        poller = self._poller.acquire(blocking=False)
        try:
            if not self._notified.is_set():
                longest = self.poll_interval
            else:
                longest = MAX_IDLE if poller else LONG_IDLE
            store = self.engine.store
            try:
                due = store.next_claim_at(claimed_at, self.queues)
                now = store.now()
            except Exception as exc:
                log.warning("could not read when runs are due: %s", exc)
                due, now, longest = None, 0.0, self.poll_interval
            if due is not None and due <= claimed_at:  # a due run left behind
                # (jittered: executors that missed it together do not look again together)
                backoff = MISSED_FIRST * 2 ** min(missed, 16) * random.uniform(0.75, 1.25)
                self._idle(min(longest, backoff), seen)
                return missed + 1
            self._idle(longest if due is None else max(0.0, min(longest, due - now)), seen)
            return 0
        finally:
            if poller:
                self._poller.release()

    def _idle(self, seconds: float, seen: int) -> None:
        """Sleep `seconds` unless a wake-up came since the count `seen` was read."""
        if seconds <= 0:
            return
        with self._wake:
            if self._wake_count == seen:
                self._wake.wait(seconds)

    # the other threads ----------------------------------------------------------------------
    def _heartbeat_forever(self) -> None:
        """Stamp this worker alive every third of its lease time (registering again if a
        sweeper removed it while it was silent)."""
        store = self.engine.store
        every = max(0.2, self.lease_seconds / 3)
        while not self.stopping.wait(every):
            try:
                if not store.worker_heartbeat(self.id, store.now()):
                    log.warning("worker %s was taken for dead; registering again", self.id)
                    store.register_worker(self.info, store.now())
            except Exception as exc:
                log.warning("worker heartbeat failed: %s", exc)

    def _listen(self) -> None:
        """PostgreSQL LISTEN: wake executors when runs are queued, released or finished."""
        import psycopg

        from .store.db import NOTIFY_CHANNEL

        url = self.engine.store.engine.url.set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        while not self.stopping.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._notified.set()
                    self.wake()  # anything committed while not listening is looked at now
                    while not self.stopping.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self.wake()
            except Exception as exc:
                self._notified.clear()
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
            while True:
                try:
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                except sqlite3.Error:
                    version = last
                if version != last:  # the first look too: commits before it are looked at
                    self._notified.set()
                    self.wake()
                last = version
                if self.stopping.wait(0.05):
                    break
        finally:
            self._notified.clear()
            conn.close()

    def _retention_forever(self) -> None:
        """Once a minute (the first at a random point of it): purge by `retention`. Its own
        thread: a long purge (a backlog of a million runs) delays nothing else."""
        wait = RETENTION_EVERY * random.random()
        while not self.stopping.wait(wait):
            wait = RETENTION_EVERY
            try:
                self.apply_retention()
            except Exception as exc:
                log.error("retention: %s", exc, exc_info=not isinstance(exc, EngineError))

    def apply_retention(self) -> int:
        """Purge finished runs older than the `retention` setting, in small batches."""
        retention = {RunStatus(k): v for k, v in self.engine.settings.retention}
        purged = self.engine.purge_by_retention(retention, self.stopping)
        if purged:
            log.info("retention: purged %d finished runs", purged)
        return purged

    def _refresh_workflows(self) -> None:
        """Every 2 s: free the leases of dead workers; reload changed workflow files.
        Every hour: forget idempotency keys older than 30 days."""
        store = self.engine.store
        next_purge = 0.0
        while not self.stopping.wait(2.0):
            try:
                if time.monotonic() >= next_purge:
                    store.purge_idempotency_keys(store.now())
                    next_purge = time.monotonic() + 3600
                if store.expire_runs(store.now()):  # queued runs past their TTL
                    self.wake()
                if store.expire_dead_leases(store.now()):
                    self.wake()
                if self.engine.refresh_catalog():
                    self.engine.save_all_definitions()
                    log.info("workflows reloaded: %d", len(self.engine.catalog.workflows))
            except Exception as exc:
                log.error("reloading workflows: %s", exc, exc_info=not isinstance(exc, EngineError))
