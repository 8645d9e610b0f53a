"""Operating many runs through the engine: search, bulk cancel and replay, queue pause,
`blocked_by`, retention. The CLI, the API and the dashboard call these; the store does the
locking (see engine/store/control.py, search.py, retention.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .inputs import InputInvalid, TooLong, check_text
from .models import ACTIVE_STATUSES, FINISHED_STATUSES, Run, RunFilter, RunStatus

if TYPE_CHECKING:
    from .store import SqlStore

__all__ = ["BATCH", "TAGS_MAX", "TAG_MAX", "Operations", "check_tags", "check_ttl"]

BATCH = 500  # runs per bulk transaction
IDS_PER_QUERY = 10_000  # ids in one IN list (PostgreSQL takes at most 65,535 parameters)
TAG_MAX = 200  # characters in one "key:value" tag
TAGS_MAX = 20  # tags on one run
Progress = Callable[[int, int], None]  # (done so far, total)


def check_tags(tags: Iterable[Any] | None, field: str = "tags") -> tuple[str, ...]:
    """Tags as given by a user: a list of "key:value" strings, a key before the colon."""
    if tags is None:
        return ()
    if isinstance(tags, str | bytes) or not isinstance(tags, list | tuple):
        raise InputInvalid(field, 'must be a list of "key:value" strings')
    out: list[str] = []
    for i, tag in enumerate(tags):
        where = f"{field}[{i}]"
        check_text(tag, where, TAG_MAX)
        key, colon, _ = tag.partition(":")
        if not colon or not key.strip():
            raise InputInvalid(where, f'{tag!r} is not "key:value" (a key, a colon, a value)')
        out.append(tag)
    if len(set(out)) > TAGS_MAX:
        raise TooLong(field, f"at most {TAGS_MAX} tags per run, got {len(set(out))}")
    return tuple(dict.fromkeys(out))


def check_ttl(ttl: float | None, field: str = "ttl") -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < 10 * 365 * 86400:
        raise InputInvalid(field, "must be a positive duration (at most 10 years)")
    return float(ttl)


class Operations:
    """Mixed into `Engine` (which provides `store`, `catalog` and `queue_replay`)."""

    @property
    def store(self) -> SqlStore:  # Engine implements
        raise NotImplementedError

    def list_runs(
        self, filter: RunFilter, limit: int = 50, before: tuple[float, str] | None = None
    ) -> list[Run]:
        """Runs matching `filter` (all its fields), newest first, after the cursor `before`."""
        _check_filter(filter)
        return self.store.search_runs(filter, limit, before)

    def count_runs(self, filter: RunFilter) -> int:
        _check_filter(filter)
        return sum(self.store.count_runs(f) for f in _by_ids(filter))

    def count_cancellable(self, filter: RunFilter) -> int:
        """How many runs `cancel_runs(filter)` would cancel now (the active ones)."""
        _check_filter(filter)
        active = _active_only(filter)
        return 0 if active is None else sum(self.store.count_runs(f) for f in _by_ids(active))

    def cancel_runs(self, filter: RunFilter, progress: Progress | None = None) -> int:
        """Cancel every active run matching `filter`, `BATCH` per transaction; how many were
        cancelled (or, executing, asked to stop at their next step). None twice: a run
        cancelled by a concurrent call is counted by that one."""
        _check_filter(filter)
        active = _active_only(filter)
        if active is None:
            return 0
        total = self.count_cancellable(filter)
        done = 0
        for part in _by_ids(active):
            for ids in self.store.run_id_batches(part, BATCH):
                done += self.store.cancel_runs_batch(ids, self.store.now())
                if progress is not None:
                    progress(done, total)
        return done

    def replay_runs(self, filter: RunFilter, progress: Progress | None = None) -> list[str]:
        """Queue a replay (a new run, same payload) of every run matching `filter`; the new
        runs' ids, in the order of the originals (newest first; with more than
        `IDS_PER_QUERY` ids, newest first within each slice of them)."""
        total = self.count_runs(filter)
        out: list[str] = []
        for part in _by_ids(filter):
            for ids in self.store.run_id_batches(part, BATCH):
                out += self.queue_replays(ids)
                if progress is not None:
                    progress(len(out), total)
        return out

    def queue_replays(self, run_ids: Sequence[str]) -> list[str]:  # Engine implements
        raise NotImplementedError

    def pause_queue(self, name: str) -> None:
        """No run of the queue starts from when this returns until it is resumed."""
        self.store.set_queue_paused(name, True, self.store.now())

    def resume_queue(self, name: str) -> None:
        self.store.set_queue_paused(name, False, self.store.now())

    def blocked_by(self, run: Run) -> dict[str, Any] | None:
        """Why a queued run has not started ({reason, detail}), or None."""
        return self.store.blocked_by(run, self.store.now())

    def purge(
        self,
        older_than_s: float,
        statuses: Sequence[RunStatus] = FINISHED_STATUSES,
        progress: Progress | None = None,
        stopping: threading.Event | None = None,
    ) -> int:
        """Delete runs of `statuses` finished more than `older_than_s` ago, and all that
        hangs off them; how many runs went. Once `stopping` is set (a worker asked to stop)
        no further batch starts: the rest waits for the next purge."""
        stopping = stopping or threading.Event()
        _check_finished(statuses)
        before = self.store.now() - older_than_s
        keep = self._current_hashes()
        total = self.store.count_purgeable(before, statuses) if progress is not None else 0
        done = 0
        batches = self.store.purge_runs(before, statuses, keep)
        while not stopping.is_set():
            started = time.monotonic()
            n = next(batches, 0)
            if not n:
                return done
            done += n
            if progress is not None:
                progress(done, max(total, done))
            # as long again between batches: claimers waiting for the lock (SQLite's one
            # writer, PostgreSQL's I/O) get it between two batches, however many there are
            stopping.wait(min(0.5, time.monotonic() - started))
        return done

    def count_purgeable(
        self, older_than_s: float, statuses: Sequence[RunStatus] = FINISHED_STATUSES
    ) -> int:
        _check_finished(statuses)
        return self.store.count_purgeable(self.store.now() - older_than_s, statuses)

    def purge_by_retention(
        self, retention: dict[RunStatus, float], stopping: threading.Event | None = None
    ) -> int:
        """What workers do once a minute: each status by its own retention."""
        return sum(
            self.purge(seconds, [status], stopping=stopping)
            for status, seconds in retention.items()
        )

    def _current_hashes(self) -> set[str]:  # Engine implements
        return set()


def _by_ids(f: RunFilter) -> list[RunFilter]:
    """`f` as filters of at most `IDS_PER_QUERY` distinct ids each (one if it has fewer):
    a long list in one IN was a database error on PostgreSQL."""
    if len(f.ids) <= IDS_PER_QUERY:
        return [f]
    ids = tuple(dict.fromkeys(f.ids))
    return [replace(f, ids=ids[i : i + IDS_PER_QUERY]) for i in range(0, len(ids), IDS_PER_QUERY)]


def _active_only(f: RunFilter) -> RunFilter | None:
    """`f` narrowed to active runs (only they can be cancelled); None if it asks for none."""
    statuses = tuple(s for s in (f.statuses or ACTIVE_STATUSES) if s in ACTIVE_STATUSES)
    return replace(f, statuses=statuses) if statuses else None


def _check_filter(f: RunFilter) -> None:
    check_tags(list(f.tags), "tag")
    if f.since is not None and f.until is not None and f.until <= f.since:
        raise InputInvalid("until", "must be later than since")


def _check_finished(statuses: Sequence[RunStatus]) -> None:
    for s in statuses:
        if s not in FINISHED_STATUSES:
            names = ", ".join(x.value for x in FINISHED_STATUSES)
            raise InputInvalid(
                "status", f"{s.value} runs are not finished: only {names} are purged"
            )
