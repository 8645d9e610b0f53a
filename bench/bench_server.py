"""Server time of the dashboard's runs list and run page with a large history, as a ratio to
the same pages with a small one (aim <= 2x): 100,000 runs vs 100, and a run with 10,000 log
lines vs 10. Through the real ASGI app; medians of 30 requests; SQLite and PostgreSQL."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_durable import pg_urls  # noqa: E402
from engine.models import NewRun  # noqa: E402
from engine.runner import new_run_id  # noqa: E402
from engine.server import create_app  # noqa: E402
from engine.service import Engine  # noqa: E402
from engine.settings import resolve_settings  # noqa: E402
from engine.store import schema as t  # noqa: E402
from engine.store.events import new_run_values  # noqa: E402

FLOWS = ROOT / "workflows"


def build(url: str, runs: int, logs: int) -> tuple[TestClient, str]:
    engine = Engine(resolve_settings(db=url, workflows=str(FLOWS)), import_steps=False)
    t.metadata.drop_all(engine.store.engine)
    engine.close()
    engine = Engine(resolve_settings(db=url, workflows=str(FLOWS)), import_steps=False)
    engine.save_all_definitions()
    machine = engine.workflow("process-image")
    now = time.time()
    statuses = ["completed", "failed", "waiting", "queued"]
    with engine.store.engine.begin() as c:
        batch = []
        for i in range(runs):
            values = new_run_values(
                NewRun(
                    new_run_id(),
                    machine.workflow_id,
                    machine.version,
                    machine.content_hash,
                    {"url": f"https://x/{i}", "userId": "u"},
                    machine.start,
                    machine.queue.name,
                ),
                now - runs + i,
            )
            values["status"] = statuses[i % 4]
            values["next_at"] = None if i % 4 < 2 else values["next_at"]
            batch.append(values)
            if len(batch) == 5000:
                c.execute(sa.insert(t.runs), batch)
                batch = []
        if batch:
            c.execute(sa.insert(t.runs), batch)
        run_id = c.execute(
            sa.select(t.runs.c.id).order_by(t.runs.c.created_at.desc()).limit(1)
        ).scalar_one()
        c.execute(
            sa.insert(t.logs),
            [
                {
                    "run_id": run_id,
                    "step_key": "call_image_api",
                    "attempt": 1,
                    "level": "info",
                    "message": f"line {i}",
                    "extra": {"i": i},
                    "created_at": now + i * 1e-3,
                }
                for i in range(logs)
            ],
        )
    if engine.store.dialect == "postgresql":
        with engine.store.engine.connect() as c:
            c.execute(sa.text("ANALYZE"))
            c.commit()
    return TestClient(create_app(engine, None), base_url="http://127.0.0.1"), run_id


def timed(client: TestClient, path: str, n: int = 30) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        response = client.get(path)
        samples.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text[:300]
    return statistics.median(samples) * 1000


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="dy-server-"))
    backends = [("sqlite", f"sqlite:///{folder}/small.db", f"sqlite:///{folder}/large.db")]
    pg = pg_urls()
    if pg:
        backends.append(("postgresql", pg[0], pg[0]))
    print(f"{'backend':<11} {'page':<28} {'small':>10} {'large':>10} {'ratio':>6}")
    for name, small_url, large_url in backends:
        small, small_run = build(small_url, 100, 10)
        results_small = {
            "runs list": timed(small, "/"),
            "runs list, status filter": timed(small, "/?status=failed"),
            "run page": timed(small, f"/runs/{small_run}"),
            "API runs list": timed(small, "/api/runs?limit=50"),
        }
        large, large_run = build(large_url, 100_000, 10_000)
        results_large = {
            "runs list": timed(large, "/"),
            "runs list, status filter": timed(large, "/?status=failed"),
            "run page": timed(large, f"/runs/{large_run}"),
            "API runs list": timed(large, "/api/runs?limit=50"),
        }
        for page in results_small:
            s, big = results_small[page], results_large[page]
            print(f"{name:<11} {page:<28} {s:>7.1f} ms {big:>7.1f} ms {big / s:>5.2f}x")


if __name__ == "__main__":
    main()
