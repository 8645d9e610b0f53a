"""Prometheus metrics: `GET /metrics` on the server, `worker --metrics-port` on a worker.

Two kinds of numbers:

- observed in this process, by whoever does the work: step durations (the process that
  executes the attempt: a worker, or a foreground `run`) and claim latency (a worker's
  executors). Each process has its own; scrape every worker for them.
- read from the database at each scrape by a collector (`StoreCollector`): runs by workflow
  and status, per queue its queued runs, running runs and the age of its longest-waiting
  due run, live workers. Every process that serves metrics gives the same values.

prometheus_client is imported, and the histograms made, only when the process serves
metrics (`build_registry`, `serve_metrics`): until then observing costs nothing, and a `run`
or a worker without `--metrics-port` never loads it. A process observes from then on.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Histogram

    from .store import Store

__all__ = [
    "build_registry",
    "observe_claim",
    "observe_step",
    "serve_metrics",
]

_made: dict[str, Histogram] = {}  # "step", "claim": once this process serves metrics
_making = threading.Lock()


def _histograms() -> dict[str, Histogram]:
    with _making:
        if not _made:
            from prometheus_client import Histogram

            _made["step"] = Histogram(
                "durable_yaml_step_duration_seconds",
                "How long one attempt of a step took in this process, by its outcome "
                "(completed, failed, skipped, waiting).",
                ["workflow", "step", "outcome"],
                registry=None,
                buckets=(
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600
                ),
            )  # fmt: skip
            _made["claim"] = Histogram(
                "durable_yaml_claim_latency_seconds",
                "How long one claim of the next run took in this worker (result: claimed or "
                "empty).",
                ["result"],
                registry=None,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            )
    return _made


def observe_step(workflow: str, step: str, outcome: str, seconds: float) -> None:
    histogram = _made.get("step")
    if histogram is not None:
        histogram.labels(workflow, step, outcome).observe(max(0.0, seconds))


def observe_claim(claimed: bool, seconds: float) -> None:
    histogram = _made.get("claim")
    if histogram is not None:
        histogram.labels("claimed" if claimed else "empty").observe(max(0.0, seconds))


def build_registry(store: Store) -> CollectorRegistry:
    """This process's histograms and the database's gauges, in a registry of their own."""
    from prometheus_client import CollectorRegistry

    from .scrape import StoreCollector

    made = _histograms()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(made["step"])
    registry.register(made["claim"])
    registry.register(StoreCollector(store))
    return registry


def serve_metrics(store: Store, host: str, port: int) -> Any:
    """Serve the registry on http://host:port/metrics in a daemon thread; the server (its
    `shutdown()` stops it). OSError if the address cannot be bound."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, host, registry=build_registry(store))
    return server
