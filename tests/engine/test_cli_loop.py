"""The workflow author's loop, through the real command in a subprocess: the hints `run`
prints are commands that work as printed, errors show the user's own frames, a waiting run
says what it waits for, signals leave the exact resume command."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, cli


def _copy_project(tmp_path: Path, db_url: str) -> tuple[Path, dict[str, str]]:
    shutil.copytree(
        ROOT / "workflows", tmp_path / "workflows", ignore=shutil.ignore_patterns("tests")
    )
    env = {
        "DURABLE_YAML_DB": db_url,
        "DURABLE_YAML_MODULES": "workflows.steps",
        "PYTHONPATH": str(ROOT),
    }
    return tmp_path, env


@pytest.fixture
def project(tmp_path: Path, db_url: str) -> tuple[Path, dict[str, str]]:
    """The example workflows and steps in a folder of their own, on each database."""
    return _copy_project(tmp_path, db_url)


@pytest.fixture
def sqlite_project(tmp_path: Path, sqlite_url: str) -> tuple[Path, dict[str, str]]:
    """The same on SQLite only, for what does not depend on the database."""
    return _copy_project(tmp_path, sqlite_url)


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

    # `runs show` says the same: the event, its match values, the deadline, the command
    shown = cli("runs", "show", resume[1], cwd=cwd, env=env).stdout
    assert 'for event review.completed matching {"episode_id": "ep1"}; times out at' in shown
    assert "to continue: " + shlex.join(["durable-yaml", *send]) in shown
    waiting = json.loads(cli("runs", "show", resume[1], "--json", cwd=cwd, env=env).stdout)[
        "waiting"
    ]
    assert waiting["kind"] == "event" and waiting["step"] == "review"
    assert waiting["event"] == "review.completed" and waiting["match"] == {"episode_id": "ep1"}
    assert waiting["deadline"] and shlex.split(waiting["command"])[1:] == send
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
    token = complete[1]

    shown = cli("runs", "show", resume[1], cwd=cwd, env=env).stdout
    assert f"for token {token}; times out at" in shown
    assert f"to continue: durable-yaml complete {token} --data" in shown
    detail = json.loads(cli("runs", "show", resume[1], "--json", cwd=cwd, env=env).stdout)
    assert detail["waiting"]["kind"] == "token" and detail["waiting"]["token"] == token
    assert detail["waiting"]["deadline"]
    api = _api_run(cwd, env, resume[1])
    assert api["waiting"]["token"] == token and api["waiting"]["command"].startswith(
        f"durable-yaml complete {token} --data "
    )
    assert cli(*complete, cwd=cwd, env=env).returncode == 0
    done = cli(*resume, cwd=cwd, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    shown = json.loads(cli("runs", "show", resume[1], "--json", cwd=cwd, env=env).stdout)
    assert {s["id"]: s["status"] for s in shown["steps"]}["go"] == "completed"


FAILING_STEPS = """from engine import step


def lookup(data: dict, key: str) -> str:
    return data[key]


@step("t.fetch")
def fetch(key: str) -> dict:
    return {"v": lookup({}, key)}
