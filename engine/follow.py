"""Following a run's log lines while it runs (`runs logs --follow`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .models import LogEntry

if TYPE_CHECKING:
    from .store import Store  # the store (and SQLAlchemy) only where one is passed in

__all__ = ["follow_logs"]

POLL_SECONDS = 0.5
BATCH = 1000


def follow_logs(
    store: Store,
    run_id: str,
    *,
    after: int = 0,
    poll: float = POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[LogEntry]:
    """Every log line of the run after id `after`, as they are written, until the run has
    finished and its last line was yielded. Each look is one read of the run row and one of
    its logs after the last id; a run's lines commit in id order (each write of them locks
    the run's row first), so none is skipped. NotFound if the run does not exist."""
    while True:
        finished = store.get_run(run_id).finished  # before the logs: its last lines are in
        entries = store.get_logs(run_id, after, BATCH)
        yield from entries
        if entries:
            after = entries[-1].id
        if len(entries) == BATCH:
            continue
        if finished:
            return
        sleep(poll)
