"""The real `durable-yaml` command in a subprocess: bad input gives a clear message, the right
exit code, no traceback and nothing half-written; `runs` shows what SPEC §3 lists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.store import open_store
from tests.conftest import ROOT, cli

FLOWS = Path(__file__).parent / "flows"


@pytest.fixture
def project(tmp_path: Path, db_url: str) -> tuple[Path, dict[str, str]]:
    shutil.copy(FLOWS / "crashsteps.py", tmp_path / "crashsteps.py")
    (tmp_path / "workflows").mkdir()
    shutil.copy(ROOT / "workflows" / "process-image.yaml", tmp_path / "workflows")
    (tmp_path / "workflows" / "steps.py").write_text((ROOT / "workflows" / "steps.py").read_text())
    (tmp_path / "workflows" / "boom.yaml").write_text(
        'id: boom\nversion: "1"\ntrigger: {manual: true}\nsteps:\n'
        '  - id: explode\n    call: t.fail\n    with: {message: "disk full"}\n'
    )
    (tmp_path / "workflows" / "bad_json.yaml").write_text(
        'id: bad-json\nversion: "1"\ntrigger: {manual: true}\nsteps:\n'
        "  - id: make\n    call: t.not_json\n"
    )
    env = {
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "crashsteps,workflows.steps",
        "CRASH_LOG": str(tmp_path / "calls.log"),
        "PYTHONPATH": str(ROOT),
    }
    return tmp_path, env


def _count_runs(env: dict[str, str]) -> int:
    store = open_store(env["DURABLE_YAML_DB"])
    try:
        return len(store.list_runs(limit=1000))
    finally:
        store.close()


def _ok(result: object) -> None:
    out = getattr(result, "stdout", "") + getattr(result, "stderr", "")
    assert "Traceback" not in out, out


def test_run_then_inspect_with_json(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    result = cli(
        "run",
        "process-image",
        "--payload",
        '{"url": "https://a.io/x.png", "userId": "u"}',
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    _ok(result)
    assert "completed run" in result.stdout and "call_image_api" in result.stdout
    listed = json.loads(cli("runs", "list", "--json", cwd=cwd, env=env).stdout)
    assert len(listed) == 1
    assert {"id", "workflow", "version", "status", "created_at", "output", "error"} <= set(
        listed[0]
    )
    shown = json.loads(cli("runs", "show", listed[0]["id"], "--json", cwd=cwd, env=env).stdout)
    assert shown["status"] == "completed" and shown["version"] == "1.0.1"
    steps = {s["id"]: s for s in shown["steps"]}
    assert list(steps) == ["start", "pause", "call_image_api", "done"]
    assert {"id", "status", "attempts", "output", "error"} <= set(steps["pause"])
    assert steps["call_image_api"]["attempts"] == 2
    assert steps["call_image_api"]["attempt_history"][0]["error"].startswith("ConnectionError")
    logs = json.loads(cli("runs", "logs", listed[0]["id"], "--json", cwd=cwd, env=env).stdout)
    assert [entry["step"] for entry in logs] == ["start", "call_image_api", "done"]
    assert logs[1]["extra"] == {"url": "https://a.io/x.png", "attempt": 2}


def test_payload_breaking_the_schema_stores_nothing(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    result = cli("run", "process-image", "--payload", '{"url": 5, "userId": "u"}', cwd=cwd, env=env)
    assert result.returncode == 2
    _ok(result)
    assert (
        "payload for workflow `process-image` is invalid at `payload.url`: 5 is not of type 'string'"
        in result.stderr
    )
    missing = cli("run", "process-image", "--payload", '{"url": "x"}', cwd=cwd, env=env)
    assert missing.returncode == 2 and "'userId' is a required property" in missing.stderr
    assert _count_runs(env) == 0


def test_payload_that_is_not_json(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    result = cli("run", "process-image", "--payload", "{url: x}", cwd=cwd, env=env)
    assert result.returncode == 2
    assert (
        "--payload: is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"
        in result.stderr
    )
    _ok(result)
    assert _count_runs(env) == 0


def test_unknown_step_name_is_refused_before_anything_is_stored(
    project: tuple[Path, dict[str, str]],
) -> None:
    cwd, env = project
    (cwd / "typo.yaml").write_text(
        'id: typo\nversion: "1"\ntrigger: {manual: true}\nsteps:\n'
        "  - id: a\n    call: images.proces\n"
    )
    result = cli("run", "typo.yaml", cwd=cwd, env=env)
    assert result.returncode == 1
    _ok(result)
    assert (
        "typo.yaml:6:11: steps[0].call: no step is registered as `images.proces`; did you mean `images.process`?"
        in result.stderr
    )
    assert _count_runs(env) == 0


def test_failed_run_exit_code_and_resume_hint(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    result = cli("run", "boom", cwd=cwd, env=env)
    assert result.returncode == 1
    _ok(result)
    assert (
        "failed run" in result.stdout
        and "step explode failed: NonRetryableError: disk full" in result.stdout
    )
    assert "durable-yaml resume" in result.stdout


def test_non_json_step_output_is_a_clear_failure(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    result = cli("run", "bad-json", cwd=cwd, env=env)
    assert result.returncode == 1
    _ok(result)
    assert "steps.make: `t.not_json` returned a dict, which is not JSON data" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("run", "nope"), 2, "no workflow has id `nope`"),
        (("run", "missing.yaml"), 2, "no workflow file missing.yaml"),
        (("resume", "r-unknown"), 2, "no run has id r-unknown"),
        (("runs", "show", "r-unknown"), 2, "no run has id r-unknown"),
        (("runs", "cancel", "r-unknown"), 2, "no run has id r-unknown"),
        (
            ("run", "boom", "--payload", "1", "--payload-file", "x"),
            2,
            "give --payload or --payload-file, not both",
        ),
        (("run", "boom", "--payload-file", "nothere.json"), 2, "cannot read nothere.json"),
        (("runs", "list", "--status", "sleeping"), 2, "'sleeping' is not one of"),
    ],
)
def test_usage_mistakes(
    project: tuple[Path, dict[str, str]], args: tuple[str, ...], code: int, message: str
) -> None:
    cwd, env = project
    result = cli(*args, cwd=cwd, env=env)
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stderr
    _ok(result)


def test_unknown_module_is_a_clear_error(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    result = cli("run", "boom", "-m", "no_such_module", cwd=cwd, env=env)
    assert result.returncode == 2
    assert "cannot import step module `no_such_module`" in result.stderr
    _ok(result)


def test_cancel_and_replay(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    cli("run", "boom", cwd=cwd, env=env)
    run_id = json.loads(cli("runs", "list", "--json", cwd=cwd, env=env).stdout)[0]["id"]
    cancelled = cli("runs", "cancel", run_id, cwd=cwd, env=env)
    assert cancelled.returncode == 0 and "had already ended: failed" in cancelled.stdout
    replay = cli("runs", "replay", run_id, cwd=cwd, env=env)
    assert replay.returncode == 1 and "replaying run" in replay.stdout
    assert _count_runs(env) == 2


def test_send_rejects_a_bad_payload_and_dedupes_keys(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    bad = cli("send", "process.image", "--payload", '{"url": "x"}', cwd=cwd, env=env)
    assert bad.returncode == 2
    assert (
        "payload for workflow `process-image` is invalid at `payload`: 'userId' is a required property"
        in bad.stderr
    )
    _ok(bad)
    assert _count_runs(env) == 0
    payload = '{"url": "https://a.io/1.png", "userId": "u"}'
    first = cli(
        "send",
        "process.image",
        "--payload",
        payload,
        "--idempotency-key",
        "order-1",
        cwd=cwd,
        env=env,
    )
    assert first.returncode == 0 and first.stdout.startswith("queued ")
    run_id = first.stdout.split()[1]
    again = cli(
        "send",
        "process.image",
        "--payload",
        payload,
        "--idempotency-key",
        "order-1",
        cwd=cwd,
        env=env,
    )
    assert again.returncode == 0
    assert f"already queued {run_id}" in again.stdout
    assert "idempotency key 'order-1' was used already: nothing new was queued" in again.stderr
    assert _count_runs(env) == 1


def test_resume_a_failed_run_after_fixing_the_cause(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    (cwd / "fixable.yaml").write_text(
        'id: fixable\nversion: "1"\ntrigger: {manual: true}\nsteps:\n'
        "  - {id: first, call: t.record, with: {name: first}}\n"
        f'  - {{id: read, call: t.needs_file, with: {{path: "{cwd}/config.txt"}}, retry: {{max_attempts: 2, min_delay: 10ms}}}}\n'
        'on_failure:\n  - {id: alert, log: "failed: {{ run.error }}"}\n'
    )
    failed = cli("run", "fixable.yaml", cwd=cwd, env=env)
    assert failed.returncode == 1 and "FileNotFoundError" in failed.stdout
    run_id = failed.stdout.split()[1]
    (cwd / "config.txt").write_text("fixed")
    resumed = cli("resume", run_id, cwd=cwd, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _ok(resumed)
    shown = json.loads(cli("runs", "show", run_id, "--json", cwd=cwd, env=env).stdout)
    assert shown["status"] == "completed" and shown["error"] is None and shown["output"] == "fixed"
    steps = {s["id"]: s for s in shown["steps"]}
    assert steps["read"]["attempts"] == 3
    assert [a["status"] for a in steps["read"]["attempt_history"]] == [
        "failed",
        "failed",
        "completed",
    ]
    calls = [json.loads(x) for x in (cwd / "calls.log").read_text().splitlines()]
    assert sum(1 for c in calls if c["name"] == "first") == 1, (
        "the completed step did not run again"
    )
    again = cli("resume", run_id, cwd=cwd, env=env)
    assert again.returncode == 0 and "completed run" in again.stdout
