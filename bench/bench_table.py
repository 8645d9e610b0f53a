"""Issue #15's table, one command per database, every number measured side by side in one run
(medians of BENCH_ROUNDS rounds, default 3):

    python bench/bench_table.py sqlite
    python bench/bench_table.py postgresql     # in $DURABLE_YAML_BENCH_PG_DB (one database)

- raw: a one-row INSERT + COMMIT loop through SQLAlchemy on the store's own engine (the same
  durability: SQLite in WAL mode with synchronous=FULL; PostgreSQL's defaults);
- durable-yaml in-process (what `run` does): BENCH_RUNS three-step no-op workflows driven
  one after the other by a Runner;
- durable-yaml queued: BENCH_QUEUED (500) three-step no-op runs queued first, then one
  `durable-yaml worker --concurrency 8` started; from its start (start-up included) to the
  last run's end (the worker's default: group commit on SQLite, not on PostgreSQL), and
  again the other way (`--no-group-commit` on SQLite, `--group-commit` on PostgreSQL);
  beside the first, the same runs' steady rate (the first run's start to the last's end);
- DBOS (if installed), the same three-step workflow called directly, and enqueued on a DBOS
  queue (concurrency 8) executed by its process, on the same database;
- Huey (if installed, SQLite only): BENCH_QUEUED no-op tasks enqueued in a SqliteHuey, then a
  consumer with 8 worker threads until every result is stored (a task queue: no steps, no
  durable state between them);
- Procrastinate (if installed, PostgreSQL only): BENCH_QUEUED no-op jobs deferred, then one
  worker (concurrency 8) until the queue is empty, in a schema of its own;
- each of those two timed both ways: its consumer started in a fresh process, from the
  spawn to the end (imports included, as the queued durable-yaml worker is timed), and
  started in the process that enqueued (the library imported already: beside the queued
  runs' steady rate).

PostgreSQL uses only the database of DURABLE_YAML_BENCH_PG_DB (default
postgresql://postgres@127.0.0.1:5432/durable_yaml_bench, which must exist): durable-yaml's
tables in `public`, DBOS's in its `dbos` schema, Procrastinate's in `procrastinate_bench`.
`--markdown` also prints the rows as a Markdown table (for the README).
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

from bench.bench_durable import ceiling  # noqa: E402
from engine.runner import Runner  # noqa: E402
from engine.service import Engine  # noqa: E402
from engine.settings import resolve_settings  # noqa: E402
from engine.store import schema as t  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
RUNS = int(os.environ.get("BENCH_RUNS", "300"))
QUEUED = int(os.environ.get("BENCH_QUEUED", "500"))
CONCURRENCY = 8
WORKFLOW = """id: noop3
version: "1"
trigger: {event: bench.go3}
steps:
  - {id: a, call: bench.noop, with: {i: 1}}
  - {id: b, call: bench.noop, with: {i: 2}}
  - {id: c, call: bench.noop, with: {i: 3}}
