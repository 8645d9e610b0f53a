"""Durable steps per second, side by side in one run, on SQLite and on PostgreSQL.

- ceiling: a single-row INSERT + COMMIT per iteration through SQLAlchemy on the same database
  (same engine settings: SQLite in WAL mode with synchronous=FULL);
- durable-yaml: a 3-step no-op workflow driven by the runner; durable steps/s and commits
  (transactions: explicit COMMITs and autocommit statements) per step;
- DBOS (if installed: `pip install -e '.[bench]'`): the same 3-step workflow, workflows/s.

Medians of 3 rounds. Aims: engine steps/s >= 0.5 x ceiling; engine workflows/s >= 3 x DBOS.
PostgreSQL: $DURABLE_YAML_BENCH_PG or postgresql://postgres@127.0.0.1:5432/ (databases
durable_yaml_bench and dbos_bench are created if missing).
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

from dsl import load_workflow  # noqa: E402
from engine import step  # noqa: E402
from engine.runner import Runner  # noqa: E402
from engine.store import SqlStore, open_store  # noqa: E402
from engine.store.sqlutil import TransactionCounter  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "300"))
ROUNDS = 3
WORKFLOW = """id: noop3
version: "1"
trigger: {manual: true}
steps:
  - {id: a, call: bench.noop, with: {i: 1}}
  - {id: b, call: bench.noop, with: {i: 2}}
  - {id: c, call: bench.noop, with: {i: 3}}
"""


@step("bench.noop")
def noop(i: int) -> int:
    return i


def pg_urls() -> tuple[str, str] | None:
    base = os.environ.get("DURABLE_YAML_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/")
    admin = sa.create_engine(
        base.replace("postgresql://", "postgresql+psycopg://") + "test",
        isolation_level="AUTOCOMMIT",
    )
    try:
        with admin.connect() as c:
            for name in ("durable_yaml_bench", "dbos_bench"):
                exists = c.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
                ).first()
                if not exists:
                    c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        print(f"PostgreSQL skipped: {str(exc.orig).splitlines()[0]}")
        return None
    finally:
        admin.dispose()
    return base + "durable_yaml_bench", base + "dbos_bench"


def ceiling(store: SqlStore, n: int) -> float:
    meta = sa.MetaData()
    table = sa.Table(
        "bench_ceiling",
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", sa.Text),
    )
    meta.drop_all(store.engine)
    meta.create_all(store.engine)
    start = time.perf_counter()
    for i in range(n):
        with store.engine.begin() as c:
            c.execute(sa.insert(table).values(value=f"row {i}"))
    elapsed = time.perf_counter() - start
    meta.drop_all(store.engine)
    return n / elapsed


def engine_rate(store: SqlStore, runs: int, folder: Path) -> tuple[float, float]:
    """(durable steps per second, commits per step)."""
    (folder / "noop3.yaml").write_text(WORKFLOW)
    machine = load_workflow(folder / "noop3.yaml")
    runner = Runner(store)
    for _ in range(10):
        runner.start(machine, {})
    counter = TransactionCounter(store.db)  # COMMITs and autocommit statements
    start = time.perf_counter()
    for _ in range(runs):
        run = runner.start(machine, {})
        assert run.output == 3
    elapsed = time.perf_counter() - start
    counter.close()
    steps = runs * 3
    return steps / elapsed, counter.count / steps


def dbos_rate(url: str, runs: int) -> float | None:
    if importlib.util.find_spec("dbos") is None:
        return None
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dbos_side.py"), url, str(runs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        print(
            f"DBOS failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}"
        )
        return None
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="dy-bench-"))
    backends = [("sqlite", f"sqlite:///{folder}/bench.db", f"sqlite:///{folder}/dbos.sqlite")]
    pg = pg_urls()
    if pg:
        backends.append(("postgresql", pg[0], pg[1]))
    print(f"{RUNS} runs of a 3-step no-op workflow per round, median of {ROUNDS} rounds\n")
    header = (
        f"{'backend':<11} {'ceiling ins+commit/s':>21} {'engine steps/s':>15} {'ratio':>6} "
        f"{'commits/step':>13} {'engine wf/s':>12} {'DBOS wf/s':>10} {'vs DBOS':>8}"
    )
    print(header)
    for name, url, dbos_url in backends:
        store = open_store(url)
        ceilings, steps, commits, dbos = [], [], [], []
        for _ in range(ROUNDS):
            ceilings.append(ceiling(store, RUNS))
            rate, per_step = engine_rate(store, RUNS, folder)
            steps.append(rate)
            commits.append(per_step)
            d = dbos_rate(dbos_url, RUNS)
            if d is not None:
                dbos.append(d)
        store.close()
        c, s = statistics.median(ceilings), statistics.median(steps)
        wf = s / 3
        d_text, vs = ("n/a", "n/a")
        if dbos:
            d = statistics.median(dbos)
            d_text, vs = f"{d:.0f}", f"{wf / d:.2f}x"
        print(
            f"{name:<11} {c:>21.0f} {s:>15.0f} {s / c:>6.2f} {statistics.median(commits):>13.2f} "
            f"{wf:>12.0f} {d_text:>10} {vs:>8}"
        )


if __name__ == "__main__":
    main()
