"""`runs`: inspect and control runs."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import click

from ..models import RunStatus
from ..service import Engine
from ..settings import resolve_settings
from ..views import iso, log_view, run_detail, run_summary
from .common import _engine, _json, cli, settings_options
from .foreground import VERBOSE, _drive_foreground, _finish


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
@VERBOSE
@settings_options
def runs_show(
    run_id: str,
    as_json: bool,
    verbose: bool,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
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
        trace = _traceback(s, verbose)
        if trace:
            click.echo(textwrap.indent(trace.rstrip("\n"), "      "))
    if detail["waiting"]:
        click.echo(_waiting_line(detail["waiting"]))
    if detail["error"]:
        click.echo(f"error: {detail['error']}")
    click.echo(f"output: {json.dumps(detail['output'], default=str)}")


def _waiting_line(w: dict[str, Any]) -> str:
    """`runs show`'s account of what a waiting run waits for and how to answer it."""
    what = {
        "event": lambda: f"event {w['event']} matching {json.dumps(w['match'], default=str)}",
        "token": lambda: f"token {w['token']}",
        "timer": lambda: f"a timer, waking at {w['wake_at']}",
        "child": lambda: f"child run {w['run_id']} of {w['workflow']}",
    }.get(w["kind"], lambda: f"{w['kind']} {json.dumps(w.get('wait'), default=str)}")()
    deadline = f"; times out at {w['deadline']}" if w.get("deadline") else ""
    line = f"waiting at step {w['step']} since {w['since']} for {what}{deadline}"
    return line + (f"\n  to continue: {w['command']}" if w.get("command") else "")


def _traceback(step: dict[str, Any], verbose: bool) -> str | None:
    if step["status"] != "failed":
        return None
    if not verbose:
        return step["traceback"]  # type: ignore[no-any-return]
    full = [h["traceback_full"] for h in step["attempt_history"] if h.get("traceback_full")]
    return full[-1] if full else None


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
@VERBOSE
@settings_options
def runs_replay(
    run_id: str, verbose: bool, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Run again with the same payload, as a new run, in this process."""
    engine = _engine(db, modules, workflows)
    click.echo(f"replaying run {run_id}")
    _finish(engine, _drive_foreground(lambda r: engine.replay(run_id, r)), verbose)
