"""Chaos: a PostgreSQL cluster of this test's own (initdb on port 55433 in a temporary
folder) is crash-restarted with `pg_ctl -m immediate` three times while three real worker
processes execute 3-step runs. Every run completes with the right output, every worker
stays up (and exits cleanly on SIGTERM at the end), workers go on executing after the last
restart, and steps executed more than once are bounded by the steps in flight at the
crashes (3 crashes x 12 executors)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.models import RunStatus
from engine.service import Engine
from engine.settings import resolve_settings
from tests.engine.test_clock_skew import calls, project, start_worker, wait_for

PORT = 55433
RUNS = 90
CRASHES = 3


def _as_postgres(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = list(args)
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=60)


class Cluster:
    def __init__(self, folder: Path, pg_ctl: str) -> None:
        self.folder, self.pg_ctl = folder, pg_ctl
        self.data = folder / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{PORT}/postgres"

    def start(self) -> None:
        options = f"-p {PORT} -k {self.folder} -c listen_addresses=127.0.0.1"
        log = str(self.folder / "pg.log")
        _as_postgres(self.pg_ctl, "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def crash(self, check: bool = True) -> None:
        _as_postgres(
            self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop", check=check
        )

    def crash_restart(self) -> None:
        self.crash()
        time.sleep(1.0)  # the workers find the database gone
        self.start()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("initdb/pg_ctl are not installed: the chaos test needs its own cluster")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a `postgres` user to own a cluster")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to start a cluster as postgres")
    Path("/tmp/dy-chaos").mkdir(exist_ok=True)
    os.chmod("/tmp/dy-chaos", 0o777)
    folder = Path(tempfile.mkdtemp(prefix="cluster-", dir="/tmp/dy-chaos"))
    os.chmod(folder, 0o777)
    c = Cluster(folder, pg_ctl)
    _as_postgres(initdb, "-D", str(c.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    c.start()
    try:
        yield c
    finally:
        c.crash(check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_workers_survive_three_crash_restarts_under_load(tmp_path: Path, cluster: Cluster) -> None:
    url = cluster.url
    env, engine = project(tmp_path, url, ("pipeline.yaml",))
    env["CLUSTER_STEP_SECONDS"] = "0.15"
    for n in range(RUNS):
        engine.send_event("cluster.go", {"n": n})
    engine.close()
    workers = [start_worker(tmp_path, env, f"w{i}", lease="5") for i in range(3)]
    restarted_at = 0.0
    try:
        wait_for(lambda: len(calls(tmp_path)) >= 20, 30)
        for _ in range(CRASHES):
            cluster.crash_restart()
            restarted_at = time.time()
            done = len(calls(tmp_path))
            wait_for(lambda done=done: len(calls(tmp_path)) >= done + 15, 30)  # type: ignore[misc]
        engine = Engine(
            resolve_settings(db=url, workflows=env["DURABLE_YAML_WORKFLOWS"]), import_steps=False
        )
        wait_for(
            lambda: (
                sum(
                    r.status == RunStatus.COMPLETED for r in engine.store.list_runs(limit=RUNS + 10)
                )
                == RUNS
            ),
            60,
        )
        assert [w.poll() for w in workers] == [None, None, None], "every worker stayed up"
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(30) for w in workers]
    outs = "\n".join((tmp_path / f"w{i}.out").read_text()[-1500:] for i in range(3))
    assert codes == [0, 0, 0], outs
    runs = engine.store.list_runs(limit=RUNS + 10)
    assert len(runs) == RUNS
    assert all(r.output == {"n": r.payload["n"], "result": r.payload["n"] * 2 + 2} for r in runs)
    logged = calls(tmp_path)
    assert {(c["run"], c["step"]) for c in logged} == {
        (r.id, s) for r in runs for s in ("first", "second", "third")
    }
    executed = Counter((c["run"], c["step"]) for c in logged)
    again = sum(n - 1 for n in executed.values())
    assert again <= CRASHES * 12, again
    assert any(c["start"] > restarted_at for c in logged), "work went on after the last restart"
    assert len({c["pid"] for c in logged}) == 3
    recoveries = (cluster.folder / "pg.log").read_text().count("automatic recovery in progress")
    assert recoveries == CRASHES, "each crash was a real one: the server recovered from WAL"
    print(f"steps executed again after {CRASHES} crashes: {again}")
    engine.close()
