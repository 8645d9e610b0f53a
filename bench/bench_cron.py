"""Cron lateness on a live worker: scheduled instant -> first step running, over a few real
fires of a `* * * * *` schedule (BENCH_CRON_FIRES, default 3: about as many minutes), on
SQLite and PostgreSQL side by side (aim: p99 < 1 s)."""

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

from bench.bench_durable import pg_urls  # noqa: E402
from engine.service import Engine  # noqa: E402
from engine.settings import resolve_settings  # noqa: E402
from engine.store import schema as t  # noqa: E402

FLOWS = ROOT / "bench" / "cronflows"
FIRES = int(os.environ.get("BENCH_CRON_FIRES", "3"))


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="dy-cron-"))
    urls = {"sqlite": f"sqlite:///{folder}/cron.db"}
    pg = pg_urls()
    if pg:
        urls["postgresql"] = pg[0]
    engines, workers = {}, []
    for name, url in urls.items():
        engine = Engine(resolve_settings(db=url, workflows=str(FLOWS)), import_steps=False)
        t.metadata.drop_all(engine.store.engine)
        engine.close()
        engines[name] = Engine(resolve_settings(db=url, workflows=str(FLOWS)), import_steps=False)
        env = {
            **os.environ,
            "DURABLE_YAML_DB": url,
            "DURABLE_YAML_MODULES": "cronsteps",
            "DURABLE_YAML_WORKFLOWS": str(FLOWS),
            "PYTHONPATH": f"{ROOT}:{FLOWS}",
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "engine", "worker"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    print(f"waiting for {FIRES} fires of `* * * * *` on {', '.join(urls)} ...", flush=True)
    try:
        deadline = time.time() + 60 * (FIRES + 2)
        while time.time() < deadline:
            done = [_latenesses(e) for e in engines.values()]
            if all(len(d) >= FIRES for d in done):
                break
            time.sleep(1)
    finally:
        for w in workers:
            w.terminate()
            w.wait(30)
    for name, engine in engines.items():
        late = sorted(_latenesses(engine))[:FIRES]
        if not late:
            print(f"{name}: no fire completed")
            continue
        p99 = late[min(len(late) - 1, int(len(late) * 0.99))]
        print(
            f"{name:<11} fires {len(late)}  lateness p50 {statistics.median(late) * 1000:.1f} ms"
            f"  p99 {p99 * 1000:.1f} ms  max {late[-1] * 1000:.1f} ms"
        )


def _latenesses(engine: Engine) -> list[float]:
    with engine.store.engine.connect() as c:
        rows = c.execute(sa.select(t.steps.c.output).where(t.steps.c.step_key == "stamp")).all()
    return [r[0]["lateness"] for r in rows if r[0]]


if __name__ == "__main__":
    main()
