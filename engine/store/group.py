"""Group commit: a worker's executors commit their steps' results together (by default on
SQLite, where one COMMIT is one fsync of the database file; see worker.py).

Each executor hands its step's transition over and waits. Whoever finds no flush under way
flushes everything handed over so far in ONE transaction (`SqlStore.commit_transitions`);
what arrives meanwhile waits for the next flush, which starts the moment this one ends. No
timer: an idle worker's lone step is committed at once, and under load one COMMIT (one
fsync) carries many steps, past the ceiling of one commit per step.

Under load the flusher first yields the interpreter to the executors that hold runs and
have not handed over yet, while each yield brings one more (`_gather`): their steps join this
flush instead of the next. No timer there either: an idle worker, or executors waiting on
I/O, give it nothing to wait for.

On SQLite an executor looking for its next run hands its claim over the same way (`claim`):
a flush carries the claims handed over with its steps (`SqlStore.commit_and_claim`), so the
executors whose runs just ended take their next runs in the steps' transaction instead of a
transaction each (half a worker's transactions were claims, issue #15). A flush of claims
alone commits without waiting for the disk, as any claim does (see `Db.transact`).

Nothing is weakened: an executor goes on (its next step, an event it emits, a child it
starts) only once its own result is committed; a crash before a flush's COMMIT loses that
flush's results and claims only, whose runs are executed again after their leases (a lost
claim's run was never begun), as after any crash before a commit. Only `groupable`
transitions are grouped (a run's row and its step's row); everything else is committed on
its own, as before. A lost lease fails its own run alone; a value the database refuses is
retried alone, so only its run sees the error; a flush carrying claims whose statement fails
(so nothing of it was committed) is made again as two transactions, steps and claims apart,
so neither fails the other; any other failure of a flush (at BEGIN, at COMMIT or after it,
when what was committed is not known) is every waiting executor's: their runs are released
and run again, their claims made again.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import DatabaseError, LeaseLost, ValueNotStorable, copy_error
from ..models import Lease, Run, Transition, TransitionResult
from ..pauses import pause_point
from .runs import groupable
from .sql import RolledBack, SqlStore

__all__ = ["Claimed", "GroupCommit"]


class _Handed:
    __slots__ = ("args", "done", "outcome")

    def __init__(self, args: tuple[str, Lease, Transition, float]) -> None:
        self.args = args
        self.done = False
        self.outcome: TransitionResult | BaseException | None = None


class Claimed:
    """One executor's claim handed over: once `done`, the run it got (None if none),
    whether the candidates ran out (only then may it wait for a wake-up: otherwise runs
    were held back by limits or lay past the look, and it claims again), and the time the
    claim used, later than the executor's hand-over."""

    __slots__ = ("answered", "at", "done", "error", "exhausted", "lease", "queues", "run")

    def __init__(self, lease: Lease, queues: Sequence[str] | None) -> None:
        self.lease, self.queues = lease, queues
        self.done = self.answered = False
        self.run: Run | None = None
        self.exhausted = False
        self.at = 0.0
        self.error: BaseException | None = None


