"""Idle worker CPU with a full queue, on SQLite and PostgreSQL (issue #10, cause 7).

One `durable-yaml worker --concurrency 8` process; a queue with `concurrency: 1` whose one
run executes a long step, and 20 runs queued behind it. Seven executors have nothing they
may claim: they must sleep until something can change, not spin. Measured: the worker
process's CPU (user + system, /proc) over five 4-second windows after start-up, as a
fraction of one core (median and max), and on PostgreSQL the transactions committed per
second in the whole database meanwhile. The aim: median <= 1% of a core.

    python bench/bench_idle.py [POSTGRES_URL]     (default: $DURABLE_YAML_TEST_PG, if set)
"""

from __future__ import annotations

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

from engine.service import Engine  # noqa: E402
from engine.settings import resolve_settings  # noqa: E402
from engine.store import schema as t  # noqa: E402
from engine.store.sql import normalise_url  # noqa: E402

WORKFLOW = """
id: hold
version: "1"
trigger: {event: bench.hold}
queue: {name: one-at-a-time, concurrency: 1}
steps:
  - {id: long, call: bench.long}
"""
STEPS = """
import time
from engine import step

@step("bench.long")
def long() -> None:
    time.sleep(600)
"""
WINDOWS, WINDOW_SECONDS = 5, 4.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commits(engine: Engine) -> int | None:
    if engine.store.dialect != "postgresql":
        return None
    with engine.store.engine.connect() as c:
        return int(
            c.execute(
                sa.text(
                    "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
                )
            ).scalar_one()
        )


def measure(url: str, folder: Path) -> tuple[list[float], float | None]:
    (folder / "workflows").mkdir(parents=True)
    (folder / "workflows" / "hold.yaml").write_text(WORKFLOW)
    (folder / "idlesteps.py").write_text(STEPS)
    engine = Engine(
        resolve_settings(db=url, workflows=str(folder / "workflows")), import_steps=False
    )
    t.metadata.drop_all(engine.store.engine)
    engine.close()
    engine = Engine(
        resolve_settings(db=url, workflows=str(folder / "workflows")), import_steps=False
    )
    engine.save_all_definitions()
    for i in range(21):
        engine.send_event("bench.hold", {"i": i})
    env = {
        **os.environ,
        "DURABLE_YAML_DB": url,
        "DURABLE_YAML_MODULES": "idlesteps",
        "DURABLE_YAML_WORKFLOWS": str(folder / "workflows"),
        "PYTHONPATH": f"{ROOT}:{folder}",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "engine", "worker", "--concurrency", "8", "--grace", "1"],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            with engine.store.engine.connect() as c:
                running = c.execute(
                    sa.select(sa.func.count())
                    .select_from(t.runs)
                    .where(t.runs.c.status == "running")
                ).scalar_one()
            if running:
                break
            time.sleep(0.2)
        time.sleep(3.0)  # start-up done: imports, first claims
        ratios = []
        first_commits, started = commits(engine), time.time()
        for _ in range(WINDOWS):
            before = cpu_seconds(worker.pid)
            time.sleep(WINDOW_SECONDS)
            ratios.append((cpu_seconds(worker.pid) - before) / WINDOW_SECONDS)
        last_commits = commits(engine)
        rate = (
            None
            if first_commits is None or last_commits is None
            else (last_commits - first_commits) / (time.time() - started)
        )
        with engine.store.engine.connect() as c:
            statuses = dict(
                c.execute(
                    sa.select(t.runs.c.status, sa.func.count()).group_by(t.runs.c.status)
                ).all()
            )
        assert statuses == {"running": 1, "queued": 20}, statuses
        return ratios, rate
    finally:
        worker.terminate()
        worker.wait(30)
        engine.close()


def main() -> None:
    pg = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DURABLE_YAML_TEST_PG")
    folder = Path(tempfile.mkdtemp(prefix="dy-bench-idle-"))
    backends = [("sqlite", f"sqlite:///{folder}/idle.db")]
    if pg:
        backends.append(("postgresql", normalise_url(pg)))
    print("one worker, --concurrency 8; 1 run executing a long step in a concurrency-1 queue,")
    print(f"20 queued behind it; CPU over {WINDOWS} windows of {WINDOW_SECONDS:.0f} s\n")
    worst = 0.0
    for name, url in backends:
        ratios, rate = measure(url, folder / name)
        median = statistics.median(ratios)
        worst = max(worst, median)
        line = (
            f"[{name}] idle worker CPU: median {median * 100:.2f}% of one core "
            f"(max {max(ratios) * 100:.2f}%; windows "
            + ", ".join(f"{r * 100:.2f}" for r in ratios)
            + ")"
        )
        if rate is not None:
            line += f"; database commits {rate:.1f}/s"
        print(line)
    print(f"\naim: median <= 1% of a core: {'met' if worst <= 0.01 else 'NOT MET'}")


if __name__ == "__main__":
    main()
