"""`engine.testing` and `durable-yaml test`: the seed's examples on a virtual clock, hours of
virtual time in well under a second of real time, with the same machines and store code."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from engine.testing import Env
from tests.conftest import ROOT, cli

WORKFLOWS = str(ROOT / "workflows")


def test_the_hourly_reports_retries_on_the_virtual_clock(
    workflow_env: Callable[..., Env],
) -> None:
    started = time.perf_counter()
    env = workflow_env(workflows=WORKFLOWS, modules=["workflows.steps"], project_dir=str(ROOT))
    env.stub("analytics.fetch", [ConnectionError("down"), {"visits": 3}])
    before = env.now()
    run = env.start("hourly-report", payload={"timestamp": "2026-01-01T00:30:00Z"})
    assert run.status == "waiting"  # backing off after the first failure
    env.advance("1h")
    assert run.status == "completed" and run.output == {"visits": 3}
    assert run.steps["fetch_analytics"].attempts == 2
    assert env.now() - before >= 3600
    assert time.perf_counter() - started < 1.0


def test_a_human_review_two_hours_of_waiting_in_no_time(workflow_env: Callable[..., Env]) -> None:
    started = time.perf_counter()
    env = workflow_env(workflows=WORKFLOWS, modules=["workflows.steps"], project_dir=str(ROOT))
    run = env.start("ai-pipeline", {"episode_id": "ep7", "audio_url": "https://x/ep7.mp3"})
    assert run.status == "waiting" and run.run.current_step == "review"
    env.advance("119m")
    assert run.status == "waiting"  # its 2 h timeout has not come yet
    env.send_event("review.completed", {"episode_id": "ep7", "approved": True})
    assert run.status == "completed"
    assert run.steps["publish"].status.value == "completed"
    assert time.perf_counter() - started < 1.0


def test_a_review_that_never_comes_times_out(workflow_env: Callable[..., Env]) -> None:
    env = workflow_env(workflows=WORKFLOWS, modules=["workflows.steps"], project_dir=str(ROOT))
    run = env.start("ai-pipeline", {"episode_id": "ep8", "audio_url": "https://x/ep8.mp3"})
    env.run_until_idle()
    assert run.status == "failed" and "TimeoutError" in (run.error or "")
    assert any("Pipeline for ep8 failed" in line.message for line in run.logs)


def test_cron_fires_as_the_clock_passes_them(workflow_env: Callable[..., Env]) -> None:
    env = workflow_env(
        workflows=WORKFLOWS, modules=["workflows.steps"], project_dir=str(ROOT), schedules=True
    )
    env.stub("analytics.fetch", [{"visits": 1}])
    env.advance("3h")
    reports = env.engine.store.list_runs(workflow_id="hourly-report")
    assert len(reports) == 3 and all(r.status.value == "completed" for r in reports)
    stamps = sorted(r.payload["timestamp"][11:16] for r in reports)
    assert all(s.endswith(":30") for s in stamps)


def test_stubs_are_put_back(workflow_env: Callable[..., Env]) -> None:
    from engine.registry import get_step

    original = get_step("analytics.fetch").fn
    env = workflow_env(workflows=WORKFLOWS, modules=["workflows.steps"], project_dir=str(ROOT))
    env.stub("analytics.fetch", [{"visits": 1}])
    assert get_step("analytics.fetch").fn is not original
    env.close()
    assert get_step("analytics.fetch").fn is original


def test_the_test_command_runs_every_example_test() -> None:
    done = cli("test", cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 passed, 0 failed" in done.stdout
    assert "Traceback" not in done.stderr


def test_a_failing_test_file_prints_its_difference_and_exits_1(tmp_path: Path) -> None:
    text = (ROOT / "workflows/tests/hourly-report.test.yaml").read_text()
    bad = tmp_path / "bad.test.yaml"
    bad.write_text(text.replace("attempts: 3", "attempts: 2"))
    done = cli("test", str(bad), cwd=ROOT)
    assert done.returncode == 1
    assert (
        "FAIL" in done.stdout and "steps.fetch_analytics.attempts: expected 2, got 3" in done.stdout
    )
    broken = tmp_path / "broken.test.yaml"
    broken.write_text("workflow: hourly-report\nexpekt: {}\n")
    done = cli("test", str(broken), cwd=ROOT)
    assert done.returncode == 1 and "unknown key(s) ['expekt']" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_test_files_are_not_workflows() -> None:
    done = cli("validate", cwd=ROOT)
    assert done.returncode == 0, done.stdout


def test_init_writes_a_first_test_that_passes(tmp_path: Path) -> None:
    assert cli("init", str(tmp_path / "proj"), cwd=tmp_path).returncode == 0
    done = cli("test", cwd=tmp_path / "proj")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout and "1 passed, 0 failed" in done.stdout


def test_malformed_test_files_fail_with_a_message(tmp_path: Path) -> None:
    head = "workflow: hourly-report\n"
    bomb = (
        head
        + 'expect:\n  output:\n    z0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    )
    for i in range(1, 9):
        bomb += f"    z{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]\n"
    files = {
        "events": head + "events: [5]\n",
        "stubs": head + "stubs: [1, 2]\n",
        "steps": head + "expect: {steps: 5}\n",
        "logs": head + "expect: {logs_contain: 5}\n",
        "deep": head + "payload: " + "[" * 5000 + "]" * 5000 + "\n",
        "bomb": bomb,
    }
    for name, text in files.items():
        (tmp_path / f"{name}.test.yaml").write_text(text)
    started = time.perf_counter()
    done = cli("test", str(tmp_path), cwd=ROOT)
    assert done.returncode == 1 and "0 passed, 6 failed" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert time.perf_counter() - started < 20
