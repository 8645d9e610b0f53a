"""`durable-yaml`: parse options, call the engine, render the result. Nothing else."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dsl import DslError, Problem, State, WorkflowInvalid, check_paths, render_graph
from dsl.limits import JSON_SIZE_MAX

from .errors import EngineError
from .inputs import parse_json
from .models import Run, RunStatus
from .service import Engine
from .settings import resolve_settings
from .transitions import Done, Failed, Outcome, Skipped, Suspended
from .views import iso, log_view, run_detail, run_summary, schedule_views

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])
EXIT_WAITING = 3


def settings_options(fn: F) -> F:
    """--db, -m/--module and --workflows on every command that touches the engine."""
    fn = click.option("--workflows", "workflows", metavar="DIR", help="Workflows folder.")(fn)
    fn = click.option(
        "-m",
        "--module",
        "modules",
        multiple=True,
        metavar="MODULE",
        help="Python module registering @step functions (repeatable).",
    )(fn)
    fn = click.option(
        "--db", "db", metavar="URL", help="Database URL (default: SQLite in .durable-yaml/)."
    )(fn)
    return fn


def _engine(db: str | None, modules: tuple[str, ...], workflows: str | None) -> Engine:
    return Engine(resolve_settings(db=db, modules=modules, workflows=workflows))


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _read_payload(payload: str | None, payload_file: str | None) -> Any:
    if payload is not None and payload_file is not None:
        raise click.UsageError("give --payload or --payload-file, not both")
    if payload_file is not None:
        try:
            with open(payload_file, "rb") as f:
                data = f.read(JSON_SIZE_MAX + 1)  # a device or a huge file stops here
        except OSError as exc:
            raise click.UsageError(f"cannot read {payload_file}: {exc.strerror}") from None
        return parse_json(data, payload_file)
    if payload is None:
        return None
    return parse_json(payload, "--payload")


class LiveReporter:
    """Shows each step as it goes: attempt, duration, outcome."""

    def __init__(self) -> None:
        self.width = 18

    def run_started(self, run: Run) -> None:
        click.echo(f"run {run.id} of {run.workflow_id} v{run.version}")

    def step_started(self, run: Run, state: State, attempt: int) -> None:
        pass

    def step_ended(
        self, run: Run, state: State, attempt: int, outcome: Outcome, seconds: float
    ) -> None:
        took = f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"
        name = state.id.ljust(self.width)
        tries = f" (attempt {attempt})" if attempt > 1 else ""
        if isinstance(outcome, Done):
            shown = json.dumps(outcome.output, default=str)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            click.echo(
                f"  {click.style('✓', fg='green')} {name} {state.kind}{tries} {took}  {shown}"
            )
        elif isinstance(outcome, Skipped):
            click.echo(f"  {click.style('-', fg='yellow')} {name} skipped (when is false)")
        elif isinstance(outcome, Failed):
            retry = state.retry
            more = (
                " - will retry"
                if outcome.retryable and retry and attempt < retry.max_attempts
                else ""
            )
            click.echo(
                f"  {click.style('✗', fg='red')} {name} {state.kind}{tries} {took}  "
                f"{outcome.error_type}: {outcome.message}{more}"
            )
        elif isinstance(outcome, Suspended):
            pass

    def waiting(
        self, run: Run, state: State, until: float | None, wait: dict[str, Any] | None
    ) -> None:
        name = state.id.ljust(self.width)
        wait = wait or {}
        if wait.get("kind") == "token":
            click.echo(f"  {click.style('…', fg='cyan')} {name} waiting for token {wait['token']}")
        elif wait.get("kind") == "event":
            click.echo(
                f"  {click.style('…', fg='cyan')} {name} waiting for event {wait['event']}"
                f" matching {json.dumps(wait.get('match') or {})}"
            )
        elif wait.get("kind") == "child":
            click.echo(
                f"  {click.style('…', fg='cyan')} {name} running child {wait['workflow']} "
                f"({wait['run_id']})"
            )
        elif until is None:
            click.echo(f"  {click.style('…', fg='cyan')} {name} waiting ({state.label})")
        else:
            left = max(0.0, until - time.time())
            click.echo(
                f"  {click.style('…', fg='cyan')} {name} waiting {left:.1f}s (until {iso(until)})"
            )


def _stop_on_sigterm() -> None:
    """A foreground run stopped by SIGTERM ends like Ctrl-C: its lease is released, its
    state kept, and the command exits 130 saying how to continue."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _finish(engine: Engine, run: Run) -> None:
    """Print how a foreground run ended and exit with SPEC's code."""
    took = (run.finished_at or time.time()) - run.created_at
    if run.status == RunStatus.COMPLETED:
        click.echo(f"{click.style('completed', fg='green')} run {run.id} in {took:.1f}s")
        click.echo(f"output: {json.dumps(run.output, default=str)}")
        return
    if run.status == RunStatus.WAITING:
        click.echo(f"{click.style('waiting', fg='cyan')} run {run.id} at step {run.current_step}")
        click.echo(_how_to_continue(engine, run))
        sys.exit(EXIT_WAITING)
    colour = "red" if run.status == RunStatus.FAILED else "yellow"
    click.echo(f"{click.style(run.status.value, fg=colour)} run {run.id}: {run.error}")
    if run.status == RunStatus.FAILED:
        click.echo(
            f"after fixing the cause: durable-yaml resume {run.id}  "
            f"(or start over: durable-yaml runs replay {run.id})"
        )
    else:
        click.echo(f"to run it again: durable-yaml runs replay {run.id}")
    sys.exit(1)


