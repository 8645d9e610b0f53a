"""Start-up, the real `durable-yaml` command in fresh processes (issue #15), medians of
BENCH_STARTUP_ROUNDS (default 7), wall time and CPU time (user+sys: less disturbed by a busy
machine):

- `python -c pass` (the interpreter alone, for scale) and `durable-yaml --help`;
- `validate` of one workflow file (aim <= 0.15 s), alone and in a project whose step modules it
  imports (which then exits the ordinary way: engine/cli `entry`);
- `run` of a three-step no-op workflow, SQLite, to its end;
- a worker's first claim: one run queued, then `durable-yaml worker` started; from the
  process's start to the run's `started_at` in the database (aim <= 0.3 s).

Each command also has a floor: a `python -c` importing only the libraries that command
needs (click, PyYAML, jsonschema and jinja2 for `validate`; SQLAlchemy too for `run` and a
worker), so what is ours is the difference. Children may write bytecode caches (a
PYTHONDONTWRITEBYTECODE in the environment would make every start compile the project from
source, which no installed copy does), and each command runs once untimed first.

`--importtime` also prints the ten slowest imports of `validate` (python -X importtime).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUNDS = int(os.environ.get("BENCH_STARTUP_ROUNDS", "7"))
WORKFLOW = """id: noop3
version: "1"
trigger: {event: bench.go3}
steps:
  - {id: a, call: bench.noop, with: {i: 1}}
  - {id: b, call: bench.noop, with: {i: 2}}
  - {id: c, call: bench.noop, with: {i: 3}}
"""
STEPS = (ROOT / "bench" / "flows" / "benchsteps.py").read_text()
CLI = [sys.executable, "-c", "from engine.cli import entry; entry()"]


def project() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="dy-startup-"))
    (folder / "workflows").mkdir()
    (folder / "workflows" / "noop3.yaml").write_text(WORKFLOW)
    (folder / "benchsteps.py").write_text(STEPS)
    (folder / "pyproject.toml").write_text(
        '[tool.durable-yaml]\nmodules = ["benchsteps"]\nworkflows = "workflows"\n'
    )
    return folder


def env_for(folder: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DURABLE_YAML_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    return {**env, "PYTHONPATH": f"{ROOT}:{folder}"}


LANGUAGE = "import click, yaml, jsonschema, jinja2.sandbox"
STORE = f"{LANGUAGE}, sqlalchemy"
FLOORS = {  # the libraries each command cannot start without, and its way of exiting
    "validate": [sys.executable, "-c", f"{LANGUAGE}, os; os._exit(0)"],
    "store": [sys.executable, "-c", STORE],
}


def imported_at(folder: Path) -> float:
    """Seconds from starting a process to its import of the store's libraries (the floor
    of a worker's first claim)."""
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-c", f"{STORE}, time; print(time.time())"],
        cwd=folder,
        env=env_for(folder),
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return float(out.stdout) - started


def timed(cmd: list[str], folder: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one run of `cmd` (which must succeed).

    Waited for with a blocking wait, not `subprocess.run(timeout=...)`: a wait with a
    timeout polls, sleeping up to 50 ms between looks, and so rounded every time up to the
    next look (the rows came out 50 ms apart). A watchdog kills a command that hangs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=folder, env=env_for(folder), stdout=subprocess.DEVNULL)
    watchdog = threading.Timer(60, child.kill)
    watchdog.start()
    try:
        code = child.wait()
    finally:
        watchdog.cancel()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def medians_of(cmds: list[tuple[list[str], Path]]) -> list[tuple[float, float]]:
    """Wall and CPU medians of each command (run in its folder), the commands taking turns
    in every round (a machine that slows down for a minute slows every row alike)."""
    for cmd, folder in cmds:
        timed(cmd, folder)  # bytecode caches written, files in the page cache
    samples: list[list[tuple[float, float]]] = [[] for _ in cmds]
    for _ in range(ROUNDS):
        for (cmd, folder), out in zip(cmds, samples, strict=True):
            out.append(timed(cmd, folder))
    return [
        (statistics.median(s[0] for s in out), statistics.median(s[1] for s in out))
        for out in samples
    ]


def first_claim(folder: Path) -> float:
    """Seconds from starting a worker to its claim of the one queued run."""
    from engine.service import Engine
    from engine.settings import resolve_settings

    url = f"sqlite:///{folder}/claim.db"
    engine = Engine(
        resolve_settings(db=url, workflows=str(folder / "workflows")), import_steps=False
    )
    engine.save_all_definitions()
    run_id = engine.send_event("bench.go3", {}).run_ids[0]
    env = {**env_for(folder), "DURABLE_YAML_DB": url}
    started = time.time()
    worker = subprocess.Popen(
        [*CLI, "worker", "--concurrency", "8", "--no-schedules"],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            run = engine.store.get_run(run_id)
            if run.started_at is not None:
                return run.started_at - started
            time.sleep(0.005)
        raise SystemExit("the worker claimed nothing in 30 s")
    finally:
        worker.terminate()
        worker.wait(30)
        engine.close()


def importtime(folder: Path) -> list[tuple[int, str]]:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", *CLI[1:], "validate", "workflows/noop3.yaml"],
        cwd=folder,
        env=env_for(folder),
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in out.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return sorted(rows, reverse=True)[:10]


def main() -> None:
    folder = project()
    plain = Path(tempfile.mkdtemp(prefix="dy-startup-plain-"))  # no settings, no step modules
    (plain / "noop3.yaml").write_text(WORKFLOW)
    print(f"start-up, medians of {ROUNDS} (wall / CPU user+sys), load {os.getloadavg()[0]:.1f}")
    rows = [
        ("python -c pass", [sys.executable, "-c", "pass"], plain),
        ("durable-yaml --help", [*CLI, "--help"], plain),
        ("  floor: click, PyYAML, jsonschema, jinja2", FLOORS["validate"], plain),
        ("durable-yaml validate (one file)", [*CLI, "validate", "noop3.yaml"], plain),
        (
            "  the same, the project's step modules imported",
            [*CLI, "validate", "workflows"],
            folder,
        ),
        ("  floor: the same and SQLAlchemy", FLOORS["store"], folder),
        ("durable-yaml run (3 no-op steps, SQLite)", [*CLI, "run", "noop3"], folder),
    ]
    times = medians_of([(cmd, cwd) for _, cmd, cwd in rows])
    for (name, _, _), (wall, cpu) in zip(rows, times, strict=True):
        print(f"  {name:44} {wall * 1000:6.0f} ms / {cpu * 1000:6.0f} ms")
    first_claim(folder)
    claims, floors = [], []
    for _ in range(ROUNDS):
        claims.append(first_claim(folder))
        floors.append(imported_at(folder))
    print(f"  {'worker start -> first claim':44} {statistics.median(claims) * 1000:6.0f} ms")
    print(
        f"  {'  floor: start -> the same libraries imported':44} "
        f"{statistics.median(floors) * 1000:6.0f} ms"
    )
    print(f"  (load afterwards {os.getloadavg()[0]:.1f})")
    if "--importtime" in sys.argv:
        print("slowest imports of validate (cumulative µs):")
        for micros, name in importtime(folder):
            print(f"  {micros:8d}  {name}")


if __name__ == "__main__":
    main()
