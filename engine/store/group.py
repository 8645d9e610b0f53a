"""Group commit: a worker's executors commit their steps' results together (by default on
SQLite, where one COMMIT is one fsync of the database file; see worker.py).

Each executor hands its step's transition over and waits. Whoever finds no flush under way
flushes everything handed over so far in ONE transaction (`SqlStore.commit_transitions`);
what arrives meanwhile waits for the next flush, which starts the moment this one ends. No
timer: an idle worker's lone step is committed at once, and under load one COMMIT (one
fsync) carries many steps, past the ceiling of one commit per step.

Nothing is weakened: an executor goes on (its next step, an event it emits, a child it
starts) only once its own result is committed; a crash before a flush's COMMIT loses that
flush's results only, whose runs are executed again after their leases, as after any crash
before a commit. Only `groupable` transitions are grouped (a run's row and its step's row);
everything else is committed on its own, as before. A lost lease fails its own run alone;
a value the database refuses is retried alone, so only its run sees the error; any other
failure of the flush is every waiting executor's (their runs are released and run again).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..errors import DatabaseError, LeaseLost, ValueNotStorable
from ..models import Lease, Transition, TransitionResult
from ..pauses import pause_point
from .runs import groupable
from .sql import SqlStore

__all__ = ["GroupCommit"]


class _Handed:
    __slots__ = ("args", "done", "outcome")

    def __init__(self, args: tuple[str, Lease, Transition, float]) -> None:
        self.args = args
        self.done = False
        self.outcome: TransitionResult | BaseException | None = None


class GroupCommit:
    """The store, with `commit_transition` grouping across the threads that call it; every
    other attribute is the store's own. One per worker process."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self._cond = threading.Condition()
        self._handed: list[_Handed] = []
        self._flushing = False
        self.flushes = 0  # for tests and benchmarks: flushes, and the steps they carried
        self.grouped = 0
        # PostgreSQL commits a lone step in autocommit (one round trip, no BEGIN/COMMIT)
        self._alone_is_cheaper = store.dialect == "postgresql"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def commit_transition(
        self, run_id: str, lease: Lease, transition: Transition, now: float
    ) -> TransitionResult:
        if not groupable(transition):
            return self.store.commit_transition(run_id, lease, transition, now)
        mine = _Handed((run_id, lease, transition, now))
        with self._cond:
            self._handed.append(mine)
            while self._flushing and not mine.done:
                self._cond.wait()
            if not mine.done:  # no flush under way: this thread flushes all handed over
                self._flushing = True
                batch, self._handed = self._handed, []
        if not mine.done:
            try:
                self._flush(batch)
            finally:
                with self._cond:
                    for handed in batch:
                        if handed.outcome is None:  # the flush itself was interrupted
                            handed.outcome = DatabaseError("the group commit was interrupted")
                        handed.done = True
                    self._flushing = False
                    self._cond.notify_all()
        outcome = mine.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def _flush(self, batch: list[_Handed]) -> None:
        pause_point("group.flush")  # tests: the next steps hand over while this one waits
        self.flushes += 1
        self.grouped += len(batch)
        if len(batch) == 1 and self._alone_is_cheaper:
            self._each_alone(batch)
            return
        try:
            outcomes: list[Any] = self.store.commit_transitions([h.args for h in batch])
        except ValueNotStorable:  # one value the database refuses: each on its own
            self._each_alone(batch)
            return
        except Exception as exc:  # every executor gets the error (its own copy to raise)
            outcomes = [exc, *(_copy(exc) for _ in batch[1:])]
        for handed, outcome in zip(batch, outcomes, strict=True):
            handed.outcome = outcome

    def _each_alone(self, batch: list[_Handed]) -> None:
        commit: Callable[..., TransitionResult] = self.store.commit_transition
        for handed in batch:
            try:
                handed.outcome = commit(*handed.args)
            except (Exception, LeaseLost) as exc:
                handed.outcome = exc


def _copy(exc: Exception) -> Exception:
    try:
        return type(exc)(*exc.args)
    except Exception:
        return DatabaseError(str(exc))
