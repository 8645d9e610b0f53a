"""Start-up imports only what a command uses (issue #15): the real CLI entry point in a fresh
interpreter, then its `sys.modules` inspected. `validate` never loads the store's SQLAlchemy,
the server's FastAPI, rich, prometheus_client or uvicorn; `--help` not even the language's
jsonschema and jinja2; a `run` not the server; `dsl` never imports `engine`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

SERVER = {"fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "rich"}
STORE = {"sqlalchemy", "psycopg"}
LANGUAGE = {"jsonschema", "jinja2", "yaml", "croniter"}

PROBE = """
import json, sys
sys.argv = ["durable-yaml", *json.loads(sys.argv[1])]
from engine.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""

WORKFLOW = """id: startup
version: "1"
trigger: {cron: "*/5 * * * *"}
steps:
  - {id: greet, call: startup.greet, with: {name: "{{ payload.name }}"}}
"""

STEPS = """from engine import step


@step("startup.greet")
def greet(name: str) -> str:
    return f"hello {name}"
"""


def loaded(args: list[str], cwd: Path, *, full: bool = False) -> tuple[int, set[str]]:
    """The exit code of `durable-yaml ARGS` and the top-level packages it imported (with
    `full`, every module's dotted name)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{cwd}"},
    )
    last = json.loads(out.stdout.strip().splitlines()[-1])
    names = set(last["modules"])
    return int(last["code"] or 0), names if full else {m.split(".")[0] for m in names}


def project(tmp_path: Path) -> Path:
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "startup.yaml").write_text(WORKFLOW)
    (tmp_path / "startupsteps.py").write_text(STEPS)
    return tmp_path


def test_validate_imports_no_store_and_no_server(tmp_path: Path) -> None:
    folder = project(tmp_path)
    code, modules = loaded(["validate", "workflows/startup.yaml"], folder)
    assert code == 0
    assert not modules & (SERVER | STORE), modules & (SERVER | STORE)
    assert {"jsonschema", "jinja2", "yaml"} <= modules  # it did check the file


def test_validate_imports_only_its_own_command(tmp_path: Path) -> None:
    """Commands' modules are imported when used: `validate` loads none of the runner's."""
    folder = project(tmp_path)
    code, modules = loaded(["validate", "workflows/startup.yaml"], folder, full=True)
    assert code == 0 and "engine.cli.authoring" in modules
    others = {"engine.cli.foreground", "engine.cli.runs", "engine.cli.operate", "engine.runner"}
    assert not modules & others, modules & others


def test_validate_with_step_modules_imports_no_store(tmp_path: Path) -> None:
    folder = project(tmp_path)
    code, modules = loaded(["validate", "-m", "startupsteps", "workflows/startup.yaml"], folder)
    assert code == 0
    assert not modules & (SERVER | STORE), modules & (SERVER | STORE)
    (folder / "workflows" / "startup.yaml").write_text(WORKFLOW.replace("startup.greet", "nope"))
    code, modules = loaded(["validate", "-m", "startupsteps", "workflows/startup.yaml"], folder)
    assert code == 1  # the step names were checked against the module's steps
    assert not modules & (SERVER | STORE)


def test_help_imports_neither_the_language_nor_the_store(tmp_path: Path) -> None:
    code, modules = loaded(["--help"], tmp_path)
    assert code == 0
    assert not modules & (SERVER | STORE | LANGUAGE), modules & (SERVER | STORE | LANGUAGE)


def test_run_imports_the_store_but_not_the_server(tmp_path: Path) -> None:
    folder = project(tmp_path)
    (folder / "workflows" / "startup.yaml").write_text(
        WORKFLOW.replace('{cron: "*/5 * * * *"}', "{manual: true}")
    )
    code, modules = loaded(
        ["run", "startup", "-m", "startupsteps", "--payload", '{"name": "Ada"}'], folder
    )
    assert code == 0
    assert "sqlalchemy" in modules
    assert not modules & SERVER, modules & SERVER
    assert not (folder / "workflows" / ".durable-yaml").exists()


def test_a_sqlite_run_never_loads_postgresql(tmp_path: Path) -> None:
    """PostgreSQL's SQLAlchemy dialect (a third of SQLAlchemy's import time, with its five
    drivers' modules) is imported only by a process that opens a PostgreSQL database."""
    folder = project(tmp_path)
    (folder / "workflows" / "startup.yaml").write_text(
        WORKFLOW.replace('{cron: "*/5 * * * *"}', "{manual: true}")
    )
    args = ["run", "startup", "-m", "startupsteps", "--payload", '{"name": "Ada"}']
    code, modules = loaded(args, folder, full=True)
    assert code == 0 and "sqlalchemy.dialects.sqlite" in modules
    pg = {m for m in modules if m.startswith(("sqlalchemy.dialects.postgresql", "psycopg"))}
    assert not pg, pg