"""
STEPS = ROOT / "bench" / "flows"  # benchsteps.py: bench.noop


def fresh_engine(url: str, folder: Path) -> Engine:
    """An engine on an emptied database with noop3 saved."""
    engine = Engine(resolve_settings(db=url, workflows=str(folder)), import_steps=False)
    t.metadata.drop_all(engine.store.engine)
    engine.close()
    engine = Engine(resolve_settings(db=url, workflows=str(folder)), import_steps=False)
    engine.save_all_definitions()
    return engine


def in_process(engine: Engine, runs: int) -> float:
    """Workflows/s of three-step runs driven one after another in this process."""
    import benchsteps  # noqa: F401  (registers bench.noop)

    machine = engine.workflow("noop3")
    runner = Runner(engine.store)
    for _ in range(10):
        runner.start(machine, {})
    start = time.perf_counter()
    for _ in range(runs):
        assert runner.start(machine, {}).output == 3
    return runs / (time.perf_counter() - start)


def queued(url: str, folder: Path, runs: int, flag: str | None = None) -> tuple[float, float]:
    """Workflows/s: `runs` queued, then one worker started; its start-up included. And the
    steady rate: from the first run's start to the last run's end."""
    engine = fresh_engine(url, folder)
    for i in range(runs):
        engine.send_event("bench.go3", {"i": i})
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DURABLE_YAML_")},
        "DURABLE_YAML_DB": url,
        "DURABLE_YAML_MODULES": "benchsteps",
        "DURABLE_YAML_WORKFLOWS": str(folder),
        "PYTHONPATH": f"{ROOT}:{STEPS}",
    }
    cmd = [sys.executable, "-c", "from engine.cli import entry; entry()", "worker"]
    started = time.time()
    worker = subprocess.Popen(
        [
            *cmd,
            "--concurrency",
            str(CONCURRENCY),
            "--no-schedules",
            *([flag] if flag else []),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = sa.select(sa.func.count()).where(t.runs.c.status == "completed")
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            time.sleep(0.1)
            with engine.store.db.read() as c:  # a snapshot: never the worker's write lock
                if c.execute(done).scalar_one() >= runs:
                    break
        else:
            raise SystemExit(f"the worker did not finish {runs} runs in 600 s")
    finally:
        worker.terminate()
        worker.wait(60)
    with engine.store.engine.connect() as c:
        first, last = c.execute(
            sa.select(sa.func.min(t.runs.c.started_at), sa.func.max(t.runs.c.finished_at))
        ).one()
    engine.close()
    return float(runs / (last - started)), float(runs / (last - first))


def side(script: str, *args: str) -> float | None:
    """The last line printed by a competitor's script (its rate), None if it failed."""
    last = _side_line(script, *args)
    return None if last is None else float(last)


def side_fresh(script: str, count: int, *args: str) -> float | None:
    """A competitor's rate timed as a `durable-yaml worker` is timed: its backlog made by
    one process (`enqueue`, which prints nothing), then a fresh process (`consume`) from
    its spawn to the end it prints, so its interpreter's start and imports are included as
    ours are."""
    if _run_side(script, *args, "enqueue") is None:
        return None
    started = time.time()
    ended = _side_line(script, *args, "consume")
    return None if ended is None else count / (float(ended) - started)


def _side_line(script: str, *args: str) -> str | None:
    """The last line a competitor's script printed; None if it failed or printed none."""
    out = _run_side(script, *args)
    if out is None:
        return None
    lines = out.strip().splitlines()
    if not lines:
        print(f"  {script} printed nothing")
        return None
    return lines[-1]


