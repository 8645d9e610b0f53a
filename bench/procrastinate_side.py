"""Procrastinate side of the queue benchmark, in its own process and database.

usage: python bench/procrastinate_side.py POSTGRES_BASE_URL JOBS
  -> prints jobs/s: JOBS no-op jobs deferred first, then one worker (concurrency 4) until empty
"""

from __future__ import annotations

import asyncio
import sys
import time

import procrastinate
import psycopg

BASE, JOBS = sys.argv[1].rstrip("/") + "/", int(sys.argv[2])
DB = "procrastinate_bench"

with psycopg.connect(BASE + "test", autocommit=True) as admin:
    admin.execute(f"DROP DATABASE IF EXISTS {DB}")
    admin.execute(f"CREATE DATABASE {DB}")

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=BASE + DB))


@app.task(queue="bench")
def noop(i: int) -> int:
    return i


async def main() -> None:
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        for i in range(JOBS):
            await noop.defer_async(i=i)
        start = time.perf_counter()
        await app.run_worker_async(
            queues=["bench"], wait=False, concurrency=4, install_signal_handlers=False
        )
        elapsed = time.perf_counter() - start
    print(f"{JOBS / elapsed:.1f}")


asyncio.run(main())
