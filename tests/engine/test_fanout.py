"""for_each with run_workflow on SQLite and PostgreSQL: one child run per item, at most
`concurrency` active at once, listed under the parent, outputs in item order; a failed child
fails the step and withdraws its active brothers; SIGKILL inside the commit that starts
children, and inside a child, resumes without starting a child twice or losing one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.models import RunStatus
from engine.registry import import_modules
from engine.runner import Runner
from engine.service import Engine
from engine.settings import resolve_settings
from engine.store import open_store
from engine.views import run_detail
from tests.conftest import ROOT

FLOWS = Path(__file__).parent / "fanflows"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["fansteps"], str(FLOWS))
    e = Engine(resolve_settings(db=db_url, workflows=str(FLOWS)), import_steps=False)
    assert e.catalog.problems == []
    yield e
    e.close()


def worker(engine: Engine) -> Runner:
    return Runner(engine.store, foreground=False, host=engine)


def start(engine: Engine, items: list[int], foreground: bool = False) -> str:
    machine = engine.workflow("kids")
    payload = {"items": items}
    new = engine.new_run(machine, payload, {"kind": "manual"})
    runner = engine.runner() if foreground else worker(engine)
    return runner.start(machine, payload, new=new).id


def children(engine: Engine, run_id: str) -> list[Any]:
    return engine.store.list_runs(parent_run_id=run_id, limit=1000)


def test_children_run_in_item_order_at_most_three_at_once(engine: Engine) -> None:
    items = [3, 1, 4, 1, 5, 9, 2, 6]
    run_id = start(engine, items)
    most = 0
    for _ in range(20):  # workers: the children that are due, then the parent
        active = [k for k in children(engine, run_id) if not k.finished]
        most = max(most, len(active))
        for kid in active[:2]:  # not all at once: the parent starts more as they end
            worker(engine).drive(kid.id)
        parent = worker(engine).drive(run_id)
        if parent.finished:
            break
    assert parent.status == RunStatus.COMPLETED
    assert parent.output == [n * n for n in items]
    assert most == 3
    kids = children(engine, run_id)
    assert len(kids) == len(items)
    assert sorted((k.parent_step, k.payload["n"]) for k in kids) == sorted(
        (f"fan[{i}]", n) for i, n in enumerate(items)
    )
    detail = run_detail(engine.store, parent)
    assert sorted(detail["children"]) == sorted(k.id for k in kids)
    assert {run_detail(engine.store, k)["parent_run_id"] for k in kids} == {run_id}
    logs = [entry.message for entry in engine.store.get_logs(run_id)]
    assert f"sum {sum(n * n for n in items)}" in logs


def test_the_foreground_run_executes_the_children_inline(engine: Engine) -> None:
    run_id = start(engine, [1, 2, 3, 4, 5], foreground=True)
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.COMPLETED and run.output == [1, 4, 9, 16, 25]
    assert all(k.status == RunStatus.COMPLETED for k in children(engine, run_id))


def test_an_empty_list_starts_nothing(engine: Engine) -> None:
    run_id = start(engine, [])
    run = engine.store.get_run(run_id)
    assert run.status == RunStatus.COMPLETED and run.output == []
    assert children(engine, run_id) == []


def test_a_failed_child_fails_the_step_and_cancels_its_active_brothers(engine: Engine) -> None:
    run_id = start(engine, [1, -1, 3, 4, 5])
    kids = {k.payload["n"]: k for k in children(engine, run_id)}
    assert sorted(kids) == [-1, 1, 3]  # concurrency 3
    assert worker(engine).drive(kids[-1].id).status == RunStatus.FAILED
    parent = worker(engine).drive(run_id)
    assert parent.status == RunStatus.FAILED
    assert parent.error is not None
    assert parent.error.startswith(f"step fan failed: ChildFailed: item 1: child run {kids[-1].id}")
    assert "negative input -1" in parent.error
    after = {k.payload["n"]: k.status for k in children(engine, run_id)}
    assert after == {
        1: RunStatus.CANCELLED,
        -1: RunStatus.FAILED,
        3: RunStatus.CANCELLED,
    }  # and items 4 and 5 never started


def test_an_answer_that_comes_while_the_parent_parks_is_not_missed(engine: Engine) -> None:
    """A child ends between the parent's reading of the answers and its park: the park
    counts the answers under the run's lock and keeps going."""
    from engine.pauses import pause_at

    run_id = start(engine, [1, 2])
    kids = children(engine, run_id)
    worker(engine).drive(kids[0].id)
    done: list[str] = []

    def finish_the_other() -> None:
        if not done:
            done.append(kids[1].id)
            worker(engine).drive(kids[1].id)

    with pause_at("runner.before_commit.waiting", finish_the_other):
        parent = worker(engine).drive(run_id)
    assert parent.status == RunStatus.COMPLETED and parent.output == [1, 4]