def _run_side(script: str, *args: str) -> str | None:
    """A competitor's script's output; None (its error shown) if it failed."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        print(f"  {script} failed:", (out.stderr.strip().splitlines() or ["?"])[-1])
        return None
    return out.stdout


def pg_plain(url: str) -> str:
    """A libpq URL (psycopg's) of a SQLAlchemy one."""
    return url.replace("postgresql+psycopg://", "postgresql://")


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
    folder = Path(tempfile.mkdtemp(prefix="dy-table-"))
    flows = folder / "flows"
    flows.mkdir()
    (flows / "noop3.yaml").write_text(WORKFLOW)
    sys.path.insert(0, str(STEPS))
    if which == "sqlite":
        url = f"sqlite:///{folder}/bench.db"
        dbos_url = f"sqlite:///{folder}/dbos.sqlite"
    elif which == "postgresql":
        url = os.environ.get(
            "DURABLE_YAML_BENCH_PG_DB", "postgresql://postgres@127.0.0.1:5432/durable_yaml_bench"
        )
        dbos_url = url
    else:
        raise SystemExit("usage: bench_table.py sqlite|postgresql [--markdown]")
    rows: dict[str, list[float | None]] = {
        k: []
        for k in (
            "raw",
            "run",
            "queued",
            "queued_other",
            "steady",
            "dbos_run",
            "dbos_queued",
            "huey",
            "huey_fresh",
            "procrastinate",
            "procrastinate_fresh",
        )
    }
    # the worker's default: group commit on SQLite, not on PostgreSQL; also the other way
    other = "--no-group-commit" if which == "sqlite" else "--group-commit"
    load = os.getloadavg()[0]
    for _ in range(ROUNDS):
        engine = fresh_engine(url, flows)
        rows["raw"].append(ceiling(engine.store, RUNS))
        rows["run"].append(in_process(engine, RUNS))
        engine.close()
        total, steady = queued(url, flows, QUEUED)
        rows["queued"].append(total)
        rows["steady"].append(steady)
        rows["queued_other"].append(queued(url, flows, QUEUED, other)[0])
        if installed("dbos"):
            rows["dbos_run"].append(side("dbos_side.py", dbos_url, str(RUNS)))
            rows["dbos_queued"].append(side("dbos_side.py", dbos_url, str(QUEUED), "queue3"))
        if which == "sqlite" and installed("huey"):
            huey = (str(folder / "huey.db"), str(QUEUED))
            rows["huey"].append(side("huey_side.py", *huey))
            rows["huey_fresh"].append(side_fresh("huey_side.py", QUEUED, *huey))
        if which == "postgresql" and installed("procrastinate"):
            procrastinate = (pg_plain(url), str(QUEUED), "8")
            rows["procrastinate"].append(side("procrastinate_side.py", *procrastinate))
            rows["procrastinate_fresh"].append(
                side_fresh("procrastinate_side.py", QUEUED, *procrastinate)
            )
    m = {k: median(v) for k, v in rows.items()}
    raw = m["raw"]
    assert raw is not None

    def vs(ours: float | None, theirs: float | None) -> str:
        return f"{ours / theirs:.1f}x" if ours and theirs else "n/a"

    def rate(value: float | None) -> str:
        return f"{value:,.0f}" if value else "n/a"

    print(
        f"[{which}] medians of {ROUNDS} rounds; three-step no-op workflows; "
        f"load {load:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(f"  raw INSERT+COMMIT/s                      {raw:8,.0f}")
    table = []
    for mode, ours, dbos in (
        ("in-process (`run`)", m["run"], m["dbos_run"]),
        (f"queued ({QUEUED}, 1 worker x{CONCURRENCY})", m["queued"], m["dbos_queued"]),
    ):
        assert ours is not None
        row = (mode, rate(ours), f"{ours * 3 / raw:.2f}", rate(dbos), vs(ours, dbos))
        table.append(row)
        print(
            f"  durable-yaml {mode:28} {ours:8,.0f} wf/s  steps/s ÷ raw {row[2]}  "
            f"DBOS {row[3]} wf/s  ratio {row[4]}"
        )
    assert m["steady"] is not None
    print(
        f"    (the same runs from the first start to the last end, start-up left out: "
        f"{m['steady']:,.0f} wf/s, steps/s ÷ raw {m['steady'] * 3 / raw:.2f})"
    )
    alt = m["queued_other"]
    assert alt is not None and m["queued"] is not None
    grouped, single = (m["queued"], alt) if which == "sqlite" else (alt, m["queued"])
    print(
        f"  durable-yaml queued, {other:19} {alt:8,.0f} wf/s  steps/s ÷ raw "
        f"{alt * 3 / raw:.2f}  (group commit vs none: {grouped / single:.2f}x)"
    )
    # Task queues: their tasks against our workflows and against our steps (a task is one
    # function call, as a step is), each way of timing beside ours timed the same way: a
    # fresh process (imports included) beside the queued runs; a consumer started in a
    # process that imported the library already beside the queued runs' steady rate
    for name, unit, theirs, fresh in (
        ("Huey (SqliteHuey, 8 threads)", "tasks", m["huey"], m["huey_fresh"]),
        ("Procrastinate (concurrency 8)", "jobs", m["procrastinate"], m["procrastinate_fresh"]),
    ):
        if theirs is None or fresh is None:
            continue
        print(
            f"  {name:40} {fresh:8,.0f} {unit}/s from a fresh process: durable-yaml queued "
            f"wf/s {vs(m['queued'], fresh)}, steps/s {vs(m['queued'] * 3, fresh)}"
        )
        print(
            f"  {'':40} {theirs:8,.0f} {unit}/s imported already: durable-yaml steady "
            f"wf/s {vs(m['steady'], theirs)}, steps/s {vs(m['steady'] * 3, theirs)}"
        )
    if "--markdown" in sys.argv:
        print()
        print("| | raw commits/s | durable-yaml wf/s | steps/s ÷ raw | DBOS 3.4 wf/s | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for mode, ours_s, share, dbos_s, ratio in table:
            print(f"| {which} {mode} | {raw:,.0f} | {ours_s} | {share} | {dbos_s} | {ratio} |")


if __name__ == "__main__":
    main()
