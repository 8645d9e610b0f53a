"""Commands that drive a run in this process, and how they show it: run, resume, send, complete."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dsl import Machine

from ..durations import to_seconds
from ..errors import ConfigError
from ..inputs import parse_json
from ..models import Run, RunStatus
from ..registry import registered_names
from ..settings import resolve_settings
from ..views import last_failure, user_traceback, waiting_view
from .common import (
    EXIT_WAITING,
    Terminated,
    _engine,
    _read_payload,
    cli,
    new_engine,
    settings_options,
    stop_on_sigterm,
)
from .reporter import LiveReporter

if TYPE_CHECKING:
    from ..service import Engine


class _Remembering(LiveReporter):
    """The live reporter, remembering the id of the run it shows (for the resume command)."""

    run_id: str | None = None

    def run_started(self, run: Run) -> None:
        self.run_id = run.id
        super().run_started(run)


def _drive_foreground(drive: Callable[[LiveReporter], Run], run_id: str | None = None) -> Run:
    """`drive(reporter)` with SIGTERM and SIGINT ending it cleanly: the runner releases the
    run (its state kept) and this exits 130 printing the exact `resume` command."""
    stop_on_sigterm()  # a run stopped so: its lease released, its state kept, exit 130
    reporter = _Remembering()
    try:
        return drive(reporter)
    except KeyboardInterrupt as exc:
        reporter.close()
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        name = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT (Ctrl-C)"
        shown = reporter.run_id or run_id
        if shown is None:
            click.echo(f"\ninterrupted by {name} before the run started", err=True)
        else:
            click.echo(
                f"\ninterrupted by {name}; run {shown} keeps its state. "
                f"Continue it with: durable-yaml resume {shown}",
                err=True,
            )
        sys.exit(130)
    finally:
        reporter.close()


def _finish(engine: Engine, run: Run, verbose: bool = False) -> None:
    """Print how a foreground run ended and exit with SPEC's code; a failed run's traceback
    as the user's frames (all of it with `verbose`)."""
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
        _show_traceback(engine, run, verbose)
        click.echo(
            f"after fixing the cause: durable-yaml resume {run.id}  "
            f"(or start over: durable-yaml runs replay {run.id})"
        )
    else:
        click.echo(f"to run it again: durable-yaml runs replay {run.id}")
    sys.exit(1)


def _show_traceback(engine: Engine, run: Run, verbose: bool) -> None:
    failure = last_failure(engine.store, run.id)
    if failure is None or not failure.traceback:
        return
    text = (
        failure.traceback
        if verbose
        else user_traceback(failure.traceback, engine.settings.project_dir)
    )
    if text:
        click.echo(f"step {failure.step_key}, attempt {failure.attempt}:")
        click.echo(text.rstrip("\n"))
        if not verbose and "File " in failure.traceback:  # frames were left out
            click.echo("(the engine's and libraries' frames are hidden; --verbose shows them)")


VERBOSE = click.option(
    "-v", "--verbose", is_flag=True, help="Show full tracebacks, the engine's frames included."
)


def _check_steps_known(engine: Engine, machine: Machine) -> None:
    """Refuse, before anything is stored, a workflow calling steps no module registered
    (with modules imported, loading the workflow checked that already)."""
    if engine.steps_imported:
        return
    calls = {str(s.config["function"]) for s in machine.states if s.config.get("function")}
    missing = sorted(calls - registered_names())
    if missing:
        raise ConfigError(
            f"workflow {machine.workflow_id} calls {', '.join(missing)}, but no step module "
            f"is configured for {engine.settings.project_dir}: pass -m MODULE, set "
            "DURABLE_YAML_MODULES, or `modules = [...]` under [tool.durable-yaml] in its "
            "pyproject.toml; nothing was created"
        )


def _how_to_continue(engine: Engine, run: Run) -> str:
    """The exact commands that answer what the run waits for: an answer carrying the wait's
    match values and every field the workflow later reads from the step's output."""
    step = next((s for s in engine.store.get_steps(run.id) if s.step_key == run.current_step), None)
    wait = (step.wait if step else None) or {}
    then = f"then `durable-yaml resume {run.id}` (or let a worker continue it)"
    if wait.get("kind") in ("event", "token"):
        machine = Machine.from_json(engine.store.load_definition(run.definition_hash))
        view = waiting_view(run, step, machine) or {}
        what = (
            f"event {shlex.quote(wait['event'])}" if "event" in wait else f"token {wait['token']}"
        )
        return f"it waits for {what}: `{view['command']}`, {then}"
    if wait.get("kind") == "any":
        machine = Machine.from_json(engine.store.load_definition(run.definition_hash))
        alternatives = (waiting_view(run, step, machine) or {}).get("alternatives") or []
        answers = "; or ".join(
            f"{a['name']}: `{a['command']}`" for a in alternatives if a["kind"] != "timer"
        )
        return f"it waits for the first of its alternatives - {answers}, {then}"
    if wait.get("kind") == "child":
        child = engine.store.get_run(wait["run_id"])
        if child.status.value == "waiting":  # say what the child waits for
            inner = _how_to_continue(engine, child).removeprefix("it ")
            return f"it waits for child run {child.id}, which {inner}; then the parent goes on"
        return f"it waits for child run {child.id}: `durable-yaml resume {child.id}`, {then}"
    return f"continue it with `durable-yaml resume {run.id}`"


