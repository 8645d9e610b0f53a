"""DBOS side of the benchmarks, in its own process (DBOS is a process-wide singleton).

usage: python bench/dbos_side.py DATABASE_URL RUNS [queue|queue3]
  -> prints workflows/s of a 3-step no-op called directly; with `queue`, of a 1-step no-op
     enqueued on a DBOS Queue (concurrency 16) and executed by this process's queue workers;
     with `queue3`, of the 3-step no-op enqueued on a queue of concurrency 8 (all enqueued,
     then every result awaited: DBOS executes while it enqueues).
"""

from __future__ import annotations

import sys
import time

from dbos import DBOS, DBOSConfig


@DBOS.step()
def noop(i: int) -> int:
    return i


@DBOS.workflow()
def one_step() -> int:
    return noop(1)


@DBOS.workflow()
def three_steps() -> int:
    return noop(1) + noop(2) + noop(3)


def main() -> None:
    url, runs = sys.argv[1], int(sys.argv[2])
    config: DBOSConfig = {
        "name": "durable-yaml-bench",
        "system_database_url": url,
        "run_admin_server": False,
    }
    DBOS(config=config)
    DBOS.launch()
    queue = DBOS.register_queue("bench", concurrency=16)
    queue8 = DBOS.register_queue("bench8", concurrency=8)
    mode = sys.argv[3] if len(sys.argv) > 3 else ""
    if mode in ("queue", "queue3"):
        start = time.perf_counter()
        if mode == "queue":
            handles = [queue.enqueue(one_step) for _ in range(runs)]
        else:
            handles = [queue8.enqueue(three_steps) for _ in range(runs)]
        for h in handles:
            h.get_result()
        elapsed = time.perf_counter() - start
        print(f"{runs / elapsed:.1f}")
        DBOS.destroy()
        return
    for _ in range(20):
        three_steps()
    start = time.perf_counter()
    for _ in range(runs):
        three_steps()
    elapsed = time.perf_counter() - start
    print(f"{runs / elapsed:.1f}")
    DBOS.destroy()


if __name__ == "__main__":
    main()
