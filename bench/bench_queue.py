"""Queues and workers, measured side by side in one run, on SQLite and PostgreSQL:

- throughput: runs/s of a 1-step no-op workflow with 1, 2 and 4 worker processes
  (first start to last finish, from the database's own timestamps);
- start latency: send -> first step running, p50 and p99, one idle worker;
- claim cost: median time of one claim_next_run with 1,000 and with 100,000 queued runs,
  and their ratio (aim <= 1.5);
- DBOS queues and Procrastinate (if installed, `pip install -e '.[bench]'`): the same no-op
  enqueued first, then run by one process of each (Procrastinate: PostgreSQL only).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_durable import pg_urls  # noqa: E402
from engine.models import NewRun  # noqa: E402
from engine.runner import new_lease, new_run_id  # noqa: E402
from engine.service import Engine  # noqa: E402
from engine.settings import resolve_settings  # noqa: E402
from engine.store import schema as t  # noqa: E402
from engine.store.events import new_run_values  # noqa: E402

FLOWS = ROOT / "bench" / "flows"
RUNS = int(os.environ.get("BENCH_QUEUE_RUNS", "400"))


def reset(url: str) -> Engine:
    engine = Engine(resolve_settings(db=url, workflows=str(FLOWS)), import_steps=False)
    t.metadata.drop_all(engine.store.engine)
    engine.close()
    engine = Engine(resolve_settings(db=url, workflows=str(FLOWS)), import_steps=False)
    engine.save_all_definitions()
    return engine


def workers(url: str, n: int) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "DURABLE_YAML_DB": url,
        "DURABLE_YAML_MODULES": "benchsteps",
        "DURABLE_YAML_WORKFLOWS": str(FLOWS),
        "PYTHONPATH": f"{ROOT}:{FLOWS}",
    }
    return [
        subprocess.Popen(
            [sys.executable, "-m", "engine", "worker", "--concurrency", "4", "--no-schedules"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


def finished(engine: Engine) -> int:
    with engine.store.engine.connect() as c:
        return int(
            c.execute(
                sa.select(sa.func.count()).select_from(t.runs).where(t.runs.c.status == "completed")
            ).scalar_one()
        )


def throughput(url: str, n_workers: int) -> float:
    engine = reset(url)
    for i in range(RUNS):
        engine.send_event("bench.go", {"i": i})
    procs = workers(url, n_workers)
    try:
        deadline = time.time() + 300
        while finished(engine) < RUNS and time.time() < deadline:
            time.sleep(0.2)
    finally:
        stop(procs)
    with engine.store.engine.connect() as c:
        first, last = c.execute(
            sa.select(sa.func.min(t.runs.c.started_at), sa.func.max(t.runs.c.finished_at))
        ).one()
    engine.close()
    return RUNS / (last - first)


def latency(url: str, sends: int = 60) -> tuple[float, float]:
    engine = reset(url)
    procs = workers(url, 1)
    try:
        time.sleep(2.0)
        for i in range(sends):
            engine.send_event("bench.go", {"i": i})
            time.sleep(0.03)
        deadline = time.time() + 60
        while finished(engine) < sends and time.time() < deadline:
            time.sleep(0.1)
    finally:
        stop(procs)
    with engine.store.engine.connect() as c:
        rows = c.execute(sa.select(t.runs.c.created_at, t.runs.c.started_at)).all()
    engine.close()
    waits = sorted((s - c) * 1000 for c, s in rows)
    return statistics.median(waits), waits[min(len(waits) - 1, int(len(waits) * 0.99))]


def claim_cost(url: str, queued: int, claims: int = 200) -> float:
    engine = reset(url)
    machine = engine.workflow("noop1")
    now = time.time()
    batch = []
    with engine.store.engine.begin() as c:
        for i in range(queued):
            batch.append(
                new_run_values(
                    NewRun(
                        id=new_run_id() + f"{i:08d}"[:0],
                        workflow_id="noop1",
                        version="1",
                        definition_hash=machine.content_hash,
                        payload={"i": i},
                        first_step="a",
                        queue=machine.queue.name,
                    ),
                    now - 1000 + i * 1e-3,
                )
            )
            if len(batch) == 5000:
                c.execute(sa.insert(t.runs), batch)
                batch = []
        if batch:
            c.execute(sa.insert(t.runs), batch)
    if engine.store.dialect == "postgresql":
        with engine.store.engine.connect() as c:
            c.execute(sa.text("ANALYZE dy_runs"))
            c.commit()
    lease = new_lease()
    samples = []
    for _ in range(claims):
        start = time.perf_counter()
        run = engine.store.claim_next_run(lease, time.time())
        samples.append(time.perf_counter() - start)
        assert run is not None
    engine.close()
    return statistics.median(samples) * 1000


def dbos_queue_rate(url: str, runs: int) -> float | None:
    if importlib.util.find_spec("dbos") is None:
        return None
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dbos_side.py"), url, str(runs), "queue"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        print("DBOS failed:", (out.stderr.strip().splitlines() or ["?"])[-1])
        return None
    return float(out.stdout.strip().splitlines()[-1])


def idle_cpu(url: str, seconds: float = 10.0) -> float:
    """CPU used by an idle worker (no runs), as a percentage of one core."""
    reset(url).close()
    (proc,) = workers(url, 1)
    try:
        time.sleep(3.0)  # start-up
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        before = cpu()
        time.sleep(seconds)
        return (cpu() - before) / seconds * 100
    finally:
        stop([proc])


def procrastinate_rate(db_url: str, jobs: int) -> float | None:
    if importlib.util.find_spec("procrastinate") is None:
        return None
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "procrastinate_side.py"), db_url, str(jobs)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        print("Procrastinate failed:", (out.stderr.strip().splitlines() or ["?"])[-1])
        return None
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="dy-bench-"))
    backends = [("sqlite", f"sqlite:///{folder}/queue.db", f"sqlite:///{folder}/dbos.sqlite")]
    pg = pg_urls()
    if pg:
        backends.append(("postgresql", pg[0], pg[1]))
    print(f"{RUNS} queued runs of a 1-step no-op workflow; workers with --concurrency 4\n")
    for name, url, dbos_url in backends:
        rates = {n: throughput(url, n) for n in (1, 2, 4)}
        p50, p99 = latency(url)
        small, large = claim_cost(url, 1_000), claim_cost(url, 100_000)
        idle = idle_cpu(url)
        dbos = dbos_queue_rate(dbos_url, RUNS)
        procrastinate = None
        if name == "postgresql":
            procrastinate = procrastinate_rate(url.replace("+psycopg", ""), RUNS)
        print(f"[{name}]")
        print(
            "  runs/s   1 worker {:.0f} | 2 workers {:.0f} | 4 workers {:.0f}".format(
                *rates.values()
            )
        )
        print(f"  start latency (send -> first step running)  p50 {p50:.1f} ms  p99 {p99:.1f} ms")
        print(f"  idle worker (4 executors, no runs): {idle:.2f}% of one core")
        print(
            f"  claim cost  1,000 queued {small:.2f} ms | 100,000 queued {large:.2f} ms | "
            f"ratio {large / small:.2f}"
        )
        if dbos is not None:
            best = max(rates.values())
            print(
                f"  DBOS queue (1 process) {dbos:.0f} workflows/s | durable-yaml best {best:.0f} "
                f"runs/s | ratio {best / dbos:.2f}x"
            )
        if procrastinate is not None:
            one = rates[1]
            print(
                f"  Procrastinate (1 process, concurrency 4) {procrastinate:.0f} jobs/s | "
                f"durable-yaml 1 worker {one:.0f} durable runs/s | ratio {one / procrastinate:.2f}x"
            )
        print()


if __name__ == "__main__":
    main()
