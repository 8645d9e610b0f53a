"""Huey side of the table benchmark (bench_table.py), in its own process.

usage: python bench/huey_side.py SQLITE_FILE TASKS
  -> prints tasks/s: TASKS no-op tasks enqueued in a SqliteHuey first, then a consumer with 8
     worker threads in this process until every result is stored (start-up included)
"""

from __future__ import annotations

import os
import sys
import time

from huey import SqliteHuey

PATH, TASKS = sys.argv[1], int(sys.argv[2])
for suffix in ("", "-wal", "-shm"):
    if os.path.exists(PATH + suffix):
        os.remove(PATH + suffix)
huey = SqliteHuey("bench", filename=PATH)


@huey.task()
def noop(i: int) -> int:
    return i


def main() -> None:
    for i in range(TASKS):
        noop(i)
    start = time.perf_counter()
    consumer = huey.create_consumer(workers=8, worker_type="thread", periodic=False)
    consumer.start()
    while huey.result_count() < TASKS:
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    consumer.stop(graceful=True)
    print(f"{TASKS / elapsed:.1f}")


if __name__ == "__main__":
    main()
