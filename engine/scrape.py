"""What a metrics scrape reads from the database: runs by workflow and status, queues,
live workers (one `metrics_snapshot` per scrape). Imported only by a process that serves
metrics (see metrics.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import EngineError
from .store import Store

__all__ = ["StoreCollector"]

log = logging.getLogger("durable_yaml.metrics")


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
