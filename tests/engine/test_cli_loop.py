"""The workflow author's loop, through the real command in a subprocess: the hints `run`
prints are commands that work as printed, errors show the user's own frames, a waiting run
says what it waits for, signals leave the exact resume command."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli


@pytest.fixture
def project(tmp_path: Path, db_url: str) -> tuple[Path, dict[str, str]]:
    shutil.copytree(
        ROOT / "workflows", tmp_path / "workflows", ignore=shutil.ignore_patterns("tests")
    )
    env = {
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "workflows.steps",
        "PYTHONPATH": str(ROOT),
    }
    return tmp_path, env


def _commands(text: str) -> list[list[str]]:
    """The `durable-yaml ...` commands a hint prints between backticks, as argument lists."""
    return [shlex.split(c)[1:] for c in re.findall(r"`(durable-yaml [^`]*)`", text)]


def test_the_approval_hint_completes_the_run_as_printed(
    project: tuple[Path, dict[str, str]],
) -> None:
    cwd, env = project
    payload = json.dumps({"episode_id": "ep1", "audio_url": "https://a.io/ep1.mp3"})
    started = cli("run", "ai-pipeline", "--payload", payload, cwd=cwd, env=env)
    assert started.returncode == 3, started.stdout + started.stderr
    send, resume = _commands(started.stdout)
    assert send[:2] == ["send", "review.completed"]
    answer = json.loads(send[send.index("--payload") + 1])
    assert answer == {"episode_id": "ep1", "approved": True}  # match value + what `when` reads
    sent = cli(*send, cwd=cwd, env=env)
    assert sent.returncode == 0 and "resumed" in sent.stdout, sent.stdout + sent.stderr
    done = cli(*resume, cwd=cwd, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    shown = json.loads(cli("runs", "show", resume[1], "--json", cwd=cwd, env=env).stdout)
    assert shown["status"] == "completed"
    assert shown["output"]["published"] is True
    assert {s["id"]: s["status"] for s in shown["steps"]}["publish"] == "completed"


def test_the_token_hint_carries_the_fields_read_from_its_data(
    project: tuple[Path, dict[str, str]],
) -> None:
    cwd, env = project
    (cwd / "workflows" / "sign-off.yaml").write_text(
        'id: sign-off\nversion: "1"\ntrigger: {manual: true}\nsteps:\n'
        "  - id: ask\n    wait_for_token: {timeout: 1d}\n"
        "  - id: go\n    when: steps.ask.output.decision == 'yes'\n"
        '    log: "signed by {{ steps.ask.output.who.name }}"\n'
    )
    started = cli("run", "sign-off", cwd=cwd, env=env)
    assert started.returncode == 3, started.stdout + started.stderr
    complete, resume = _commands(started.stdout)
    assert complete[0] == "complete"
    data = json.loads(complete[complete.index("--data") + 1])
    assert data == {"decision": "yes", "who": {"name": "..."}}
    assert cli(*complete, cwd=cwd, env=env).returncode == 0
    done = cli(*resume, cwd=cwd, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    shown = json.loads(cli("runs", "show", resume[1], "--json", cwd=cwd, env=env).stdout)
    assert {s["id"]: s["status"] for s in shown["steps"]}["go"] == "completed"
