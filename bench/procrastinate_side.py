"""Procrastinate side of the queue benchmark, in its own process and database.

usage: python bench/procrastinate_side.py POSTGRES_DATABASE_URL JOBS [CONCURRENCY [MODE]]
  both (the default MODE) -> prints jobs/s: JOBS no-op jobs deferred first, then one worker
     (concurrency 4 unless given) until empty (its start included; Procrastinate already
     imported and its connection open);
  enqueue -> the schema made anew, JOBS jobs deferred, nothing printed;
  consume -> one worker in this fresh process until the queue is empty; prints the
     wall-clock time (time.time()) at its end, so the caller times it from this process's
     start, as it times a `durable-yaml worker` (imports included).
Its tables live in the schema `procrastinate_bench` of that database, made anew by `both`
and `enqueue` (nothing else in the database is touched).
"""

from __future__ import annotations

import asyncio
import sys
import time

import procrastinate
import psycopg

URL, JOBS = sys.argv[1], int(sys.argv[2])
CONCURRENCY = int(sys.argv[3]) if len(sys.argv) > 3 else 4
MODE = sys.argv[4] if len(sys.argv) > 4 else "both"
SCHEMA = "procrastinate_bench"

if MODE in ("both", "enqueue"):
    with psycopg.connect(URL, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        admin.execute(f"CREATE SCHEMA {SCHEMA}")

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(
        conninfo=URL, kwargs={"options": f"-c search_path={SCHEMA}"}
    )
)


@app.task(queue="bench")
def noop(i: int) -> int:
    return i


async def main() -> None:
    async with app.open_async():
        if MODE != "consume":
            await app.schema_manager.apply_schema_async()
            for i in range(JOBS):
                await noop.defer_async(i=i)
            if MODE == "enqueue":
                return
        start = time.perf_counter()
        await app.run_worker_async(
            queues=["bench"], wait=False, concurrency=CONCURRENCY, install_signal_handlers=False
        )
        elapsed = time.perf_counter() - start
    if MODE == "consume":
        print(f"{time.time():.4f}")
    else:
        print(f"{JOBS / elapsed:.1f}")


asyncio.run(main())