def _env(tmp_path: Path, db_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "FAN_LOG": str(tmp_path / "calls.log"),
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "fansteps",
        "DURABLE_YAML_WORKFLOWS": str(FLOWS),
        "PYTHONPATH": str(ROOT),
        "NO_COLOR": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def _cli(tmp_path: Path, db_url: str, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine", *args],
        cwd=FLOWS,
        env=_env(tmp_path, db_url, **extra),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_sigkill_in_the_fan_out_starts_no_child_twice_and_loses_none(
    tmp_path: Path, db_url: str
) -> None:
    items = [1, 2, 3, 4, 5, 6, 7]
    payload = json.dumps({"items": items})
    # 1. killed inside the commit that starts the first children: all written, not committed
    first = _cli(
        tmp_path, db_url, "run", "kids", "--payload", payload,
        DURABLE_YAML_PAUSE="store.commit.written=60",
    )  # fmt: skip
    store = open_store(db_url)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not store.list_runs():
            time.sleep(0.05)
        time.sleep(1.5)  # it reaches the commit and sleeps there
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        (parent,) = store.list_runs()
        assert store.list_runs(parent_run_id=parent.id) == []  # nothing was committed
        # 2. killed while the child of item 5 works; 3. resumed to the end
        second = _cli(tmp_path, db_url, "resume", parent.id, FAN_KILL_AT="5")
        second.wait(timeout=60)
        assert second.returncode == -signal.SIGKILL, second.stderr.read()  # type: ignore[union-attr]
        third = _cli(tmp_path, db_url, "resume", parent.id)
        out, err = third.communicate(timeout=60)
        assert third.returncode == 0, out + err
        run = store.get_run(parent.id)
        kids = store.list_runs(parent_run_id=parent.id, limit=100)
        steps = {s.step_key: s for s in store.get_steps(parent.id)}
    finally:
        store.close()
    assert run.status == RunStatus.COMPLETED and run.output == [n * n for n in items]
    assert len(kids) == len(items)  # one child per item: none twice, none lost
    assert sorted(k.parent_step for k in kids) == sorted(f"fan[{i}]" for i in range(len(items)))
    assert steps["fan"].attempts == 2  # the first attempt died in its commit
    calls = [json.loads(line)["n"] for line in (tmp_path / "calls.log").read_text().splitlines()]
    assert sorted(calls) == sorted([*items, 5])  # only the killed child's step ran again


def test_runs_show_says_how_many_children_have_ended(engine: Engine, db_url: str) -> None:
    from tests.conftest import cli

    run_id = start(engine, [1, 2, 3, 4])
    kid = children(engine, run_id)[0]
    worker(engine).drive(kid.id)
    worker(engine).drive(run_id)
    waiting = run_detail(engine.store, engine.store.get_run(run_id))["waiting"]
    assert (waiting["kind"], waiting["items"], waiting["ended"]) == ("children", 4, 1)
    assert waiting["started"] == 4  # the ended child made room for the fourth
    shown = cli("runs", "show", run_id, env={"DURABLE_YAML_DB": db_url})
    assert "for its child runs: 1 of 4 ended (4 started)" in shown.stdout, shown.stdout


def test_the_timeout_bounds_the_whole_fan_out_on_the_virtual_clock(engine: Engine) -> None:
    machine = engine.workflow("kids-timeout")
    payload = {"items": [1, 2, 3]}
    new = engine.new_run(machine, payload, {"kind": "manual"})
    run_id = worker(engine).start(machine, payload, new=new).id
    first, _ = children(engine, run_id)  # concurrency 2
    worker(engine).drive(first.id)
    (fan,) = [s for s in engine.store.get_steps(run_id) if s.step_key == "fan"]
    assert fan.wake_at is not None
    at = fan.wake_at
    early = Runner(engine.store, foreground=False, host=engine, clock=lambda: at - 1)
    assert early.drive(run_id).status == RunStatus.WAITING  # a round: the third child starts
    assert len(children(engine, run_id)) == 3
    late = Runner(engine.store, foreground=False, host=engine, clock=lambda: at + 1)
    parent = late.drive(run_id)
    assert parent.status == RunStatus.FAILED
    assert parent.error == (
        "step fan failed: TimeoutError: steps.fan timed out after 600s waiting for its "
        "child runs (1 of 3 ended)"
    )
    statuses = sorted(k.status.value for k in children(engine, run_id))
    assert statuses == ["cancelled", "cancelled", "completed"]


def test_a_cancel_while_the_parent_starts_children_cancels_them_too(engine: Engine) -> None:
    """`runs cancel` reads the run's tree of children, then a worker's commit of the parent
    starts the next children and parks it, then the cancel locks the parked parent: the
    children it just started are cancelled with it, none is left running on its own.
    (On SQLite the cancel's transaction holds the write lock from its start: the worker's
    commit comes after it, and finds the parent cancelled.)"""
    import threading

    from engine.pauses import pause_at

    run_id = start(engine, [1, 2, 3, 4, 5])
    kids = children(engine, run_id)
    assert len(kids) == 3
    worker(engine).drive(kids[0].id)  # the parent is claimable: one more child to start
    drove: list[threading.Thread] = []

    def the_parent_goes_on() -> None:
        if not drove:
            thread = threading.Thread(target=lambda: worker(engine).drive(run_id))
            drove.append(thread)
            thread.start()
            thread.join(2.0)  # SQLite: it waits for the cancel's transaction

    with pause_at("store.cancel.tree_read", the_parent_goes_on):
        engine.store.request_cancel(run_id, engine.store.now())
    drove[0].join(10.0)
    assert engine.store.get_run(run_id).status == RunStatus.CANCELLED
    left = {k.id: k.status for k in children(engine, run_id) if not k.finished}
    assert left == {}, f"children left running after their parent was cancelled: {left}"


def test_a_cancel_while_the_parent_is_executing_its_round_leaves_no_child_running(
    engine: Engine,
) -> None:
    """`runs cancel` comes while a worker executes the parent's next round: the parent is
    claimed but still `waiting`, so the cancel ends it at once with its active children and
    takes its lease; the round's commit (which would start the next child) finds the lease
    lost and writes nothing. No child is left running, none is started after the cancel."""
    from engine.errors import LeaseLost
    from engine.pauses import pause_at

    run_id = start(engine, [1, 2, 3, 4, 5])
    first = next(k for k in children(engine, run_id) if k.payload["n"] == 1)
    worker(engine).drive(first.id)
    flagged: list[str] = []

    def cancel_now() -> None:
        if not flagged:
            flagged.append(run_id)
            engine.store.request_cancel(run_id, engine.store.now())

    with pause_at("runner.before_commit.waiting", cancel_now), pytest.raises(LeaseLost):
        worker(engine).drive(run_id)
    assert engine.store.get_run(run_id).status == RunStatus.CANCELLED
    after = {k.payload["n"]: k.status for k in children(engine, run_id)}
    assert after == {1: RunStatus.COMPLETED, 2: RunStatus.CANCELLED, 3: RunStatus.CANCELLED}
