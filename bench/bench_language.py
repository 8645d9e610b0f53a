"""Fan-out cost: a 1,000-item `for_each` with `run_workflow` and a 50-branch `parallel`.

Each is started by a worker-style runner and driven to the end by executor threads that
claim due runs (`claim_next_run`, as `durable-yaml worker` does); the child runs and branch
runs are real durable runs. Printed: wall time, runs/s, and transactions per item
(explicit COMMITs and autocommit statements, counted with a SQLAlchemy event), on SQLite
and on PostgreSQL ($DURABLE_YAML_BENCH_PG: a database URL; skipped when unset).

    python bench/bench_language.py        # BENCH_ITEMS=1000 BENCH_BRANCHES=50 BENCH_THREADS=4
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import step  # noqa: E402
from engine.models import Run  # noqa: E402
from engine.runner import Runner, new_lease  # noqa: E402
from engine.service import Engine  # noqa: E402
from engine.settings import resolve_settings  # noqa: E402
from engine.store.sqlutil import TransactionCounter  # noqa: E402

ITEMS = int(os.environ.get("BENCH_ITEMS", "1000"))
BRANCHES = int(os.environ.get("BENCH_BRANCHES", "50"))
THREADS = int(os.environ.get("BENCH_THREADS", "4"))

FAN = """id: fan
version: "1"
trigger: {manual: true}
steps:
  - id: kids
    for_each: "{{ payload.items }}"
    run_workflow: one
    payload: {i: "{{ item }}"}
    concurrency: 10
output: "{{ steps.kids.output | length }}"
"""
ONE = """id: one
version: "1"
trigger: {manual: true}
steps:
  - {id: a, call: bench.noop, with: {i: "{{ payload.i }}"}}
output: "{{ steps.a.output }}"
"""


def wide(branches: int) -> str:
    lines = ["id: wide", 'version: "1"', "trigger: {manual: true}", "steps:", "  - id: all"]
    lines.append("    parallel:")
    for b in range(branches):
        lines.append(f"      b{b}: [{{id: s{b}, call: bench.noop, with: {{i: {b}}}}}]")
    lines.append('output: "{{ steps.all.output | length }}"')
    return "\n".join(lines) + "\n"


@step("bench.noop")
def noop(i: int) -> int:
    return i


def drive_all(engine: Engine, root: Run, threads: int) -> tuple[Run, int]:
    """Executor threads claim and drive due runs until the root run has ended; the run and
    how many claims found nothing."""
    done = threading.Event()
    empty = [0]

    def executor(slot: int) -> None:
        lease = new_lease(30.0)
        runner = Runner(engine.store, lease, foreground=False, host=engine)
        while not done.is_set():
            run = engine.store.claim_next_run(lease, engine.store.now())
            if run is None:
                empty[0] += 1
                time.sleep(0.002)
                continue
            ended = runner.drive_claimed(run)
            if ended.id == root.id and ended.finished:
                done.set()

    pool = [threading.Thread(target=executor, args=(i,), daemon=True) for i in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return engine.store.get_run(root.id), empty[0]


def empty_claim_cost(engine: Engine) -> int:
    """The transactions of one claim that finds nothing (taken off the count: a worker
    sleeps until notified instead of polling)."""
    counter = TransactionCounter(engine.store.db)  # type: ignore[attr-defined]
    assert engine.store.claim_next_run(new_lease(), engine.store.now()) is None
    counter.close()
    return counter.count


def measure(url: str, folder: Path, workflow: str, payload: dict[str, object], items: int) -> str:
    engine = Engine(resolve_settings(db=url, workflows=str(folder)), import_steps=False)
    try:
        machine = engine.workflow(workflow)
        idle = empty_claim_cost(engine)
        counter = TransactionCounter(engine.store.db)  # type: ignore[attr-defined]
        began = time.perf_counter()
        new = engine.new_run(machine, payload, {"kind": "manual"})
        root = Runner(engine.store, foreground=False, host=engine).start(machine, payload, new=new)
        run, empty = drive_all(engine, root, THREADS)
        seconds = time.perf_counter() - began
        counter.close()
        count = counter.count - idle * empty
        assert run.status.value == "completed" and run.output == items, (run.status, run.error)
        return (
            f"{workflow:5} {items:5} children: {seconds:6.2f} s, {items / seconds:6.1f} children/s, "
            f"{count / items:5.1f} transactions per item ({count} in all; "
            f"{empty} empty claims left out)"
        )
    finally:
        engine.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "flows"
        folder.mkdir()
        (folder / "fan.yaml").write_text(FAN)
        (folder / "one.yaml").write_text(ONE)
        (folder / "wide.yaml").write_text(wide(BRANCHES))
        targets = [("SQLite", f"sqlite:///{tmp}/bench.db")]
        pg = os.environ.get("DURABLE_YAML_BENCH_PG")
        if pg:
            targets.append(("PostgreSQL", pg))
        else:
            print("PostgreSQL skipped: set DURABLE_YAML_BENCH_PG to a database URL")
        print(f"{THREADS} executor threads; for_each concurrency 10")
        for name, url in targets:
            if name == "PostgreSQL":
                _reset(url)
            print(f"{name}:")
            print("  " + measure(url, folder, "fan", {"items": list(range(ITEMS))}, ITEMS))
            print("  " + measure(url, folder, "wide", {}, BRANCHES))


def _reset(url: str) -> None:
    """Start PostgreSQL from empty tables (the bench's own database)."""
    import sqlalchemy as sa

    from engine.store.sql import normalise_url

    engine = sa.create_engine(normalise_url(url))
    with engine.begin() as c:
        names = c.execute(
            sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "AND tablename LIKE 'dy\\_%'"
            )
        ).scalars()
        listed = ", ".join(f'"{n}"' for n in names)
        if listed:
            c.execute(sa.text(f"DROP TABLE {listed} CASCADE"))
    engine.dispose()


if __name__ == "__main__":
    main()