def test_dsl_never_imports_engine() -> None:
    names = sorted(p.stem for p in (ROOT / "dsl").glob("*.py") if p.stem != "__init__")
    probe = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module('dsl.' + name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    modules = set(json.loads(out.stdout.strip()))
    assert "dsl" in modules
    assert not modules & ({"engine"} | STORE | SERVER)


# The command's exit (engine/cli `entry`): the interpreter's teardown is skipped, never at
# the cost of output, an `atexit` handler, a running thread or the database file.

EXITS = """from engine import step
import atexit, pathlib

atexit.register(lambda: pathlib.Path("atexit-ran").write_text("yes"))


@step("exits.echo")
def echo(text: str) -> str:
    return text
"""


def command(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real `durable-yaml` entry point (`python -m engine`, as the installed script)."""
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{cwd}"},
    )


def validate_after(prelude: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`durable-yaml validate workflows` through the real entry point, in a process that ran
    `prelude` first (what a host of the command might have set up)."""
    probe = (
        f"{prelude}import sys\n"
        "sys.argv = ['durable-yaml', 'validate', 'workflows']\n"
        "from engine.cli import entry\n"
        "entry()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", probe],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{cwd}"},
    )


def exits_project(tmp_path: Path) -> Path:
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "exits.yaml").write_text(
        'id: exits\nversion: "1"\ntrigger: {manual: true}\n'
        "steps:\n  - {id: e, call: exits.echo, with: {text: kept}}\n"
    )
    (tmp_path / "exitsteps.py").write_text(EXITS)
    return tmp_path


def test_the_command_exits_with_its_code_and_all_its_output(tmp_path: Path) -> None:
    folder = project(tmp_path)
    ok = command(["validate", "--format", "json", "workflows"], folder)
    assert ok.returncode == 0 and json.loads(ok.stdout)["valid"] is True  # piped: flushed
    (folder / "workflows" / "broken.yaml").write_text("id: broken\n")
    bad = command(["validate", "workflows"], folder)
    assert bad.returncode == 1
    assert "broken.yaml:1:1: missing required key `steps`" in bad.stdout
    assert "1 with problems" in bad.stderr
    usage = command(["validate", "nope.yaml"], folder)
    assert usage.returncode == 2 and "no such file or folder: nope.yaml" in usage.stderr
    assert "Traceback" not in bad.stderr + usage.stderr


def test_the_command_runs_atexit_handlers(tmp_path: Path) -> None:
    """The exit skips the teardown, not the `atexit` handlers (a tracing exporter's flush
    is one), nor the closing of the databases it opened."""
    folder = project(tmp_path)
    out = validate_after(
        "import atexit, pathlib\n"
        "atexit.register(lambda: pathlib.Path('atexit-ran').write_text('yes'))\n",
        folder,
    )
    assert out.returncode == 0 and "1 file(s) valid" in out.stdout, out.stderr
    assert (folder / "atexit-ran").read_text() == "yes"


