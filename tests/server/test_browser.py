"""The dashboard in real headless Chromium (Debian's `chromium`, driven by Playwright) against
a real `durable-yaml serve` and a real worker: the runs list, a failed run's attempts and
error, approving a waiting human step, cancelling a running run. The phone and desktop
layouts, the trigger form, resume and replay links, live updates, tag search, bulk cancel
and queue pause are in test_dashboard_browser.py (which shares these fixtures)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.service import Engine
from engine.settings import resolve_settings
from tests.conftest import ROOT

FLOWS = Path(__file__).parent / "flows"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_and_work(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    """`durable-yaml serve` and `durable-yaml worker` on a fresh SQLite database of FLOWS."""
    db = f"sqlite:///{tmp_path}/state.db"
    env = {
        **os.environ,
        "DURABLE_YAML_DB": db,
        "DURABLE_YAML_MODULES": "uisteps",
        "DURABLE_YAML_WORKFLOWS": str(FLOWS),
        "PYTHONPATH": f"{ROOT}:{FLOWS}",
    }
    env.pop("DURABLE_YAML_API_KEY", None)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "engine", "worker", "--no-schedules"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    engine = Engine(resolve_settings(db=db, workflows=str(FLOWS)), import_steps=False)
    try:
        yield base, engine
    finally:
        engine.close()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    with serve_and_work(tmp_path) as s:
        yield s


@contextmanager
def chromium() -> Iterator[object]:
    """Headless Debian chromium, driven by Playwright: the Browser."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page() -> Iterator[object]:
    with chromium() as browser:
        yield browser.new_page()  # type: ignore[attr-defined]


def wait_status(engine: Engine, run_id: str, status: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if engine.store.get_run(run_id).status.value == status:
            return
        time.sleep(0.1)
    raise AssertionError(
        f"run {run_id} is {engine.store.get_run(run_id).status.value}, not {status}"
    )


def test_runs_list_and_a_failed_run(stack: tuple[str, Engine], page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    base, engine = stack
    (run_id,) = engine.send_event("boom.requested", {}).run_ids
    wait_status(engine, run_id, "failed")
    page.goto(base + "/")
    row = page.locator(f"tr.run-row:has(a[href='/runs/{run_id}'])")
    expect(row).to_contain_text("boom")
    expect(row.locator(".badge")).to_have_text("failed")
    row.locator("a.run-id").click()
    expect(page.locator("#run-status")).to_have_text("failed")
    expect(page.locator("#run-error")).to_contain_text(
        "step call_upstream failed: ConnectionError: upstream refused the connection"
    )
    attempts = page.locator("tr.step[data-step='call_upstream'] details.attempt")
    expect(attempts).to_have_count(2)
    expect(attempts.nth(0)).to_contain_text("attempt 1: failed")
    attempts.nth(1).locator("summary").click()
    # the traceback as #13 wants it: the user's own frame, the engine's dropped
    expect(attempts.nth(1).locator("pre")).to_contain_text("uisteps.py:13 in always_fails")
    expect(attempts.nth(1).locator("pre")).not_to_contain_text("executor.py")
    expect(page.locator("svg.timeline rect.seg-failed")).to_have_count(2)
    # the step before was skipped, the one after never ran: neither is "pending"
    expect(page.locator("tr.step[data-step='only_when_asked'] .step-status")).to_have_text(
        "skipped"
    )
    expect(page.locator("tr.step[data-step='tell_someone'] .step-status")).to_have_text(
        "not reached"
    )


def test_approve_a_waiting_human_step(stack: tuple[str, Engine], page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    base, engine = stack
    (run_id,) = engine.send_event("review.requested", {}).run_ids
    wait_status(engine, run_id, "waiting")
    page.goto(f"{base}/runs/{run_id}")
    expect(page.locator("#human-step")).to_contain_text("Waiting for a person")
    page.fill("#human-step input[name=comment]", "looks good")
    page.click("#approve")
    expect(page.locator("#run-status")).to_have_text("completed", timeout=20000)
    run = engine.store.get_run(run_id)
    assert run.output == {"approved": True, "comment": "looks good"}
    expect(page.locator("#output")).to_contain_text('"approved": true')


def test_cancel_a_running_run(stack: tuple[str, Engine], page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    base, engine = stack
    (run_id,) = engine.send_event("slow.requested", {}).run_ids
    wait_status(engine, run_id, "running")
    page.goto(f"{base}/runs/{run_id}")
    page.click("#cancel")
    expect(page.locator("#run-status")).to_have_text("cancelled", timeout=20000)
    steps = {s.step_key for s in engine.store.get_steps(run_id)}
    assert "third" not in steps
