"""What observability costs, measured side by side in one run:

- `GET /metrics` (one scrape: the grouped run counts, queue depths, live workers) with
  100,000 stored runs vs 100 (a ratio; the grouped count reads every run row, so it grows
  with the table, and this says by how much);
- one poll of the SSE stream / `runs logs --follow` (the run row, then its logs after the
  last id) on a run with 10,000 log lines vs 10;
- the observer around each attempt (`observe.observed_attempt`: a contextvar, a histogram
  sample) with tracing off and on (an SDK provider without exporter), beside one durable
  step's commit on the same database.

SQLite, and PostgreSQL at DURABLE_YAML_BENCH_OBS_PG (a database of your own) when set.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_server import build  # noqa: E402
from dsl import load_workflow  # noqa: E402
from engine.observe import observed_attempt  # noqa: E402
from engine.server import create_app  # noqa: E402
from engine.transitions import Done  # noqa: E402


def median_ms(fn: object, n: int) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def _ok(response: Any) -> None:
    assert response.status_code == 200, response.text[:300]
    assert "durable_yaml_runs{" in response.text


def scrape_and_poll(url_small: str, url_large: str) -> list[tuple[str, float, float]]:
    out = []
    small, small_run = build(url_small, 100, 10)
    engine_small = small.app.state.engine  # type: ignore[attr-defined]
    metrics_small = TestClient(create_app(engine_small, None), base_url="http://127.0.0.1")
    s_scrape = median_ms(lambda: _ok(metrics_small.get("/metrics")), 20)
    store = engine_small.store
    s_poll = median_ms(lambda: (store.get_run(small_run), store.get_logs(small_run, 5, 500)), 50)
    large, large_run = build(url_large, 100_000, 10_000)
    engine_large = large.app.state.engine  # type: ignore[attr-defined]
    metrics_large = TestClient(create_app(engine_large, None), base_url="http://127.0.0.1")
    l_scrape = median_ms(lambda: _ok(metrics_large.get("/metrics")), 20)
    store = engine_large.store
    l_poll = median_ms(
        lambda: (store.get_run(large_run), store.get_logs(large_run, 9_995, 500)), 50
    )
    out.append(("/metrics scrape, 100 vs 100k runs", s_scrape, l_scrape))
    out.append(("SSE/follow poll, 10 vs 10k lines", s_poll, l_poll))
    return out


def hook_cost() -> tuple[float, float]:
    """Microseconds of one observed attempt: tracing off, then on."""
    from engine.models import Run, RunStatus

    run = Run(
        "r", "wf", "1", "h", RunStatus.RUNNING, {}, None, None, "s", 1, True, "default", None,
        0, {"kind": "manual"}, None, None, None, False, None, None, None, 0.0, 0.0, None, None, 0.0,
    )  # fmt: skip
    state = load_workflow(ROOT / "workflows" / "process-image.yaml").states[0]
    done = Done({"ok": True})

    def once() -> None:
        with observed_attempt(run, state, 1) as ended:
            ended(done, 0.01)

    def per_call() -> float:
        n = 5000
        start = time.perf_counter()
        for _ in range(n):
            once()
        return (time.perf_counter() - start) / n * 1e6

    off = per_call()
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    os.environ["DURABLE_YAML_OTEL"] = "1"
    try:
        on = per_call()
    finally:
        os.environ.pop("DURABLE_YAML_OTEL", None)
    return off, on


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="dy-observe-"))
    backends = [("sqlite", f"sqlite:///{folder}/small.db", f"sqlite:///{folder}/large.db")]
    pg = os.environ.get("DURABLE_YAML_BENCH_OBS_PG")
    if pg:
        backends.append(("postgresql", pg, pg))
    print(f"{'backend':<11} {'what':<36} {'small':>10} {'large':>10} {'ratio':>6}")
    for name, small_url, large_url in backends:
        for what, s, big in scrape_and_poll(small_url, large_url):
            print(f"{name:<11} {what:<36} {s:>7.2f} ms {big:>7.2f} ms {big / s:>5.2f}x")
    off, on = hook_cost()
    print(f"observer per attempt: {off:.1f} us tracing off, {on:.1f} us tracing on (no exporter)")


if __name__ == "__main__":
    main()