"""


@pytest.fixture
def failing(sqlite_project: tuple[Path, dict[str, str]]) -> tuple[Path, dict[str, str]]:
    """A step failing two frames deep in the user's code (the stored traceback is the same
    text on either database)."""
    cwd, env = sqlite_project
    (cwd / "workflows" / "failing.py").write_text(FAILING_STEPS)
    (cwd / "workflows" / "fetcher.yaml").write_text(
        'id: fetcher\nversion: "1"\ntrigger: {manual: true}\nsteps:\n'
        "  - id: fetch\n    call: t.fetch\n    with: {key: missing}\n"
        "    retry: {max_attempts: 1}\n"
    )
    return cwd, {**env, "DURABLE_YAML_MODULES": "workflows.failing"}


def _run_id(text: str) -> str:
    found = re.search(r"run (\w{20,})", text)
    assert found, text
    return found[1]


def test_a_failing_step_shows_the_users_frames_only(failing: tuple[Path, dict[str, str]]) -> None:
    cwd, env = failing
    result = cli("run", "fetcher", cwd=cwd, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "workflows/failing.py:10 in fetch" in out and "workflows/failing.py:5 in lookup" in out
    assert "return data[key]" in out and "KeyError: 'missing'" in out
    assert "executor.py" not in out and "registry.py" not in out and "Traceback" not in out
    run_id = _run_id(out)

    full = cli("runs", "show", run_id, "--verbose", cwd=cwd, env=env)
    assert "executor.py" in full.stdout and 'failing.py", line 5, in lookup' in full.stdout

    shown = cli("runs", "show", run_id, cwd=cwd, env=env)
    assert "workflows/failing.py:5 in lookup" in shown.stdout
    assert "executor.py" not in shown.stdout

    detail = json.loads(cli("runs", "show", run_id, "--json", cwd=cwd, env=env).stdout)
    (step,) = detail["steps"]
    assert "failing.py:5 in lookup" in step["traceback"] and "executor.py" not in step["traceback"]
    (attempt,) = step["attempt_history"]
    assert "executor.py" not in attempt["traceback"]
    assert "executor.py" in attempt["traceback_full"]  # the store keeps all of it

    resumed = cli("resume", run_id, "--verbose", cwd=cwd, env=env)
    assert resumed.returncode == 1 and "executor.py" in resumed.stdout

    # the API's run object and the dashboard's run page read the same stored field
    (step,) = _api_run(cwd, env, run_id)["steps"]
    assert "in lookup" in step["traceback"] and "KeyError: 'missing'" in step["traceback"]
    assert "executor.py" not in step["traceback"]
    html = _api_run(cwd, env, run_id, page=True)
    assert "workflows/failing.py:5 in lookup" in html and "executor.py" not in html


def _api_run(cwd: Path, env: dict[str, str], run_id: str, page: bool = False) -> Any:
    """GET /api/runs/{id} (or, with `page`, the dashboard's run page, signed in) of the real
    app on the project's database."""
    from fastapi.testclient import TestClient

    from engine.server import create_app
    from engine.service import Engine
    from engine.settings import resolve_settings

    engine = Engine(
        resolve_settings(db=env["DURABLE_YAML_DB"], workflows=str(cwd / "workflows")),
        import_steps=False,
    )
    base = "http://127.0.0.1:8765"
    try:
        client = TestClient(create_app(engine, "k", port=8765), base_url=base)
        if page:
            assert client.post("/login", data={"key": "k"}, headers={"origin": base}).is_success
            return client.get(f"/runs/{run_id}").text
        return client.get(f"/api/runs/{run_id}", headers={"Authorization": "Bearer k"}).json()
    finally:
        engine.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_on_a_foreground_run_prints_its_resume_command(
    project: tuple[Path, dict[str, str]], sig: signal.Signals
) -> None:
    cwd, env = project
    (cwd / "workflows" / "slow.yaml").write_text(
        'id: slow\nversion: "1"\ntrigger: {manual: true}\n'
        "steps:\n  - {id: a, log: hi}\n  - {id: b, wait: 1h}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "run", "slow"],
        cwd=cwd,
        env={**os.environ, **env, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job ignores SIGINT, and a child inherits that: undo it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    run_id = _run_id(first)
    for line in proc.stdout:  # the run now sleeps through its timer
        if "waiting" in line:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"durable-yaml resume {run_id}" in err and "Traceback" not in err
    assert ("SIGTERM" if sig == signal.SIGTERM else "SIGINT") in err

    # the run keeps its state and says what it waits for: the timer, its wake time
    shown = cli("runs", "show", run_id, cwd=cwd, env=env)
    assert "waiting at step b" in shown.stdout and "a timer, waking at" in shown.stdout
    detail = json.loads(cli("runs", "show", run_id, "--json", cwd=cwd, env=env).stdout)
    assert detail["status"] == "waiting"
    assert detail["waiting"]["kind"] == "timer" and detail["waiting"]["wake_at"]


def _project_elsewhere(tmp_path: Path, modules: str = '["projsteps"]') -> tuple[Path, Path]:
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    (proj / "workflows").mkdir(parents=True)
    elsewhere.mkdir()
    (proj / "pyproject.toml").write_text(f"[tool.durable-yaml]\nmodules = {modules}\n")
    (proj / "projsteps.py").write_text(
        "from engine import step\n\n\n@step('proj.hello')\n"
        "def hello(name: str) -> dict:\n    return {'message': 'hello ' + name}\n"
    )
    (proj / "workflows" / "hello.yaml").write_text(
        'id: hello\nversion: "1"\ntrigger: {manual: true}\nsteps:\n'
        "  - {id: greet, call: proj.hello, with: {name: ada}}\n"
    )
    return proj, elsewhere


def _clean_env() -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "DURABLE_YAML_DB": "", "DURABLE_YAML_MODULES": ""}


def test_run_of_a_path_takes_the_settings_of_the_files_project(tmp_path: Path) -> None:
    proj, elsewhere = _project_elsewhere(tmp_path)
    wf = str(proj / "workflows" / "hello.yaml")
    result = cli("run", wf, cwd=elsewhere, env=_clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"hello ada"' in result.stdout  # the project's step module ran
    assert not (elsewhere / ".durable-yaml").exists()  # nothing in the current folder
    assert (proj / ".durable-yaml" / "state.db").is_file()  # the project's database
    listed = cli("runs", "list", "--json", cwd=proj, env=_clean_env())
    assert [r["status"] for r in json.loads(listed.stdout)] == ["completed"]


def test_run_of_a_path_stops_before_creating_anything(tmp_path: Path) -> None:
    proj, elsewhere = _project_elsewhere(tmp_path, modules="[]")
    wf = str(proj / "workflows" / "hello.yaml")
    result = cli("run", wf, cwd=elsewhere, env=_clean_env())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "calls proj.hello, but no step module is configured" in result.stderr
    assert not (elsewhere / ".durable-yaml").exists() and not (proj / ".durable-yaml").exists()

    (proj / "pyproject.toml").unlink()  # a file in no project, outside the current folder
    result = cli("run", wf, "-m", "projsteps", cwd=elsewhere, env=_clean_env())
    assert result.returncode == 2 and "is in no project" in result.stderr, result.stderr
    assert not (elsewhere / ".durable-yaml").exists() and not (proj / ".durable-yaml").exists()


def test_send_of_an_event_nothing_listens_to_warns_with_a_did_you_mean(
    project: tuple[Path, dict[str, str]],
) -> None:
    cwd, env = project
    typo = cli("send", "process.imag", cwd=cwd, env=env)
    assert typo.returncode == 0, typo.stderr  # it was recorded all the same
    assert "warning: " in typo.stderr and "did you mean `process.image`?" in typo.stderr
    assert "recorded" in typo.stdout

    # a workflow's wait counts: ai-pipeline waits for review.completed
    wait_typo = cli("send", "review.complete", cwd=cwd, env=env)
    assert "did you mean `review.completed`?" in wait_typo.stderr

    # a wait of a stored run counts: `sign.off` is in no workflow file any more
    (cwd / "workflows" / "signer.yaml").write_text(
        'id: signer\nversion: "1"\ntrigger: {manual: true}\nsteps:\n'
        "  - {id: ask, wait_for_event: sign.off, match: {doc: a}}\n"
    )
    assert cli("run", "signer", cwd=cwd, env=env).returncode == 3
    (cwd / "workflows" / "signer.yaml").unlink()
    near = cli("send", "sign.of", cwd=cwd, env=env)
    assert near.returncode == 0 and "did you mean `sign.off`?" in near.stderr

    # an event some run waits for, whose match this payload misses, is no typo
    known = cli("send", "sign.off", "--payload", '{"doc": "b"}', cwd=cwd, env=env)
    assert known.returncode == 0 and "warning" not in known.stderr

    far = cli("send", "zzz.qqq", cwd=cwd, env=env)
    assert "warning: " in far.stderr and "did you mean" not in far.stderr


def test_serve_picks_up_a_workflow_added_after_start(
    sqlite_project: tuple[Path, dict[str, str]],
) -> None:
    import socket

    import httpx

    cwd, env = sqlite_project
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--port", str(port)],
        cwd=cwd,
        env={**os.environ, **env, "DURABLE_YAML_API_KEY": "k", "NO_COLOR": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "dashboard http://" in proc.stdout.readline()
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer k"}
        )
        for _ in range(200):  # until uvicorn listens
            try:
                client.get("/healthz")
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.05)

        def names() -> list[str]:
            return [w["id"] for w in client.get("/api/workflows").json()["workflows"]]

        assert "late" not in names() and "ai-pipeline" in names()

        (cwd / "workflows" / "late.yaml").write_text(
            'id: late\nversion: "1"\ntrigger: {event: late.arrived}\nsteps:\n'
            "  - {id: a, log: here}\n"
        )
        for _ in range(100):  # the folder is re-read at most once a second
            sent = client.post("/api/events", json={"name": "late.arrived", "payload": {}})
            if sent.json()["runs"]:
                break
            time.sleep(0.1)
        assert sent.status_code == 202 and len(sent.json()["runs"]) == 1, sent.text
        assert "late" in names()
        run = client.get(f"/api/runs/{sent.json()['runs'][0]}").json()
        assert run["workflow"] == "late" and run["status"] == "queued"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_run_of_a_symlink_loop_says_there_is_no_such_file(tmp_path: Path) -> None:
    """`Path.resolve()` raised RuntimeError on a symlink loop: a traceback, exit 1."""
    proj, elsewhere = _project_elsewhere(tmp_path)
    for folder in (proj / "workflows", elsewhere):  # in a project, and in none
        loop = folder / "loop.yaml"
        loop.symlink_to(loop)
        result = cli("run", str(loop), cwd=elsewhere, env=_clean_env())
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"no workflow file {loop}" in result.stderr
        assert "Traceback" not in result.stdout + result.stderr
    assert not (elsewhere / ".durable-yaml").exists()


def test_validate_checks_test_files_as_tests(tmp_path: Path) -> None:
    proj, _ = _project_elsewhere(tmp_path)
    tests = proj / "workflows" / "tests"
    tests.mkdir()
    (tests / "good.test.yaml").write_text(
        "workflow: hello\nstubs:\n  proj.hello: [{return: {message: hi}}]\n"
        "expect:\n  status: completed\n  steps: {greet: {status: completed}}\n"
    )
    (tests / "typo.test.yaml").write_text("workflow: helo\nexpect: {status: completed}\n")
    (tests / "step.test.yaml").write_text(
        "workflow: hello\nexpect:\n  steps:\n    gret: {status: completed}\n"
    )
    (tests / "shape.test.yaml").write_text(
        "workflow: hello\nevents:\n  - {at: soon, send: x}\nexpect: {status: completed}\n"
    )
    # statuses no run or step can have: the test could only ever fail
    (tests / "status.test.yaml").write_text("workflow: hello\nexpect: {status: [completed]}\n")
    (tests / "stepstatus.test.yaml").write_text(
        "workflow: hello\nexpect:\n  steps:\n    greet: {status: done, when: 1}\n"
    )
    (tests / "stepdone.test.yaml").write_text(
        "workflow: hello\nexpect:\n  steps:\n    greet: {status: done}\n"
    )
    result = cli("validate", cwd=proj, env=_clean_env())
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    out = result.stdout
    assert (
        f"{tests / 'typo.test.yaml'}:1:11: workflow: no workflow has id `helo`; did you mean `hello`?"
        in out
    )
    assert (
        f"{tests / 'step.test.yaml'}:4:5: expect.steps.gret: workflow hello has no step `gret`; did you mean `greet`?"
        in out
    )
    assert f"{tests / 'shape.test.yaml'}:3:6: events[0].at: 'soon' is not a duration" in out
    assert f"{tests / 'status.test.yaml'}:2:10: expect.status: ['completed'] is not a run" in out
    assert (
        f"{tests / 'stepstatus.test.yaml'}:4:5: expect.steps.greet: unknown key(s) ['when']" in out
    )
    assert (
        f"{tests / 'stepdone.test.yaml'}:4:13: expect.steps.greet.status: 'done' is not a step "
        "status" in out
    )
    assert "good.test.yaml" not in out
    alone = cli("validate", str(tests / "good.test.yaml"), cwd=proj, env=_clean_env())
    assert alone.returncode == 0 and "1 file(s) valid" in alone.stdout, alone.stdout + alone.stderr
    # a workflow file given by name is checked as a workflow only (it was also checked as a
    # test, so `validate workflows/x.yaml` of any valid workflow exited 1)
    flow = next((proj / "workflows").glob("*.yaml"))
    named = cli("validate", str(flow), cwd=proj, env=_clean_env())
    assert named.returncode == 0 and "1 file(s) valid" in named.stdout, named.stdout + named.stderr


def test_a_projects_relative_sqlite_file_is_in_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.settings import resolve_settings

    monkeypatch.delenv("DURABLE_YAML_DB", raising=False)
    proj, elsewhere = _project_elsewhere(tmp_path)
    with (proj / "pyproject.toml").open("a") as f:
        f.write('db = "sqlite:///state/app.db"\n')
    wf = str(proj / "workflows" / "hello.yaml")
    chosen = resolve_settings(workflow_file=wf, cwd=str(elsewhere))
    assert chosen.db_url == f"sqlite:///{proj}/state/app.db"
    assert chosen.modules == ("projsteps",) and chosen.project_dir == str(proj)
    assert chosen.workflows == str(proj / "workflows")


def test_ctrl_c_on_runs_logs_follow_says_interrupted_without_a_resume_hint(
    project: tuple[Path, dict[str, str]],
) -> None:
    """Only a command that drives a run prints how to resume it; `runs logs --follow`
    interrupted said "continue it with `durable-yaml resume RUN_ID`" of a run it never held."""
    cwd, env = project
    (cwd / "workflows" / "asks.yaml").write_text(
        'id: asks\nversion: "1"\ntrigger: {manual: true}\n'
        "steps:\n  - {id: a, log: hi}\n  - {id: b, wait_for_token: {timeout: 1h}}\n"
    )
    waited = cli("run", "asks", cwd=cwd, env=env)
    assert waited.returncode == 3, waited.stdout + waited.stderr
    run_id = _run_id(waited.stdout)
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "runs", "logs", run_id, "--follow"],
        cwd=cwd,
        env={**os.environ, **env, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # the run's one line so far, then it follows
        if "hi" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "resume" not in err and "Traceback" not in err