def test_a_command_that_opened_the_database_leaves_the_file_whole(tmp_path: Path) -> None:
    """`runs list` (which imports no step module) closes the database before its quick
    exit: SQLite folds the write-ahead log into the database file, and a copy of that file
    alone holds the run."""
    folder = exits_project(tmp_path)
    assert command(["run", "exits", "-m", "exitsteps"], folder).returncode == 0
    listed = command(["runs", "list", "--json"], folder)
    assert listed.returncode == 0, listed.stderr
    assert [r["status"] for r in json.loads(listed.stdout)] == ["completed"]
    state = folder / ".durable-yaml" / "state.db"
    assert not Path(f"{state}-wal").exists()
    copy = tmp_path / "copy.db"
    copy.write_bytes(state.read_bytes())
    with sqlite3.connect(copy) as c:
        assert c.execute("SELECT status FROM dy_runs").fetchall() == [("completed",)]


def test_a_command_that_imported_step_modules_keeps_the_teardown(tmp_path: Path) -> None:
    """A step module's file, written at import and never closed, is flushed by the
    interpreter's teardown, which the command then does not skip."""
    folder = exits_project(tmp_path)
    (folder / "exitsteps.py").write_text(
        EXITS + '\nAUDIT = open("audit.txt", "w")\nAUDIT.write("imported\\n")\n'
    )
    out = command(["validate", "-m", "exitsteps", "workflows"], folder)
    assert out.returncode == 0, out.stderr
    assert (folder / "audit.txt").read_text() == "imported\n"
    assert (folder / "atexit-ran").read_text() == "yes"


def test_a_closed_stdout_or_stderr_is_no_error(tmp_path: Path) -> None:
    """Started with descriptor 1 or 2 closed (`>&-`), Python has no sys.stdout or
    sys.stderr: the exit has nothing to flush there, and exits 0 as the ordinary one."""
    folder = project(tmp_path)
    for fd in (1, 2):
        out = subprocess.run(
            [sys.executable, "-m", "engine", "validate", "workflows"],
            cwd=folder,
            capture_output=False,
            stdout=subprocess.DEVNULL if fd == 2 else None,
            stderr=subprocess.PIPE if fd == 1 else None,
            preexec_fn=lambda fd=fd: os.close(fd),  # type: ignore[misc]
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{folder}"},
        )
        assert out.returncode == 0, (fd, out.stderr)
        assert not out.stderr or b"Traceback" not in out.stderr


def test_under_cprofile_the_profile_is_written(tmp_path: Path) -> None:
    """Under a profiler (or a tracer) the command exits the ordinary way: cProfile writes
    its profile after the program returns."""
    folder = project(tmp_path)
    profile = tmp_path / "validate.prof"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cProfile",
            "-o",
            str(profile),
            "-m",
            "engine",
            "validate",
            "workflows",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{folder}"},
    )
    assert out.returncode == 0, out.stderr
    assert profile.stat().st_size > 0


def test_a_running_non_daemon_thread_is_waited_for(tmp_path: Path) -> None:
    """A (non-daemon) thread still working at the end: the command exits the ordinary way,
    which waits for it to finish."""
    folder = project(tmp_path)
    out = validate_after(
        "import pathlib, threading, time\n"
        "def late():\n"
        "    time.sleep(0.5)\n"
        "    pathlib.Path('thread-done').write_text('yes')\n"
        "threading.Thread(target=late).start()\n",
        folder,
    )
    assert out.returncode == 0, out.stderr
    assert (folder / "thread-done").read_text() == "yes"


def test_python_i_still_reaches_its_prompt(tmp_path: Path) -> None:
    """`python -i -m engine ...`: the prompt comes after the program, so the command exits
    the ordinary way (the prompt reads its input, here one line that prints)."""
    folder = project(tmp_path)
    out = subprocess.run(
        [sys.executable, "-i", "-m", "engine", "validate", "workflows"],
        cwd=folder,
        input="print('at the prompt')\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{folder}"},
    )
    assert "at the prompt" in out.stdout, (out.stdout, out.stderr)


