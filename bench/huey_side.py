"""Huey side of the table benchmark (bench_table.py), in its own process.

usage: python bench/huey_side.py SQLITE_FILE TASKS [both|enqueue|consume]
  both (the default) -> prints tasks/s: TASKS no-op tasks enqueued in a SqliteHuey first,
     then a consumer with 8 worker threads in this process until every result is stored
     (its start included; Huey already imported);
  enqueue -> the file made anew, TASKS tasks enqueued, nothing printed;
  consume -> a consumer started in this fresh process until every result is stored; prints
     the wall-clock time (time.time()) at which they were, so the caller times it from this
     process's start, as it times a `durable-yaml worker` (imports included).
"""

from __future__ import annotations

import os
import sys
import time

from huey import SqliteHuey

PATH, TASKS = sys.argv[1], int(sys.argv[2])
MODE = sys.argv[3] if len(sys.argv) > 3 else "both"
if MODE in ("both", "enqueue"):
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(PATH + suffix):
            os.remove(PATH + suffix)
huey = SqliteHuey("bench", filename=PATH)


@huey.task()
def noop(i: int) -> int:
    return i


def consume() -> None:
    consumer = huey.create_consumer(workers=8, worker_type="thread", periodic=False)
    consumer.start()
    while huey.result_count() < TASKS:
        time.sleep(0.01)
    consumer.stop(graceful=True)


def main() -> None:
    if MODE == "consume":
        consume()
        print(f"{time.time():.4f}")
        return
    for i in range(TASKS):
        noop(i)
    if MODE == "enqueue":
        return
    start = time.perf_counter()
    consume()
    print(f"{TASKS / (time.perf_counter() - start):.1f}")


if __name__ == "__main__":
    main()