@cli.command()
@click.argument("workflow")
@click.option("--payload", help="The payload as JSON.")
@click.option("--payload-file", type=str, help="A file holding the payload as JSON.")
@click.option("--tag", "tags", multiple=True, metavar="K:V", help="Tag the run (repeatable).")
@VERBOSE
@settings_options
def run(
    workflow: str,
    payload: str | None,
    payload_file: str | None,
    tags: tuple[str, ...],
    verbose: bool,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
) -> None:
    """Run WORKFLOW (a file or an id) now, in this process, to the end."""
    data = _read_payload(payload, payload_file)
    path = Path(workflow)
    is_file = path.suffix in (".yaml", ".yml") or path.is_file()
    engine = new_engine(
        resolve_settings(db, modules, workflows, workflow_file=workflow if is_file else None)
    )
    machine = engine.workflow(workflow)
    _check_steps_known(engine, machine)
    result = _drive_foreground(
        lambda reporter: engine.run(machine, data, reporter, tags=list(tags))
    )
    _finish(engine, result, verbose)


@cli.command()
@click.argument("run_id")
@VERBOSE
@settings_options
def resume(
    run_id: str, verbose: bool, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Continue RUN_ID from its persisted state."""
    engine = _engine(db, modules, workflows)
    before = engine.store.get_run(run_id)
    click.echo(
        f"resuming run {run_id} of {before.workflow_id} v{before.version} at step {before.current_step}"
    )
    _finish(engine, _drive_foreground(lambda r: engine.resume(run_id, r), run_id), verbose)


@cli.command()
@click.argument("event")
@click.option("--payload", help="The event payload as JSON (default {}).")
@click.option("--idempotency-key", help="At most one set of runs per key (kept 30 days).")
@click.option("--tag", "tags", multiple=True, metavar="K:V", help="Tag the runs (repeatable).")
@click.option("--priority", type=int, help="Priority of the runs (higher first).")
@click.option("--ttl", metavar="DURATION", help="Not started within this, a run ends expired.")
@settings_options
def send(
    event: str,
    payload: str | None,
    idempotency_key: str | None,
    tags: tuple[str, ...],
    priority: int | None,
    ttl: str | None,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
) -> None:
    """Record EVENT: queue the runs it triggers, resume the runs waiting for it."""
    data = _read_payload(payload, None)
    engine = new_engine(
        resolve_settings(db=db, modules=modules, workflows=workflows), import_steps=False
    )
    sent = engine.send_event(
        event,
        {} if data is None else data,
        idempotency_key,
        tags=list(tags),
        priority=priority,
        ttl=to_seconds(ttl, "--ttl"),
    )
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
        click.echo(f"event {event} recorded; it started no run and resumed none")
        _warn_if_unheard(engine, event)


def _listened_events(engine: Engine) -> set[str]:
    """Event names something listens to: the folder's triggers and waits (a wait_for_any's
    branches included), and the waits of stored runs."""
    names: set[str] = set(engine.store.waited_event_names())

    def events_in(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("event"), str):
                names.add(value["event"])
            for v in value.values():
                events_in(v)
        elif isinstance(value, list):
            for v in value:
                events_in(v)

    for machine in engine.catalog.workflows.values():
        if machine.trigger.kind == "event" and machine.trigger.event:
            names.add(machine.trigger.event)
        for state in machine.states:
            if state.kind != "send_event":
                events_in(state.config)
    return names


def _warn_if_unheard(engine: Engine, event: str) -> None:
    """On stderr: nothing triggers or waits for `event` (a typo?), with the closest names."""
    import difflib

    listened = _listened_events(engine)
    if event in listened:
        return  # some run or workflow listens: none matched this payload
    close = difflib.get_close_matches(event, sorted(listened), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(f'`{c}`' for c in close)}?" if close else ""
    click.echo(
        f"warning: no workflow in {engine.settings.workflows} is triggered by `{event}` and "
        f"no workflow or run waits for it{hint}",
        err=True,
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
    engine = new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    run_id = engine.complete_token(token, value)
    click.echo(
        f"completed; run {run_id} continues (a worker picks it up, or: durable-yaml resume {run_id})"
    )