GC_STEPS = """import gc
import weakref

from engine import step


class Garbage:
    pass


# what a step module leaves unreachable in cycles at import: collectable, never frozen
IMPORT_GARBAGE = []
for _ in range(1000):
    cycle = Garbage()
    cycle.me = cycle
    IMPORT_GARBAGE.append(weakref.ref(cycle))
del cycle


@step("gcstate.read")
def read() -> dict:
    gc.collect()
    left = sum(ref() is not None for ref in IMPORT_GARBAGE)
    return {"enabled": gc.isenabled(), "import_garbage_left": left}


@step("gcstate.frozen")
def frozen() -> int:
    return gc.get_freeze_count()
"""

GC_TEST = """workflow: gcstate
payload: {}
expect:
  status: completed
  steps:
    read: {status: completed, output: {enabled: true, import_garbage_left: 0}}
"""


def gc_project(tmp_path: Path) -> Path:
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "gcstate.yaml").write_text(
        'id: gcstate\nversion: "1"\ntrigger: {event: gc.go}\n'
        "steps:\n  - {id: read, call: gcstate.read}\n  - {id: frozen, call: gcstate.frozen}\n"
    )
    (tmp_path / "workflows" / "gcstate.test.yaml").write_text(GC_TEST)
    (tmp_path / "gcsteps.py").write_text(GC_STEPS)
    return tmp_path


def test_the_garbage_collector_is_on_when_steps_run(tmp_path: Path, sqlite_url: str) -> None:
    """The command's start-up runs without the garbage collector (issue #15); a step, in
    `run`, in a worker or in `test`, runs with it on, what start-up built frozen out of it,
    and what its step module left unreachable at import collected (the reviewer helper
    found it frozen for good, and `test` running with the collector off). (The database
    plays no part: SQLite only.)"""
    import signal

    db_url = sqlite_url

    from engine.service import Engine
    from engine.settings import resolve_settings

    folder = gc_project(tmp_path)
    collected = {"enabled": True, "import_garbage_left": 0}
    ran = command(["run", "gcstate", "-m", "gcsteps", "--db", db_url], folder)
    assert ran.returncode == 0, ran.stderr
    engine = Engine(
        resolve_settings(db=db_url, workflows=str(folder / "workflows")), import_steps=False
    )
    try:
        (first,) = engine.store.list_runs()
        assert engine.store.get_steps(first.id)[0].output == collected
        assert first.output > 10_000  # frozen: start-up's objects
        run_id = engine.send_event("gc.go", {}).run_ids[0]
        worker = subprocess.Popen(
            [sys.executable, "-m", "engine", "worker", "--concurrency", "1", "--no-schedules"],
            cwd=folder,
            env={
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": f"{ROOT}:{folder}",
                "DURABLE_YAML_DB": db_url,
                "DURABLE_YAML_MODULES": "gcsteps",
                "DURABLE_YAML_WORKFLOWS": "workflows",
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.time() + 60
            while not engine.store.get_run(run_id).finished and time.time() < deadline:
                time.sleep(0.1)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
        assert engine.store.get_steps(run_id)[0].output == collected
        assert engine.store.get_run(run_id).output > 10_000
    finally:
        engine.close()
    tested = command(["test", "-m", "gcsteps"], folder)
    assert tested.returncode == 0 and "1 passed, 0 failed" in tested.stdout, tested.stdout


def test_main_in_a_process_of_its_own_leaves_the_collector_alone(tmp_path: Path) -> None:
    """`main` called by a host (a test, an embedding program) changes nothing of its
    garbage collector: only the `durable-yaml` entry point turns it off for start-up."""
    import gc

    from engine.cli import main

    folder = gc_project(tmp_path)
    frozen = gc.get_freeze_count()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        main(["validate", "workflows"])
    except SystemExit as exc:
        assert exc.code == 0
    finally:
        os.chdir(cwd)
    assert gc.isenabled() and gc.get_freeze_count() == frozen
