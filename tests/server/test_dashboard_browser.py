"""The dashboard in real headless Chromium against a real server, worker and SQLite database
(one of each for this module): every page fits a 390 px phone and a 1280 px desktop, the
trigger form, resume and replay links, live updates over Server-Sent Events, tag search, bulk
cancel (selected and by filter) and queue pause."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.models import RunFilter, RunStatus
from engine.service import Engine
from tests.server.test_browser import CHROMIUM, chromium, serve_and_work, wait_status

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
)
HOUR = 3600.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Engine]]:
    with serve_and_work(tmp_path_factory.mktemp("dash")) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def phone(browser: Any) -> Iterator[Any]:
    page = browser.new_page(viewport={"width": 390, "height": 844})
    yield page
    page.close()


@pytest.fixture
def desktop(browser: Any) -> Iterator[Any]:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    yield page
    page.close()


def _fits(page: Any) -> None:
    """No horizontal overflow, and the header's links all inside the viewport."""
    width, inner = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
    assert width <= inner, f"{page.url} is {width} px wide in a {inner} px window"
    for box in page.locator("header a").all():
        b = box.bounding_box()
        assert b is not None and b["x"] >= 0 and b["x"] + b["width"] <= inner, page.url


def test_every_page_fits_a_phone_and_a_desktop(
    stack: tuple[str, Engine], phone: Any, desktop: Any
) -> None:
    from playwright.sync_api import expect

    base, engine = stack
    (failed,) = engine.send_event("boom.requested", {}).run_ids
    (waiting,) = engine.send_event("review.requested", {}).run_ids
    long = {"title": "word " * 200 + "x" * 400, "count": 2, "tags": ["t"] * 30}
    (done,) = engine.send_event("form.requested", long).run_ids
    for run_id, status in ((failed, "failed"), (waiting, "waiting"), (done, "completed")):
        wait_status(engine, run_id, status)
    replay = engine.queue_replay(failed)
    pages = ["/", f"/runs/{failed}", f"/runs/{waiting}", f"/runs/{done}", f"/runs/{replay}"]
    pages += ["/workflows", "/workflows/form", "/workflows/boom", "/schedules", "/queues"]
    pages += ["/workers", "/?tag=a:b&since=1h", "/login", "/runs/nope"]
    for page in (phone, desktop):
        for path in pages:
            page.goto(base + path)
            _fits(page)
    # the phone's runs page: stacked rows, current step and what a waiting run waits for
    phone.goto(base + "/")
    expect(phone.locator("#runs thead")).to_be_hidden()
    row = phone.locator(f"tr.run-row[data-id='{waiting}']")
    expect(row.locator(".current-step")).to_have_text("approval")
    expect(row.locator(".waits")).to_contain_text("a person (token)")
    created = row.locator("td[data-label='Created'] time")
    text = created.inner_text()
    assert text.endswith(" ago") or text == "just now", text
    assert (created.get_attribute("title") or "").endswith(" UTC")
    # a run's long output wraps inside the phone's width
    phone.goto(f"{base}/runs/{done}")
    out = phone.locator("#output").bounding_box()
    assert out is not None and out["width"] > 300 and out["x"] + out["width"] <= 390
    # every diagram label fits its box; retries and waits are drawn
    desktop.goto(base + "/workflows")
    misfits = desktop.evaluate(
        """[...document.querySelectorAll("svg.machine g.state")].filter((g) => {
             const room = g.querySelector("rect").width.baseVal.value - 10
               - (g.classList.contains("wait") ? 26 : 0);
             return g.querySelector("text.label").getComputedTextLength() > room;
           }).map((g) => g.dataset.step)"""
    )
    assert misfits == []
    boom = desktop.locator("#wf-boom svg.machine")
    expect(boom.locator("g.state[data-step='call_upstream'] path.retry-loop")).to_have_count(1)
    expect(boom.locator("g.state[data-step='call_upstream'] .retry-count")).to_have_text("\u00d72")
    expect(boom.locator("g.state[data-step='tell_someone'] path.retry-loop")).to_have_count(0)
    expect(desktop.locator("#wf-review g.state.wait[data-step='approval'] .clock")).to_have_count(1)
    # the workers page lists the live worker with its heartbeat
    desktop.goto(base + "/workers")
    expect(desktop.locator("tr.worker")).to_have_count(1)
    expect(desktop.locator("tr.worker td[data-label='Last heartbeat'] time")).to_have_count(1)


def test_trigger_form_then_live_updates(stack: tuple[str, Engine], desktop: Any) -> None:
    from playwright.sync_api import expect

    base, engine = stack
    page = desktop
    page.goto(base + "/workflows/form")
    before = engine.count_runs(RunFilter(workflow_id="form"))
    # a value the schema refuses: the form again, naming the field; nothing stored
    page.fill("#f-title", "ab")
    page.fill("#f-count", "3")
    page.click("#start")
    expect(page.locator("#trigger-error")).to_contain_text("payload.title")
    expect(page.locator("#f-count")).to_have_value("3")
    assert engine.count_runs(RunFilter(workflow_id="form")) == before
    page.fill("#f-title", "accepted")
    # inputs from the schema, the JSON textarea for the array, tags
    page.select_option("#f-urgent", "true")
    page.select_option("#f-size", "large")
    page.fill("#payload", '{"tags": ["a", "b"]}')
    page.fill("#tags", "team:web")
    page.click("#start")
    page.wait_for_url(f"{base}/runs/*")
    run_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#run-status")).to_have_text("completed", timeout=20000)
    run = engine.store.get_run(run_id)
    assert run.payload == {
        "title": "accepted",
        "count": 3,
        "urgent": True,
        "size": "large",
        "tags": ["a", "b"],
    }
    assert run.tags == ("team:web",)
    # a waiting run's page follows it over SSE when it moves on, without reloading
    (waiting,) = engine.send_event("review.requested", {}).run_ids
    wait_status(engine, waiting, "waiting")
    page.goto(f"{base}/runs/{waiting}")
    expect(page.locator("#live")).to_have_attribute("data-state", "open")
    page.evaluate("window.notReloaded = true")
    (token,) = [s.wait["token"] for s in engine.store.get_steps(waiting) if s.wait]
    engine.complete_token(token, {"approved": True, "comment": "from elsewhere"})
    expect(page.locator("#run-status")).to_have_text("completed", timeout=20000)
    expect(page.locator("#output")).to_contain_text("from elsewhere")
    assert page.evaluate("window.notReloaded") is True
    # the runs page gets a run sent after it was opened, over its change stream
    page.goto(base + "/?workflow=form")
    expect(page.locator("#live")).to_have_attribute("data-state", "open")
    (new,) = engine.send_event("form.requested", {"title": "late", "count": 1}).run_ids
    expect(page.locator(f"tr.run-row[data-id='{new}']")).to_have_count(1, timeout=10000)


