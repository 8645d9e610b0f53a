"""cProfile of the queued three-step hot path (issue #15): BENCH_PROFILE_RUNS (300) runs of
noop3 queued, then claimed and driven one after another as a worker's executor does
(`claim_next_run` + `Runner.drive_claimed`, a worker's lease, no other thread working), on
SQLite or PostgreSQL ($DURABLE_YAML_BENCH_PG_DB). Prints the top functions by own time and
by cumulative time, and the CPU microseconds per step.

    python bench/profile_hot_path.py sqlite|postgresql [--sort tottime|cumulative] [--top N]
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "flows"))

from bench.bench_table import WORKFLOW, fresh_engine  # noqa: E402
from engine.models import Lease  # noqa: E402
from engine.runner import Runner  # noqa: E402

RUNS = int(os.environ.get("BENCH_PROFILE_RUNS", "300"))


def main() -> None:
    import benchsteps  # noqa: F401

    which = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 25
    folder = Path(tempfile.mkdtemp(prefix="dy-profile-"))
    (folder / "noop3.yaml").write_text(WORKFLOW)
    url = (
        f"sqlite:///{folder}/profile.db"
        if which == "sqlite"
        else os.environ.get(
            "DURABLE_YAML_BENCH_PG_DB", "postgresql://postgres@127.0.0.1:5432/durable_yaml_bench"
        )
    )
    engine = fresh_engine(url, folder)
    for i in range(RUNS + RUNS // 2 + 20):
        engine.send_event("bench.go3", {"i": i})
    store = engine.store
    lease = Lease(owner="profile-worker/0", host="here", pid=os.getpid(), seconds=30.0)
    runner = Runner(store, lease, foreground=False, host=engine)

    def one() -> None:
        run = store.claim_next_run(lease, store.now(), None)
        assert run is not None
        assert runner.drive_claimed(run).output == 3

    for _ in range(20):  # warm: statements compiled, definitions loaded
        one()
    cpu = time.process_time()
    for _ in range(RUNS // 2):
        one()
    plain = (time.process_time() - cpu) * 1e6 / (RUNS // 2 * 3)
    profile = cProfile.Profile()
    cpu = time.process_time()
    profile.enable()
    for _ in range(RUNS):
        one()
    profile.disable()
    cpu = time.process_time() - cpu
    engine.close()
    print(
        f"[{which}] CPU per step: {plain:.0f} µs ({RUNS // 2} runs x 3 steps, no profiler); "
        f"{cpu * 1e6 / (RUNS * 3):.0f} µs under the profiler ({RUNS} runs)"
    )
    by_package: dict[str, float] = {}
    for (filename, _line, name), row in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        own = row[2]
        if "sqlalchemy" in filename:
            where = "sqlalchemy"
        elif "psycopg" in filename:
            where = "psycopg"
        elif filename.startswith(str(ROOT / "engine" / "store")):
            where = "engine/store"
        elif filename.startswith(str(ROOT / "engine")):
            where = "engine (runner, executor, ...)"
        elif filename.startswith(str(ROOT / "dsl")):
            where = "dsl (templates)"
        elif "jinja2" in filename:
            where = "jinja2"
        elif filename == "~" and "commit" in name:
            where = "COMMIT (waits for the disk)"
        elif filename == "~" and "execute" in name:
            where = "driver execute"
        else:
            where = "other (stdlib, builtins)"
        by_package[where] = by_package.get(where, 0.0) + own
    total = sum(by_package.values())
    print("--- own time by package (µs per step)")
    for where, own in sorted(by_package.items(), key=lambda kv: -kv[1]):
        print(f"  {where:32} {own * 1e6 / (RUNS * 3):7.0f}  {own / total:5.1%}")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats(key).print_stats(top)
        lines = out.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        print(f"--- by {key}")
        for line in lines[start : start + top + 1]:
            print(line.replace(str(ROOT) + "/", "").replace(sys.prefix, "<venv>"))


if __name__ == "__main__":
    main()