class GroupCommit:
    """The store, with `commit_transition` grouping across the threads that call it; every
    other attribute is the store's own. One per worker process."""

    def __init__(self, store: SqlStore, busy: Callable[[], int] | None = None) -> None:
        self.store = store
        # how many executors hold runs (the worker's count), and a yield of the interpreter
        # to them: see `_gather`
        self.busy = busy
        self.max_gather = 64
        self._yield: Callable[[], None] = functools.partial(time.sleep, 0)
        self._cond = threading.Condition()
        self._handed: list[_Handed | Claimed] = []
        self._flushing = False
        self.flushes = 0  # for tests and benchmarks: flushes, and the steps they carried
        self.grouped = 0
        self.claims = 0  # ... flushes carrying claims, and the claims they carried
        self.claimed = 0
        self.claims_alone = 0
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
        self._hand_over(mine)
        outcome = mine.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def claim(self, lease: Lease, queues: Sequence[str] | None) -> Claimed:
        """`claim_next_run` for `lease`, in the next flush (SQLite; on PostgreSQL a claim
        of its own). Raises what the claim raised."""
        mine = Claimed(lease, queues)
        if self._alone_is_cheaper:  # PostgreSQL: see `commit_and_claim`
            mine.at = self.store.now()
            mine.run = self.store.claim_next_run(lease, mine.at, queues)
            mine.exhausted, mine.answered = mine.run is None, True
            return mine
        self._hand_over(mine)
        if mine.error is not None:
            raise mine.error
        return mine

    def _hand_over(self, mine: _Handed | Claimed) -> None:
        """Wait until `mine` is done: by the flush under way's successor, or by this thread
        flushing everything handed over so far when no flush is under way."""
        with self._cond:
            self._handed.append(mine)
            while self._flushing and not mine.done:
                self._cond.wait()
            if mine.done:
                return
            self._flushing = True  # no flush under way: this thread flushes all handed over
            try:
                self._gather()
                interrupted: BaseException | None = None
            except BaseException as exc:  # (an optimisation: it must never leave us flushing)
                interrupted = exc
            batch, self._handed = self._handed, []
        try:
            if interrupted is not None:
                raise interrupted  # every item handed over is answered below
            self._flush(batch)
        finally:
            with self._cond:
                for handed in batch:
                    if isinstance(handed, Claimed):
                        if not handed.answered and handed.error is None:
                            handed.error = DatabaseError("the claim was interrupted")
                    elif handed.outcome is None:  # the flush itself was interrupted
                        handed.outcome = DatabaseError("the group commit was interrupted")
                    handed.done = True
                self._flushing = False
                self._cond.notify_all()

    def _gather(self) -> None:
        """Under load, before taking the batch (`_cond` held): while executors that hold
        runs have not handed over yet (`busy`), yield the interpreter to them, as long as
        each yield brings another hand-over. Their steps' Python runs in turn under the GIL,
        so they come ready one after another; each joins this flush instead of needing the
        next (issue #15: a busy worker's transactions 2,640 -> 1,610, its context switches
        halved). Never a timer: with nobody else busy it does nothing, and a yield that
        brings nothing (a step waiting on I/O or computing) ends it."""
        if self.busy is None:
            return
        for _ in range(self.max_gather):
            before = len(self._handed)
            if self.busy() <= before:
                return
            self._cond.release()
            try:
                self._yield()
            finally:
                _reacquire(self._cond)
            if len(self._handed) == before:
                return

    def _flush(self, handed: list[_Handed | Claimed]) -> None:
        pause_point("group.flush")  # tests: the next steps hand over while this one waits
        batch = [h for h in handed if isinstance(h, _Handed)]
        claims = [h for h in handed if isinstance(h, Claimed)]
        if batch:
            self.flushes += 1
            self.grouped += len(batch)
        if claims:
            self.claims += 1
            self.claimed += len(claims)
            if not batch:
                self.claims_alone += 1
        if len(batch) == 1 and not claims and self._alone_is_cheaper:
            self._each_alone(batch)
            return
        if not claims:
            self._commit_steps(batch)
            return
        now = self.store.now()  # the claims' time: later than every hand-over
        try:
            outcomes, runs, exhausted = self.store.commit_and_claim(
                [h.args for h in batch], [h.lease for h in claims], now, claims[0].queues
            )
        except RolledBack:  # a statement failed: steps and claims apart, neither fails the other
            self._commit_steps(batch)
            self._claim_alone(claims)
            return
        except Exception as exc:  # at COMMIT or after: it may be committed, so never again
            errors = [exc, *(copy_error(exc) for _ in handed[1:])]
            for h, error in zip(handed, errors, strict=True):
                if isinstance(h, Claimed):
                    h.error = error
                else:
                    h.outcome = error
            return
        for h, outcome in zip(batch, outcomes, strict=True):
            h.outcome = outcome
        _answer(claims, runs, exhausted, now)

    def _commit_steps(self, batch: list[_Handed]) -> None:
        if not batch:
            return
        try:
            outcomes: list[Any] = self.store.commit_transitions([h.args for h in batch])
        except ValueNotStorable:  # one value the database refuses: each on its own
            self._each_alone(batch)
            return
        except Exception as exc:  # every executor gets the error (its own copy to raise)
            outcomes = [exc, *(copy_error(exc) for _ in batch[1:])]
        for h, outcome in zip(batch, outcomes, strict=True):
            h.outcome = outcome

    def _each_alone(self, batch: list[_Handed]) -> None:
        commit: Callable[..., TransitionResult] = self.store.commit_transition
        for handed in batch:
            try:
                handed.outcome = commit(*handed.args)
            except (Exception, LeaseLost) as exc:
                handed.outcome = exc

    def _claim_alone(self, claims: list[Claimed]) -> None:
        now = self.store.now()
        try:
            runs, exhausted = self.store.claim_next_runs(
                [h.lease for h in claims], now, claims[0].queues
            )
        except Exception as exc:
            for h in claims:
                h.error = copy_error(exc)
            return
        _answer(claims, runs, exhausted, now)


def _reacquire(cond: threading.Condition) -> None:
    """Hold `cond` again, even if a signal's exception interrupts the wait for it (then
    raised once it is held: the caller's `with` must find it held)."""
    pending: BaseException | None = None
    while True:
        try:
            cond.acquire()
            break
        except BaseException as exc:
            pending = pending or exc
    if pending is not None:
        raise pending


def _answer(claims: list[Claimed], runs: list[Run], exhausted: bool, now: float) -> None:
    for i, h in enumerate(claims):
        h.run = runs[i] if i < len(runs) else None
        h.exhausted, h.at, h.answered = exhausted, now, True