def test_resume_a_failed_run_and_replay_links(
    stack: tuple[str, Engine], desktop: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    base, engine = stack
    page = desktop
    flag = tmp_path / "fixed"
    (run_id,) = engine.send_event("flaky.requested", {"flag": str(flag)}).run_ids
    wait_status(engine, run_id, "failed")
    page.goto(f"{base}/runs/{run_id}")
    expect(page.locator("tr.step[data-step='done'] .step-status")).to_have_text("not reached")
    flag.write_text("the cause is fixed")
    page.click("#resume")
    expect(page.locator("#run-status")).to_have_text("completed", timeout=20000)
    assert engine.store.get_run(run_id).output == "found"
    attempts = {s.step_key: s.attempts for s in engine.store.get_steps(run_id)}
    assert attempts["needs_flag"] == 2  # one more attempt, history kept
    expect(page.locator("#resume")).to_have_count(0)
    # replay: the new run links to its original, and the original to it
    page.click("#replay")
    expect(page.locator("#replay-of a")).to_have_text(run_id)
    replay_id = page.url.rsplit("/", 1)[1]
    page.click("#replay-of a")
    expect(page.locator(f"#replays a[href='/runs/{replay_id}']")).to_have_count(1)


def test_tag_search_and_bulk_cancel(stack: tuple[str, Engine], phone: Any) -> None:
    from playwright.sync_api import expect

    base, engine = stack
    page = phone  # on a phone, where approvals and emergencies happen
    acme = [
        engine.trigger("later", {}, delay=HOUR, tags=["customer:acme", f"n:{i}"]).run_ids[0]
        for i in range(3)
    ]
    other = engine.trigger("later", {}, delay=HOUR, tags=["customer:other"]).run_ids[0]
    page.goto(base + "/")
    page.fill("#tag", "customer:acme")
    page.click("#search")
    rows = page.locator("tr.run-row")
    expect(rows).to_have_count(3)
    expect(page.locator(f"tr.run-row[data-id='{acme[0]}'] .waits")).to_contain_text("delayed")
    _fits(page)
    # two selected: the confirmation names the count, then exactly those are cancelled
    page.check(f"tr.run-row[data-id='{acme[0]}'] input.pick")
    page.check(f"tr.run-row[data-id='{acme[1]}'] input.pick")
    expect(page.locator("#bulk-scope")).to_have_text("2 selected")
    page.click("#bulk-cancel")
    expect(page.locator("h1")).to_have_text("Cancel 2 runs?")
    _fits(page)
    page.click("#confirm")
    expect(page.locator("#notice")).to_have_text("Cancelled 2 runs.")
    status = {i: engine.store.get_run(i).status for i in [*acme, other]}
    assert status == {
        acme[0]: RunStatus.CANCELLED,
        acme[1]: RunStatus.CANCELLED,
        acme[2]: RunStatus.QUEUED,
        other: RunStatus.QUEUED,
    }
    # nothing selected: the filter's active runs (one left), after confirming
    expect(page.locator("#bulk-scope")).to_have_text("all runs matching the filter")
    page.click("#bulk-cancel")
    expect(page.locator("#bulk-count")).to_contain_text("1 run matching")
    page.click("#confirm")
    expect(page.locator("#notice")).to_have_text("Cancelled 1 run.")
    assert engine.store.get_run(acme[2]).status == RunStatus.CANCELLED
    assert engine.store.get_run(other).status == RunStatus.QUEUED
    engine.cancel_runs(RunFilter(ids=(other,)))


def test_queue_pause_and_resume(stack: tuple[str, Engine], desktop: Any) -> None:
    from playwright.sync_api import expect

    base, engine = stack
    page = desktop
    page.on("dialog", lambda dialog: dialog.accept())
    engine.save_all_definitions()  # the queue exists before its first run
    page.goto(base + "/queues")
    row = page.locator("tr.queue[data-queue='pausable']")
    row.locator("button.queue-pause").click()
    expect(row.locator(".queue-state")).to_have_text("paused")
    (run_id,) = engine.send_event("pausable.requested", {}).run_ids
    page.goto(f"{base}/runs/{run_id}")
    expect(page.locator("#blocked-by")).to_contain_text("queue pausable is paused")
    time.sleep(1.0)  # a worker polling now would have started it: it did not
    assert engine.store.get_run(run_id).status == RunStatus.QUEUED
    page.goto(base + "/queues")
    row.locator("button.queue-resume").click()
    expect(row.locator(".queue-state")).to_have_text("active")
    page.goto(f"{base}/runs/{run_id}")
    expect(page.locator("#run-status")).to_have_text("completed", timeout=20000)
