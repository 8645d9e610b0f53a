"""Claim latency of 4 busy worker processes, without and beside a purge, on SQLite and
PostgreSQL (#12: "a purge running beside 4 busy workers delays no claim by more than 100 ms").

Four real `durable-yaml worker --concurrency 2 --metrics-port P` processes execute one-step runs
(10 ms of work each) that a feeder here keeps queued. Each worker times every claim
(`durable_yaml_claim_latency_seconds`, claimed or empty); the histograms of all four are
scraped from their /metrics before and after each phase, so the numbers are the workers' own,
taken on their real hot path:

1. without a purge, for BENCH_PURGE_QUIET seconds (default 15);
2. beside a purge, in this process, of BENCH_PURGE_RUNS finished runs (default 50,000, each
   with a step row and a tag, generated inside the database a day old, so the workers' own
   retention leaves them alone).

Printed per phase: claims, how many took over 100 ms (the target: none) and over 250 ms, the
p99 and median as the bucket they fall in, and the purge's rate. The phases repeat
BENCH_PURGE_REPEAT times (default 1) and each number is printed per repeat.
PostgreSQL: `DURABLE_YAML_BENCH_PURGE_PG` (default postgresql://postgres@127.0.0.1:5432/
hb_purge, created if missing).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_ops import fresh, pg_url, populate  # noqa: E402
from engine.models import RunFilter, RunStatus  # noqa: E402
from engine.service import Engine  # noqa: E402
from engine.settings import resolve_settings  # noqa: E402

FLOWS = ROOT / "bench" / "purgeflows"
WORKERS = 4
RUNS = int(os.environ.get("BENCH_PURGE_RUNS", "50000"))
QUIET = float(os.environ.get("BENCH_PURGE_QUIET", "15"))
REPEAT = int(os.environ.get("BENCH_PURGE_REPEAT", "1"))
DEPTH = 400  # the feeder keeps at least this many runs queued
DAY = 86400.0

Histogram = dict[float, float]  # upper bound -> cumulative count (all four workers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(ports: list[int]) -> Histogram:
    total: Histogram = {}
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        for family in text_string_to_metric_families(text.decode()):
            if family.name != "durable_yaml_claim_latency_seconds":
                continue
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    total[le] = total.get(le, 0.0) + sample.value
    return total


def summary(before: Histogram, after: Histogram) -> str:
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    bounds = sorted(delta)
    n = delta[float("inf")]

    def quantile(q: float) -> str:
        for le in bounds:
            if delta[le] >= q * n:
                return "> 5 s" if le == float("inf") else f"<= {le * 1000:g} ms"
        return "?"

    over_100 = n - delta[0.1]
    over_250 = n - delta[0.25]
    return (
        f"{n:,.0f} claims, {over_100:,.0f} over 100 ms ({over_100 / max(n, 1):.2%}), "
        f"{over_250:,.0f} over 250 ms; median {quantile(0.5)}, p99 {quantile(0.99)}"
    )


class Feeder(threading.Thread):
    """Keeps DEPTH runs of `busy` queued, 200 to a transaction."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(daemon=True)
        self.engine, self.stop, self.sent = engine, threading.Event(), 0

    def run(self) -> None:
        engine = self.engine
        machine = engine.workflow("busy")
        while not self.stop.is_set():
            if engine.count_runs(RunFilter(statuses=(RunStatus.QUEUED,))) < DEPTH:
                now = engine.store.now()
                payload, trigger = engine.initial_payload(machine, {}, now)
                news = [engine.new_run(machine, payload, trigger, now=now) for _ in range(200)]
                engine.store.send(news, now)
                self.sent += len(news)
            self.stop.wait(0.05)


def bench(name: str, url: str) -> None:
    base = fresh(url)
    base.close()
    engine = Engine(resolve_settings(db=url, workflows=str(FLOWS)), import_steps=False)
    feeder = Feeder(engine)
    feeder.start()
    while feeder.sent == 0:
        time.sleep(0.05)
    ports = [free_port() for _ in range(WORKERS)]
    command = [sys.executable, "-m", "engine", "worker", "--db", url, "--workflows", str(FLOWS)]
    command += ["-m", "bench.purgeflows.busysteps", "--concurrency", "2"]
    workers = [
        subprocess.Popen(
            [*command, "--metrics-port", str(port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                scrape(ports)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        time.sleep(3)  # the workers are warm
        for repeat in range(1, REPEAT + 1):
            one = scrape(ports)
            time.sleep(QUIET)
            two = scrape(ports)
            print(f"{name} #{repeat}: without a purge ({QUIET:.0f} s): {summary(one, two)}")
            populate(engine, RUNS, queued=0, base=engine.store.now() - 2 * DAY - RUNS)
            # generating them is one long transaction of this benchmark's, not of the engine
            # (a claim meeting it waits its 0.1-1 s): the claims it delayed are in neither phase
            time.sleep(2)
            three = scrape(ports)
            started = time.perf_counter()
            purged = engine.purge(DAY, [RunStatus.COMPLETED])
            took = time.perf_counter() - started
            four = scrape(ports)
            print(
                f"{name} #{repeat}: beside a purge of {purged:,} runs in {took:.1f} s "
                f"({purged / took:,.0f} runs/s): {summary(three, four)}"
            )
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
        feeder.stop.set()
        feeder.join()
        print(f"{name}: {feeder.sent:,} runs fed to the workers")
        engine.close()


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-purge-"))
    which = sys.argv[1:] or ["sqlite", "postgresql"]
    if "sqlite" in which:
        bench("SQLite", f"sqlite:///{folder}/purge.db")
    if "postgresql" in which:
        url = pg_url("DURABLE_YAML_BENCH_PURGE_PG", "postgresql://postgres@127.0.0.1:5432/hb_purge")
        if url is not None:
            bench("PostgreSQL", url)


if __name__ == "__main__":
    main()
