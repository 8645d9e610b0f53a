"""Operating a million runs, on SQLite and PostgreSQL, measured side by side in one run:

- a tag-filtered runs page (the 50 newest runs with one tag) and the claim of the next queued
  run, median of many, in a database of 1,000 runs and in one of 1,000,000 (99.98% finished;
  200 queued in both), and their ratios (aim <= 2);
- a purge of the 1,000,000 finished runs (each with a step row and a tag): runs/s of the
  first 90% alone and of the rest beside 4 busy claimers, and the database's size before
  and after (SQLite: the file, also after VACUUM; PostgreSQL: the
  dy_* tables with their indexes);
- claim latency of 4 busy claimers (claim, 10 ms of work, release, again) while a purge
  runs beside them, against without (median, p99, max; the test suite checks only the
  purge's correctness, not its timing).

The runs are generated inside the database (generate_series / a recursive CTE): minutes, not
hours. PostgreSQL: `DURABLE_YAML_BENCH_OPS_PG` (default postgresql://postgres@127.0.0.1:5432/
h_ops_bench, created if missing). `BENCH_OPS_RUNS` changes the million; `BENCH_OPS_PURGE=0`
measures the page and the claim only; `BENCH_OPS_ALONE` (default 0.9) is the share purged
before the claimers start.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.models import Lease, RunFilter, RunStatus  # noqa: E402
from engine.service import Engine  # noqa: E402
from engine.settings import resolve_settings  # noqa: E402
from engine.store import schema as t  # noqa: E402

BIG = int(os.environ.get("BENCH_OPS_RUNS", "1000000"))
SMALL = 1000
QUEUED = 200
TAGS = 10  # tenant:0 .. tenant:9, each on a tenth of the runs
FLOWS = ROOT / "bench" / "flows"
BASE = 1_700_000_000.0


def pg_url(
    variable: str = "DURABLE_YAML_BENCH_OPS_PG",
    default: str = "postgresql://postgres@127.0.0.1:5432/h_ops_bench",
) -> str | None:
    """The PostgreSQL URL in `variable` (else `default`), its database created if missing."""
    url = os.environ.get(variable, default)
    server, _, name = url.rpartition("/")
    admin = sa.create_engine(
        server.replace("postgresql://", "postgresql+psycopg://") + "/postgres",
        isolation_level="AUTOCOMMIT",
    )
    try:
        with admin.connect() as c:
            if not c.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).first():
                c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        print(f"PostgreSQL skipped: {str(exc.orig).splitlines()[0]}")
        return None
    finally:
        admin.dispose()
    return url


def fresh(url: str) -> Engine:
    engine = Engine(resolve_settings(db=url, workflows=str(FLOWS)), import_steps=False)
    t.metadata.drop_all(engine.store.engine)
    engine.close()
    engine = Engine(resolve_settings(db=url, workflows=str(FLOWS)), import_steps=False)
    engine.store.migrate()
    engine.store.save_definition("bench-hash", "bench", "1", {}, "")
    return engine


def populate(engine: Engine, n: int, queued: int = QUEUED, base: float = BASE) -> None:
    """n runs, the last `queued` of them queued, the others completed with one step row;
    each with one tag, in dy_runs.tags and dy_run_tags; run i created at `base` + i."""
    pg = engine.store.dialect == "postgresql"
    seq = f"generate_series(1, {n}) AS s(i)" if pg else "seq"
    with_seq = (
        ""
        if pg
        else f"WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < {n}) "
    )
    done = f"i <= {n - queued}"
    rid = "'r' || lpad(i::text, 8, '0')" if pg else "printf('r%08d', i)"
    tag = f"'tenant:' || (i % {TAGS})::text" if pg else f"'tenant:' || (i % {TAGS})"
    json_tags = f"jsonb_build_array({tag})" if pg else f"json_array({tag})"
    empty = "'{}'::jsonb" if pg else "'{}'"
    status = f"CASE WHEN {done} THEN 'completed' ELSE 'queued' END"
    finished = f"CASE WHEN {done} THEN {base} + i + 0.5 ELSE NULL END"
    next_at = f"CASE WHEN {done} THEN NULL ELSE {base} + i END"
    runs = (
        f"{with_seq}INSERT INTO dy_runs (id, workflow_id, version, definition_hash, status, "
        "payload, current_step, queue, priority, trigger, created_at, updated_at, started_at, "
        "finished_at, next_at, tags, step_since) "
        f"SELECT {rid}, 'bench', '1', 'bench-hash', {status}, {empty}, 's', 'bench', 0, "
        f"{empty}, {base} + i, {base} + i, CASE WHEN {done} THEN {base} + i ELSE NULL END, "
        f"{finished}, {next_at}, {json_tags}, {base} + i FROM {seq}"
    )
    tags = (
        f"{with_seq}INSERT INTO dy_run_tags (tag, created_at, run_id) "
        f"SELECT {tag}, {base} + i, {rid} FROM {seq}"
    )
    steps = (
        f"{with_seq}INSERT INTO dy_steps (run_id, step_key, status, attempts, output, "
        f"started_at, finished_at) SELECT {rid}, 's', 'completed', 1, {empty}, {base} + i, "
        f"{base} + i + 0.5 FROM {seq} WHERE {done}"
    )
    with engine.store.engine.begin() as c:
        for statement in (runs, tags, steps):
            c.execute(sa.text(statement))
    with engine.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text("ANALYZE"))


def median_ms(fn: object, times: int) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def measure(engine: Engine) -> tuple[float, float]:
    """(a tag-filtered page, a claim) in ms, medians."""
    f = RunFilter(tags=("tenant:3",))
    assert len(engine.list_runs(f, 50)) == 50
    page = median_ms(lambda: engine.list_runs(f, 50), 60)
    store = engine.store
    lease = Lease("bench/0", "bench", os.getpid(), 3600)
    now = BASE + 10 * BIG
    claimed: list[str] = []

    def claim() -> None:
        run = store.claim_next_run(lease, now)
        assert run is not None
        claimed.append(run.id)

    claim_ms = median_ms(claim, 60)
    for run_id in claimed:  # back in the queue: the database is as it was
        store.release(run_id, lease, now)
    return page, claim_ms


def size(engine: Engine, url: str) -> int:
    if engine.store.dialect == "postgresql":
        with engine.store.engine.connect() as c:
            return int(
                c.execute(
                    sa.text(
                        "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE c.relkind = 'r' AND c.relname LIKE 'dy\\_%' "
                        "AND n.nspname = current_schema()"
                    )
                ).scalar_one()
            )
    path = Path(url.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.stat().st_size


def latencies_beside(engine: Engine, busy: threading.Event | None, seconds: float) -> list[float]:
    """4 claimers claiming and releasing for `seconds` (or while `busy` is set)."""
    store = engine.store
    out: list[float] = []
    stop = threading.Event()

    def claimer(i: int) -> None:
        lease = Lease(f"lat/{i}", "bench", os.getpid(), 3600)
        while not stop.is_set():
            start = time.perf_counter()
            run = store.claim_next_run(lease, BASE + 10 * BIG)
            out.append((time.perf_counter() - start) * 1000)
            if run is not None:
                time.sleep(0.01)  # a busy worker: its step runs, then the next claim
                store.release(run.id, lease, BASE + 10 * BIG)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    if busy is None:
        time.sleep(seconds)
    else:
        while busy.is_set():
            time.sleep(0.05)
    stop.set()
    for th in threads:
        th.join()
    return out


def bench(name: str, url_small: str, url_big: str) -> None:
    small = fresh(url_small)
    populate(small, SMALL)
    page_s, claim_s = measure(small)
    small.close()
    big = fresh(url_big)
    started = time.perf_counter()
    populate(big, BIG)
    print(f"{name}: {BIG:,} runs generated in {time.perf_counter() - started:.0f} s")
    page_b, claim_b = measure(big)
    print(
        f"{name}: tag page {page_s:.2f} ms at {SMALL:,} runs, {page_b:.2f} ms at {BIG:,}: "
        f"ratio {page_b / page_s:.2f}"
    )
    print(
        f"{name}: claim {claim_s:.2f} ms at {SMALL:,} runs, {claim_b:.2f} ms at {BIG:,}: "
        f"ratio {claim_b / claim_s:.2f}"
    )
    if os.environ.get("BENCH_OPS_PURGE", "1") == "0":  # the page and claim ratios only
        big.close()
        return
    before = size(big, url_big)
    quiet = latencies_beside(big, None, 3.0)
    # The first 90% alone (the purge's own rate), the rest beside 4 busy claimers, which
    # take SQLite's one write lock most of the time and so slow the purge down on purpose.
    alone_before = BASE + float(os.environ.get("BENCH_OPS_ALONE", "0.9")) * BIG
    started = time.perf_counter()
    alone = big.purge(big.store.now() - alone_before, [RunStatus.COMPLETED])
    alone_took = time.perf_counter() - started
    busy = threading.Event()
    busy.set()
    lat: list[float] = []
    side = threading.Thread(target=lambda: lat.extend(latencies_beside(big, busy, 0)))
    side.start()
    started = time.perf_counter()
    beside = big.purge(0.0, [RunStatus.COMPLETED])
    took = time.perf_counter() - started
    busy.clear()
    side.join()
    after = size(big, url_big)
    print(
        f"{name}: purged {alone:,} runs alone in {alone_took:.0f} s "
        f"({alone / alone_took:,.0f} runs/s), then {beside:,} beside 4 busy claimers in "
        f"{took:.0f} s ({beside / took:,.0f} runs/s); "
        f"size {before / 1e6:,.0f} MB before, {after / 1e6:,.0f} MB after"
    )
    if big.store.dialect == "sqlite":
        with sqlite3.connect(Path(url_big.removeprefix("sqlite:///"))) as raw:
            raw.execute("VACUUM")
        print(f"{name}: after VACUUM {size(big, url_big) / 1e6:,.1f} MB")
    for label, xs in (("without a purge", quiet), ("beside the purge", lat)):
        xs = sorted(xs)
        p99 = xs[int(len(xs) * 0.99)] if xs else float("nan")
        print(
            f"{name}: claim latency of 4 claimers {label}: median {statistics.median(xs):.1f} ms, "
            f"p99 {p99:.1f} ms, max {xs[-1]:.1f} ms ({len(xs):,} claims)"
        )
    left = big.count_runs(RunFilter())
    print(f"{name}: {left} runs left (the queued ones)")
    big.close()


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-ops-"))
    which = sys.argv[1:] or ["sqlite", "postgresql"]
    if "sqlite" in which:
        bench("SQLite", f"sqlite:///{folder}/small.db", f"sqlite:///{folder}/big.db")
    if "postgresql" in which:
        url = pg_url()
        if url is not None:
            bench("PostgreSQL", url, url)


if __name__ == "__main__":
    main()
