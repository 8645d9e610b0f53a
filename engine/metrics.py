"""Prometheus metrics: `GET /metrics` on the server, `worker --metrics-port` on a worker.

Two kinds of numbers:

- observed in this process, by whoever does the work: step durations (the process that
  executes the attempt: a worker, or a foreground `run`) and claim latency (a worker's
  executors). Each process has its own; scrape every worker for them.
- read from the database at each scrape by a collector (`StoreCollector`): runs by workflow
  and status, per queue its queued runs, running runs and the age of its longest-waiting
  due run, live workers. Every process that serves metrics gives the same values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import EngineError
from .store import Store

__all__ = [
    "CLAIM_SECONDS",
    "STEP_SECONDS",
    "StoreCollector",
    "build_registry",
    "observe_claim",
    "observe_step",
    "serve_metrics",
]

log = logging.getLogger("durable_yaml.metrics")

STEP_SECONDS = Histogram(
    "durable_yaml_step_duration_seconds",
    "How long one attempt of a step took in this process, by its outcome "
    "(completed, failed, skipped, waiting).",
    ["workflow", "step", "outcome"],
    registry=None,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
CLAIM_SECONDS = Histogram(
    "durable_yaml_claim_latency_seconds",
    "How long one claim of the next run took in this worker (result: claimed or empty).",
    ["result"],
    registry=None,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def observe_step(workflow: str, step: str, outcome: str, seconds: float) -> None:
    STEP_SECONDS.labels(workflow, step, outcome).observe(max(0.0, seconds))


def observe_claim(claimed: bool, seconds: float) -> None:
    CLAIM_SECONDS.labels("claimed" if claimed else "empty").observe(max(0.0, seconds))


class StoreCollector(Collector):
    """The database's gauges, read at each scrape (one `metrics_snapshot`)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only: registering never touches the database

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "durable_yaml_database_up", "1 if the database answered this scrape, else 0."
        )
        try:
            snap = self.store.metrics_snapshot(self.store.now())
        except EngineError as exc:
            log.warning("metrics: the database did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        runs = GaugeMetricFamily(
            "durable_yaml_runs",
            "Stored runs by workflow and status.",
            labels=["workflow", "status"],
        )
        for (workflow, status), n in sorted(snap.runs.items()):
            runs.add_metric([workflow, status], n)
        yield runs
        depth = GaugeMetricFamily(
            "durable_yaml_queue_depth",
            "Queued runs per queue (delayed ones included).",
            labels=["queue"],
        )
        due = GaugeMetricFamily(
            "durable_yaml_queue_due_runs",
            "Queued runs per queue that are due now (not delayed).",
            labels=["queue"],
        )
        age = GaugeMetricFamily(
            "durable_yaml_queue_oldest_age_seconds",
            "Per queue, how long its longest-waiting due run has been due (0 if none).",
            labels=["queue"],
        )
        running = GaugeMetricFamily(
            "durable_yaml_queue_running", "Runs executing now per queue.", labels=["queue"]
        )
        for queue in sorted(snap.queued):
            depth.add_metric([queue], snap.queued[queue])
            due.add_metric([queue], snap.due.get(queue, 0))
            oldest = snap.oldest_due.get(queue)
            age.add_metric([queue], 0.0 if oldest is None else max(0.0, snap.now - oldest))
            running.add_metric([queue], snap.running.get(queue, 0))
        yield from (depth, due, age, running)
        workers = GaugeMetricFamily(
            "durable_yaml_workers_live", "Workers whose heartbeat is within their lease time."
        )
        workers.add_metric([], snap.workers)
        yield workers


def build_registry(store: Store) -> CollectorRegistry:
    """This process's histograms and the database's gauges, in a registry of their own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(STEP_SECONDS)
    registry.register(CLAIM_SECONDS)
    registry.register(StoreCollector(store))
    return registry


def serve_metrics(store: Store, host: str, port: int) -> Any:
    """Serve the registry on http://host:port/metrics in a daemon thread; the server (its
    `shutdown()` stops it). OSError if the address cannot be bound."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, host, registry=build_registry(store))
    return server
