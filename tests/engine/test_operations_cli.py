"""The operations commands in a subprocess: send --tag, runs list filters,
runs show's blocked_by, bulk cancel/replay/purge (refused without a terminal unless --yes,
--dry-run changes nothing), queues list/pause/resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli

OPS = Path(__file__).parent / "ops"


@pytest.fixture
def project(tmp_path: Path, sqlite_url: str) -> tuple[Path, dict[str, str]]:
    # SQLite only: the CLI is a thin layer; what it calls is tested on both backends
    # (test_operations.py, test_operations_store.py), and each command costs a process
    shutil.copytree(OPS, tmp_path / "workflows")
    env = {
        "DURABLE_YAML_DB": sqlite_url,
        "DURABLE_YAML_MODULES": "opssteps",
        "DURABLE_YAML_WORKFLOWS": str(tmp_path / "workflows"),
        "PYTHONPATH": f"{ROOT}:{tmp_path / 'workflows'}",
    }
    return tmp_path, env


def _ok(result: object) -> str:
    out = getattr(result, "stdout", "") + getattr(result, "stderr", "")
    assert getattr(result, "returncode", 1) == 0, out
    assert "Traceback" not in out
    return str(getattr(result, "stdout", ""))


def test_tags_filters_blocked_by_and_bulk_actions(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    for n, tag in ((1, "tenant:a"), (2, "tenant:a")):
        _ok(
            cli(
                "send",
                "job.created",
                "--payload",
                json.dumps({"n": n}),
                "--tag",
                tag,
                "--tag",
                "batch:1",
                "--ttl",
                "1h",
                cwd=cwd,
                env=env,
            )
        )
    listed = json.loads(_ok(cli("runs", "list", "--tag", "tenant:a", "--json", cwd=cwd, env=env)))
    assert [r["payload"] if "payload" in r else r["tags"] for r in listed] == [
        ["tenant:a", "batch:1"],
        ["tenant:a", "batch:1"],
    ]
    assert all(r["expires_at"] and r["priority"] == 0 for r in listed)
    bad = cli("runs", "list", "--since", "yesterday", cwd=cwd, env=env)
    assert bad.returncode == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr
    text = _ok(cli("runs", "show", listed[0]["id"], cwd=cwd, env=env))
    assert "blocked by: no_worker: no live worker serves queue jobs" in text
    assert "tags: tenant:a, batch:1" in text
    # bulk cancel: a count, refused without a terminal, then done with --yes
    dry = _ok(cli("runs", "cancel", "--tag", "tenant:a", "--dry-run", cwd=cwd, env=env))
    assert "2 active run(s) match" in dry
    refused = cli("runs", "cancel", "--tag", "tenant:a", cwd=cwd, env=env)
    assert refused.returncode == 2 and "add --yes" in refused.stderr
    assert "Traceback" not in refused.stderr
    done = _ok(cli("runs", "cancel", "--tag", "tenant:a", "--yes", cwd=cwd, env=env))
    assert "cancelled 2 run(s)" in done
    replayed = _ok(cli("runs", "replay", "--status", "cancelled", "--yes", cwd=cwd, env=env))
    assert "queued 2 replay(s)" in replayed
    # purge: count first, refused without --yes, then done
    assert cli("runs", "purge", "--older-than", "0s", cwd=cwd, env=env).returncode == 2
    assert "purged 2 run(s)" in _ok(
        cli("runs", "purge", "--older-than", "0s", "--yes", cwd=cwd, env=env)
    )
    left = json.loads(_ok(cli("runs", "list", "--json", cwd=cwd, env=env)))
    assert [r["status"] for r in left] == ["queued", "queued"]  # the replays


def test_queues_pause_and_resume(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    _ok(cli("send", "job.created", "--payload", '{"n": 1}', cwd=cwd, env=env))
    assert "paused queue jobs" in _ok(cli("queues", "pause", "jobs", cwd=cwd, env=env))
    listed = json.loads(_ok(cli("queues", "list", "--json", cwd=cwd, env=env)))
    jobs = next(q for q in listed if q["name"] == "jobs")
    assert jobs["paused"] is True and jobs["queued"] == 1
    run_id = json.loads(_ok(cli("runs", "list", "--json", cwd=cwd, env=env)))[0]["id"]
    shown = json.loads(_ok(cli("runs", "show", run_id, "--json", cwd=cwd, env=env)))
    assert shown["blocked_by"]["reason"] == "queue_paused"
    _ok(cli("queues", "resume", "jobs", cwd=cwd, env=env))
    unknown = cli("queues", "pause", "nope", cwd=cwd, env=env)
    assert unknown.returncode != 0 and "no queue named 'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