def _how_to_continue(engine: Engine, run: Run) -> str:
    step = next((s for s in engine.store.get_steps(run.id) if s.step_key == run.current_step), None)
    wait = (step.wait if step else None) or {}
    then = f"then `durable-yaml resume {run.id}` (or let a worker continue it)"
    if wait.get("kind") == "event":
        event, match = shlex.quote(wait["event"]), shlex.quote(json.dumps(wait.get("match") or {}))
        return f"it waits for event {event}: `durable-yaml send {event} --payload {match}`, {then}"
    if wait.get("kind") == "token":
        return f"it waits for token {wait['token']}: `durable-yaml complete {wait['token']} --data JSON`, {then}"
    if wait.get("kind") == "child":
        child = engine.store.get_run(wait["run_id"])
        if child.status.value == "waiting":  # say what the child waits for
            inner = _how_to_continue(engine, child).removeprefix("it ")
            return f"it waits for child run {child.id}, which {inner}; then the parent goes on"
        return f"it waits for child run {child.id}: `durable-yaml resume {child.id}`, {then}"
    return f"continue it with `durable-yaml resume {run.id}`"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="durable-yaml")
def cli() -> None:
    """Durable workflows: YAML steps, Python functions, state that survives anything."""


@cli.command()
@click.argument("paths", nargs=-1)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option(
    "-m",
    "--module",
    "modules",
    multiple=True,
    metavar="MODULE",
    help="Also check `call` names against the steps these modules register.",
)
@click.option("--workflows", "workflows", metavar="DIR")
def validate(
    paths: tuple[str, ...], fmt: str, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Check workflow files or folders (default: the workflows folder)."""
    settings = resolve_settings(modules=modules, workflows=workflows)
    targets = list(paths) or [settings.workflows]
    for target in targets:
        if not Path(target).exists():
            raise click.UsageError(f"no such file or folder: {target}")
    registered = None
    if settings.modules:
        engine = Engine(settings)
        registered = engine.registered()
    catalog = check_paths(targets, registered)
    problems: list[Problem] = catalog.problems
    if fmt == "json":
        _json(
            {
                "files": catalog.files,
                "valid": not problems,
                "workflows": sorted(catalog.workflows),
                "problems": [p.as_dict() for p in problems],
            }
        )
    else:
        for p in problems:
            click.echo(str(p))
        files = {p.path for p in problems}
        summary = (
            f"{catalog.files} file(s) checked, {len(files)} with problems ({len(problems)} in all)"
        )
        click.echo(summary if problems else f"{catalog.files} file(s) valid", err=bool(problems))
    if problems:
        sys.exit(1)


@cli.command()
@click.argument("workflow")
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid")
@settings_options
def graph(
    workflow: str, fmt: str, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Draw the compiled state machine of WORKFLOW (a file or an id)."""
    engine = Engine(resolve_settings(db=db, modules=(), workflows=workflows), import_steps=False)
    click.echo(render_graph(engine.workflow(workflow), fmt), nl=False)


@cli.command()
@click.argument("workflow")
@click.option("--payload", help="The payload as JSON.")
@click.option("--payload-file", type=str, help="A file holding the payload as JSON.")
@settings_options
def run(
    workflow: str,
    payload: str | None,
    payload_file: str | None,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
) -> None:
    """Run WORKFLOW (a file or an id) now, in this process, to the end."""
    data = _read_payload(payload, payload_file)
    engine = _engine(db, modules, workflows)
    machine = engine.workflow(workflow)
    _stop_on_sigterm()
    result = engine.run(machine, data, LiveReporter())
    _finish(engine, result)


@cli.command()
@click.argument("run_id")
@settings_options
def resume(run_id: str, db: str | None, modules: tuple[str, ...], workflows: str | None) -> None:
    """Continue RUN_ID from its persisted state."""
    engine = _engine(db, modules, workflows)
    _stop_on_sigterm()
    before = engine.store.get_run(run_id)
    click.echo(
        f"resuming run {run_id} of {before.workflow_id} v{before.version} at step {before.current_step}"
    )
    _finish(engine, engine.resume(run_id, LiveReporter()))


@cli.command()
@click.argument("event")
@click.option("--payload", help="The event payload as JSON (default {}).")
@click.option("--idempotency-key", help="At most one set of runs per key (kept 30 days).")
@settings_options
def send(
    event: str,
    payload: str | None,
    idempotency_key: str | None,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
) -> None:
    """Record EVENT: queue the runs it triggers, resume the runs waiting for it."""
    data = _read_payload(payload, None)
    engine = Engine(
        resolve_settings(db=db, modules=modules, workflows=workflows), import_steps=False
    )
    sent = engine.send_event(event, {} if data is None else data, idempotency_key)
    if sent.duplicate:
        click.echo(
            f"idempotency key {idempotency_key!r} was used already: nothing new was queued",
            err=True,
        )
    for run_id in sent.run_ids:
        click.echo(f"{'already queued' if sent.duplicate else 'queued'} {run_id}")
    for run_id in sent.resumed:
        click.echo(f"resumed {run_id}")
    if not sent.run_ids and not sent.resumed and not sent.duplicate:
        click.echo(
            f"event {event} recorded; no workflow is triggered by it and no run waits for it"
        )


@cli.command()
@click.argument("token")
@click.option("--data", help="The step's output as JSON (default null).")
@settings_options
def complete(
    token: str, data: str | None, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Complete a wait_for_token step with DATA."""
    value = None if data is None else parse_json(data, "--data")
    engine = Engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    run_id = engine.complete_token(token, value)
    click.echo(
        f"completed; run {run_id} continues (a worker picks it up, or: durable-yaml resume {run_id})"
    )


@cli.command()
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1000),
    default=4,
    show_default=True,
    help="Runs executed at once by this process.",
)
@click.option(
    "--queue", "queues", multiple=True, metavar="Q", help="Only these queues (repeatable)."
)
@click.option(
    "--grace",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds in-flight steps get to finish on SIGTERM/SIGINT.",
)
@click.option("--no-schedules", is_flag=True, help="Do not fire cron schedules here.")
@click.option(
    "--lease-seconds",
    type=click.FloatRange(1, 3600),
    default=30.0,
    show_default=True,
    help="How long a run stays leased without a heartbeat (then others take it).",
)
@settings_options
def worker(
    concurrency: int,
    queues: tuple[str, ...],
    grace: float,
    no_schedules: bool,
    lease_seconds: float,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
) -> None:
    """Execute queued runs, fire cron schedules and wake timers until stopped."""
    import logging

    from .worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    engine = _engine(db, modules, workflows)
    engine.refresh_catalog()
    w = Worker(
        engine,
        concurrency=concurrency,
        queues=queues,
        grace=grace,
        schedules=not no_schedules,
        lease_seconds=lease_seconds,
    )
    click.echo(w.status_line())
    for p in engine.catalog.problems:
        click.echo(f"  skipped: {p}", err=True)
    w.run()
    click.echo("worker stopped")


@cli.command()
@click.argument("directory", default=".")
def init(directory: str) -> None:
    """Create a starter project in DIRECTORY: a workflow, its steps module and config."""
    from importlib import resources

    target = Path(directory)
    files = {
        target / "workflows" / "hello.yaml": "hello.yaml",
        target / "workflows" / "steps.py": "steps.py",
        target / "workflows" / "tests" / "hello.test.yaml": "hello.test.yaml",
    }
    existing = [str(p) for p in [*files, target / "pyproject.toml"] if p.exists()]
    if existing:
        raise click.UsageError(f"{', '.join(existing)} already exist(s); nothing was written")
    try:
        (target / "workflows" / "tests").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.UsageError(
            f"cannot create {target / 'workflows'}: {exc.strerror or exc}"
        ) from None
    starter = resources.files("engine").joinpath("starter")
    for path, name in files.items():
        path.write_text(starter.joinpath(name).read_text("utf-8"), "utf-8")
    (target / "workflows" / "__init__.py").write_text("")
    (target / "pyproject.toml").write_text(
        '[tool.durable-yaml]\nmodules = ["workflows.steps"]\nworkflows = "workflows"\n'
        '# db = "postgresql://user@host/db"   # default: sqlite:///.durable-yaml/state.db\n'
    )
    click.echo(f"created {target / 'workflows'} and {target / 'pyproject.toml'}; try:")
    click.echo(f'  cd {directory} && durable-yaml run hello --payload \'{{"name": "Ada"}}\'')
    click.echo(f"  cd {directory} && durable-yaml test      # its test, on a virtual clock")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@settings_options
def serve(
    host: str, port: int, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """The HTTP API (/api, /openapi.json) and the dashboard (/)."""
    import os

    from .server.security import is_loopback

    key = os.environ.get("DURABLE_YAML_API_KEY") or None
    if key is None and not is_loopback(host):
        raise click.UsageError(
            f"refusing to listen on {host} without an API key: set DURABLE_YAML_API_KEY "
            "(clients send it as `Authorization: Bearer ...`), or listen on 127.0.0.1"
        )
    import uvicorn

    from .server import create_app

    _check_port_free(host, port)
    engine = Engine(
        resolve_settings(db=db, modules=modules, workflows=workflows), import_steps=False
    )
    engine.refresh_catalog()
    engine.save_all_definitions()
    if key is None:
        click.echo("no DURABLE_YAML_API_KEY: listening on loopback only, without authentication")
    url = engine.store.engine.url.render_as_string(hide_password=True)
    click.echo(f"dashboard http://{host}:{port}/  API http://{host}:{port}/api  database {url}")
    max_body = os.environ.get("DURABLE_YAML_MAX_BODY", "")
    if max_body and not max_body.isdigit():
        raise click.UsageError("DURABLE_YAML_MAX_BODY must be a number of bytes")
    app = create_app(engine, key, port=port, **({"max_body": int(max_body)} if max_body else {}))
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _check_port_free(host: str, port: int) -> None:
    """Say so now (exit 1) if the port is taken, rather than after uvicorn's exit 3."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise click.UsageError(f"--host {host}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                "(another server is running there? choose another --port)"
            ) from None


@cli.group()
def schedules() -> None:
    """Cron workflows."""


@schedules.command("list")
@click.option("--count", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@settings_options
def schedules_list(
    count: int, as_json: bool, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Cron workflows with their next fire times (UTC and local) and last fire."""
    engine = Engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    listed = schedule_views(engine, time.time(), count)
    if as_json:
        _json(listed)
        return
    if not listed:
        click.echo(f"no cron workflows in {engine.settings.workflows}")
    for s in listed:
        last = s["last_fire"] or "never"
        click.echo(f"{s['workflow']:<24} {s['cron']:<16} {s['timezone']:<18} last {last}")
        if s["error"]:
            click.echo(f"    {s['error']}")
        for fire in s["next"]:
            click.echo(f"    next {fire['utc']}  ({fire['local']})")


@cli.group()
def workers() -> None:
    """Worker processes."""


@workers.command("list")
@click.option("--json", "as_json", is_flag=True)
@settings_options
def workers_list(
    as_json: bool, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Live workers: host, pid, queues, concurrency, running runs, last heartbeat."""
    store = Engine(resolve_settings(db=db, workflows=workflows), import_steps=False).store
    listed = [
        {**w, "started_at": iso(w["started_at"]), "heartbeat_at": iso(w["heartbeat_at"])}
        for w in store.list_workers(store.now())
    ]
    if as_json:
        _json(listed)
        return
    if not listed:
        click.echo("no live workers")
    for w in listed:
        queues = ",".join(w["queues"] or []) or "all"
        click.echo(
            f"{w['id']:<40} {w['host']:<20} pid {w['pid']:<8} queues {queues:<16} "
            f"running {w['running']}/{w['concurrency']}  heartbeat {w['heartbeat_at']}"
        )


@cli.group()
def runs() -> None:
    """Inspect and control runs."""


@runs.command("list")
@click.option("--status", type=click.Choice([s.value for s in RunStatus]))
@click.option("--workflow", "workflow_id")
@click.option("--limit", type=click.IntRange(1, 10000), default=20)
@click.option("--json", "as_json", is_flag=True)
@settings_options
def runs_list(
    status: str | None,
    workflow_id: str | None,
    limit: int,
    as_json: bool,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
) -> None:
    """The newest runs first."""
    engine = Engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    found = engine.store.list_runs(RunStatus(status) if status else None, workflow_id, limit)
    if as_json:
        _json([run_summary(r) for r in found])
        return
    for r in found:
        click.echo(
            f"{r.id}  {r.status.value:<9}  {r.workflow_id} v{r.version}  {iso(r.created_at)}"
            + (f"  {r.error}" if r.error else "")
        )


@runs.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
@settings_options
def runs_show(
    run_id: str, as_json: bool, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """One run with its steps and attempts."""
    engine = Engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    detail = run_detail(engine.store, engine.store.get_run(run_id))
    if as_json:
        _json(detail)
        return
    click.echo(f"run {detail['id']}  {detail['workflow']} v{detail['version']}  {detail['status']}")
    click.echo(f"created {detail['created_at']}  finished {detail['finished_at'] or '-'}")
    click.echo(f"payload: {json.dumps(detail['payload'], default=str)}")
    for s in detail["steps"]:
        click.echo(
            f"  {s['id']:<18} {s['status']:<9} attempts={s['attempts']}"
            + (f"  error: {s['error']}" if s["error"] else "")
        )
    if detail["error"]:
        click.echo(f"error: {detail['error']}")
    click.echo(f"output: {json.dumps(detail['output'], default=str)}")


@runs.command("logs")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
@settings_options
def runs_logs(
    run_id: str, as_json: bool, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """The logs of a run."""
    engine = Engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    engine.store.get_run(run_id)
    entries = [log_view(e) for e in engine.store.get_logs(run_id, limit=1_000_000)]
    if as_json:
        _json(entries)
        return
    for e in entries:
        where = f"{e['step']}#{e['attempt']}" if e["step"] else "-"
        extra = f"  {json.dumps(e['extra'])}" if e["extra"] else ""
        click.echo(f"{e['time']}  {e['level']:<7} {where:<20} {e['message']}{extra}")


@runs.command("cancel")
@click.argument("run_id")
@settings_options
def runs_cancel(
    run_id: str, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Cancel a run (and its child runs) at its next step boundary."""
    engine = Engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    run_ = engine.store.request_cancel(run_id, engine.store.now())
    if run_.status == RunStatus.CANCELLED:
        click.echo(f"cancelled run {run_id}")
    elif run_.finished:
        click.echo(f"run {run_id} had already ended: {run_.status.value}")
    else:
        click.echo(f"run {run_id} is executing; it stops at its next step boundary")


@runs.command("replay")
@click.argument("run_id")
@settings_options
def runs_replay(
    run_id: str, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Run again with the same payload, as a new run, in this process."""
    engine = _engine(db, modules, workflows)
    _stop_on_sigterm()
    click.echo(f"replaying run {run_id}")
    _finish(engine, engine.replay(run_id, LiveReporter()))


@cli.command("test")
@click.argument("paths", nargs=-1)
@settings_options
def test_command(
    paths: tuple[str, ...], db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Run workflow tests (*.test.yaml) on a virtual clock; exit 1 if any fails."""
    from .testfiles import find_test_files, run_test_file

    settings = resolve_settings(modules=modules, workflows=workflows)
    targets = list(paths) or [settings.workflows, str(Path(settings.project_dir) / "tests")]
    for target in paths:
        if not Path(target).exists():
            raise click.UsageError(f"no such file or folder: {target}")
    files = find_test_files(targets)
    if not files:
        raise click.UsageError(f"no *.test.yaml files in {', '.join(targets)}")
    failed = 0
    for path in files:
        result = run_test_file(path, settings.workflows, settings.modules, settings.project_dir)
        mark = "PASS" if result.passed else "FAIL"
        click.echo(f"{mark} {result.path} ({result.seconds:.2f}s)")
        for problem in result.problems:
            click.echo(f"    {problem}")
        failed += not result.passed
    click.echo(f"{len(files) - failed} passed, {failed} failed")
    if failed:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: map every error a user can cause to a message and an exit code."""
    try:
        cli.main(args=argv, prog_name="durable-yaml", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt (and our SIGTERM)
        click.echo(
            "interrupted; a run's state is kept: continue it with `durable-yaml resume RUN_ID`",
            err=True,
        )
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo(
            "\ninterrupted; the run's state is kept: continue it with `durable-yaml resume RUN_ID`",
            err=True,
        )
        sys.exit(130)
    except WorkflowInvalid as exc:
        for p in exc.problems:
            click.echo(str(p), err=True)
        sys.exit(1)
    except (EngineError, DslError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 1))
    sys.exit(0)
