"""`runs`: inspect and control runs, one or many (by the filters of `runs list`)."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from dsl import DurationError, InstantError, parse_duration, parse_instant

from ..follow import follow_logs
from ..models import FINISHED_STATUSES, RunFilter, RunStatus
from ..settings import resolve_settings
from ..views import iso, log_view, run_detail, run_summary
from .common import _engine, _json, cli, new_engine, settings_options, stop_on_sigterm
from .foreground import VERBOSE, _drive_foreground, _finish

if TYPE_CHECKING:
    from ..service import Engine

F = TypeVar("F", bound=Callable[..., Any])
STATUSES = [s.value for s in RunStatus]


@cli.group()
def runs() -> None:
    """Inspect and control runs."""


def filter_options(fn: F) -> F:
    """--status, --workflow, --tag, --since, --until: the filters of `runs list`, which
    bulk cancel and replay take too. All given must hold (AND)."""
    fn = click.option(
        "--until",
        metavar="WHEN",
        help="Created before: an ISO-8601 time, or a duration ago (1h).",
    )(fn)
    fn = click.option(
        "--since",
        metavar="WHEN",
        help="Created at or after: an ISO-8601 time, or a duration ago (1h, 7d).",
    )(fn)
    fn = click.option(
        "--tag", "tags", multiple=True, metavar="K:V", help="Has this tag (repeatable: all)."
    )(fn)
    fn = click.option("--workflow", "workflow_id", metavar="ID", help="Of this workflow.")(fn)
    fn = click.option(
        "--status",
        "statuses",
        multiple=True,
        type=click.Choice(STATUSES),
        help="In this status (repeatable: any of them).",
    )(fn)
    return fn


def _when(value: str | None, now: float, option: str) -> float | None:
    if value is None:
        return None
    try:
        return now - parse_duration(value)
    except DurationError:
        pass
    try:
        return parse_instant(value)
    except InstantError as exc:
        raise click.BadParameter(
            f"{value!r} is neither a duration (1h, 7d) nor an ISO-8601 time: {exc}",
            param_hint=option,
        ) from None


def _filter(
    engine: Engine,
    ids: tuple[str, ...],
    statuses: tuple[str, ...],
    workflow_id: str | None,
    tags: tuple[str, ...],
    since: str | None,
    until: str | None,
) -> RunFilter:
    now = engine.store.now()
    return RunFilter(
        statuses=tuple(RunStatus(s) for s in statuses),
        workflow_id=workflow_id,
        tags=tags,
        since=_when(since, now, "--since"),
        until=_when(until, now, "--until"),
        ids=ids,
    )


def _confirm(what: str, yes: bool) -> None:
    """Bulk actions ask on a terminal; without one, only --yes lets them go on."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{what}: not a terminal to ask for confirmation; add --yes")
    if not click.confirm(f"{what}?", default=False):
        raise click.UsageError(f"{what}: not confirmed; nothing was changed")


def _progress(label: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A progress line on stderr, rewritten as batches finish."""
    state = {"shown": False}

    def show(done: int, total: int) -> None:
        state["shown"] = True
        width = 30
        filled = width * done // total if total else width
        bar = "#" * filled + "-" * (width - filled)
        click.echo(f"\r{label} [{bar}] {done}/{total}", nl=False, err=True)

    def end() -> None:
        if state["shown"]:
            click.echo("", err=True)

    return show, end


@runs.command("list")
@filter_options
@click.option("--limit", type=click.IntRange(1, 10000), default=20)
@click.option("--json", "as_json", is_flag=True)
@settings_options
def runs_list(
    statuses: tuple[str, ...],
    workflow_id: str | None,
    tags: tuple[str, ...],
    since: str | None,
    until: str | None,
    limit: int,
    as_json: bool,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
) -> None:
    """The newest runs first, filtered by status, workflow, tags and creation time."""
    engine = new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    found = engine.list_runs(_filter(engine, (), statuses, workflow_id, tags, since, until), limit)
    if as_json:
        _json([run_summary(r) for r in found])
        return
    for r in found:
        click.echo(
            f"{r.id}  {r.status.value:<9}  {r.workflow_id} v{r.version}  {iso(r.created_at)}"
            + (f"  [{', '.join(r.tags)}]" if r.tags else "")
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
    """One run with its steps and attempts; for a queued run, why it has not started."""
    engine = new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    detail = run_detail(engine.store, engine.store.get_run(run_id))
    if as_json:
        _json(detail)
        return
    click.echo(f"run {detail['id']}  {detail['workflow']} v{detail['version']}  {detail['status']}")
    click.echo(f"created {detail['created_at']}  finished {detail['finished_at'] or '-'}")
    if detail["tags"]:
        click.echo(f"tags: {', '.join(detail['tags'])}")
    if detail["metadata"]:
        click.echo(f"metadata: {json.dumps(detail['metadata'], default=str)}")
    if detail["priority"]:
        click.echo(f"priority: {detail['priority']}")
    if detail["not_before"]:
        click.echo(f"starts at: {detail['not_before']}")
    if detail["expires_at"]:
        click.echo(f"expires at: {detail['expires_at']} (if not started by then)")
    blocked = detail["blocked_by"]
    if blocked:
        click.echo(f"blocked by: {blocked['reason']}: {blocked['detail']}")
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
        "children": lambda: (
            f"its child runs: {w['ended']} of {w['items']} ended ({w['started']} started)"
        ),
        "any": lambda: "the first of: " + ", ".join(_alternative(a) for a in w["alternatives"]),
    }.get(w["kind"], lambda: f"{w['kind']} {json.dumps(w.get('wait'), default=str)}")()
    deadline = f"; times out at {w['deadline']}" if w.get("deadline") else ""
    line = f"waiting at step {w['step']} since {w['since']} for {what}{deadline}"
    if w["kind"] == "any":  # one command per alternative: whichever is used first wins
        return line + "".join(
            f"\n  {a['name']}: {a['command']}" for a in w["alternatives"] if a["kind"] != "timer"
        )
    return line + (f"\n  to continue: {w['command']}" if w.get("command") else "")


def _alternative(a: dict[str, Any]) -> str:
    """One alternative of a wait_for_any, as `runs show` names it."""
    if a["kind"] == "event":
        return f"{a['name']} (event {a['event']} matching {json.dumps(a['match'], default=str)})"
    if a["kind"] == "token":
        return f"{a['name']} (token {a['token']})"
    return f"{a['name']} (a timer, at {a['wake_at']})"


def _traceback(step: dict[str, Any], verbose: bool) -> str | None:
    if step["status"] != "failed":
        return None
    if not verbose:
        return step["traceback"]  # type: ignore[no-any-return]
    full = [h["traceback_full"] for h in step["attempt_history"] if h.get("traceback_full")]
    return full[-1] if full else None


@runs.command("logs")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="JSON (with --follow: one object a line).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the run ends.")
@settings_options
def runs_logs(
    run_id: str,
    as_json: bool,
    follow: bool,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
) -> None:
    """The logs of a run."""
    engine = new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    engine.store.get_run(run_id)
    if follow:
        stop_on_sigterm()
        click.echo(f"following run {run_id} until it ends (Ctrl-C stops)", err=True)
        for entry in follow_logs(engine.store, run_id):
            view = log_view(entry)
            click.echo(json.dumps(view, default=str) if as_json else _log_line(view))
        return
    entries = [log_view(e) for e in engine.store.get_logs(run_id, limit=1_000_000)]
    if as_json:
        _json(entries)
        return
    for e in entries:
        click.echo(_log_line(e))


def _log_line(e: dict[str, Any]) -> str:
    where = f"{e['step']}#{e['attempt']}" if e["step"] else "-"
    extra = f"  {json.dumps(e['extra'])}" if e["extra"] else ""
    return f"{e['time']}  {e['level']:<7} {where:<20} {e['message']}{extra}"


def _bulk(engine: Engine, ids: tuple[str, ...], filters: dict[str, Any], verb: str) -> RunFilter:
    f = _filter(engine, ids, **filters)
    if f.empty:
        raise click.UsageError(
            f"give the ids of the runs to {verb}, or filters (--status, --workflow, --tag, "
            "--since, --until)"
        )
    return f


@runs.command("cancel")
@click.argument("run_ids", nargs=-1)
@filter_options
@click.option("--dry-run", is_flag=True, help="Only say how many runs would be cancelled.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@settings_options
def runs_cancel(
    run_ids: tuple[str, ...],
    dry_run: bool,
    yes: bool,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
    **filters: Any,
) -> None:
    """Cancel runs (and their child runs): by id, or every active run the filters select.
    An executing run stops at its next step boundary."""
    engine = new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    f = _bulk(engine, run_ids, filters, "cancel")
    if len(run_ids) == 1 and f == RunFilter(ids=run_ids) and not dry_run:
        _cancel_one(engine, run_ids[0])
        return
    n = engine.count_cancellable(f)
    click.echo(f"{n} active run(s) match")
    if dry_run or n == 0:
        return
    _confirm(f"cancel {n} run(s)", yes)
    show, end = _progress("cancelling")
    done = engine.cancel_runs(f, show)
    end()
    click.echo(f"cancelled {done} run(s)")


def _cancel_one(engine: Engine, run_id: str) -> None:
    run_ = engine.store.request_cancel(run_id, engine.store.now())
    if run_.status == RunStatus.CANCELLED:
        click.echo(f"cancelled run {run_id}")
    elif run_.finished:
        click.echo(f"run {run_id} had already ended: {run_.status.value}")
    else:
        click.echo(f"run {run_id} is executing; it stops at its next step boundary")


@runs.command("replay")
@click.argument("run_ids", nargs=-1)
@filter_options
@click.option("--dry-run", is_flag=True, help="Only say how many runs would be replayed.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@VERBOSE
@settings_options
def runs_replay(
    run_ids: tuple[str, ...],
    dry_run: bool,
    yes: bool,
    verbose: bool,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
    **filters: Any,
) -> None:
    """Run again with the same payload, as new runs. One id: in this process, shown step
    by step. Several ids or filters: queued for workers, in batches."""
    if len(run_ids) == 1 and not any(filters.values()) and not dry_run:
        engine = _engine(db, modules, workflows)
        click.echo(f"replaying run {run_ids[0]}")
        _finish(engine, _drive_foreground(lambda r: engine.replay(run_ids[0], r)), verbose)
        return
    engine = new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    f = _bulk(engine, run_ids, filters, "replay")
    n = engine.count_runs(f)
    click.echo(f"{n} run(s) match")
    if dry_run or n == 0:
        return
    _confirm(f"replay {n} run(s)", yes)
    show, end = _progress("replaying")
    new_ids = engine.replay_runs(f, show)
    end()
    click.echo(f"queued {len(new_ids)} replay(s)")


@runs.command("purge")
@click.option(
    "--older-than", required=True, metavar="DURATION", help="Finished longer ago than this (30d)."
)
@click.option(
    "--status",
    "status_list",
    metavar="S[,S...]",
    default=",".join(s.value for s in FINISHED_STATUSES),
    show_default=True,
    help="Finished statuses to purge.",
)
@click.option("--dry-run", is_flag=True, help="Only say how many runs would be deleted.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@settings_options
def runs_purge(
    older_than: str,
    status_list: str,
    dry_run: bool,
    yes: bool,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
) -> None:
    """Delete finished runs and everything that hangs off them (steps, attempts, logs,
    tags, answers, tokens, events no other run needs, old cron fires, idempotency keys)."""
    try:
        seconds = parse_duration(older_than)
    except DurationError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    statuses = []
    for name in filter(None, (s.strip() for s in status_list.split(","))):
        if name not in [s.value for s in FINISHED_STATUSES]:
            known = ", ".join(s.value for s in FINISHED_STATUSES)
            raise click.BadParameter(
                f"{name!r} is not a finished status ({known})", param_hint="--status"
            )
        statuses.append(RunStatus(name))
    engine = new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
    n = engine.count_purgeable(seconds, statuses)
    click.echo(f"{n} finished run(s) older than {older_than} match")
    if dry_run or n == 0:
        return
    _confirm(f"delete {n} run(s) and all that hangs off them", yes)
    show, end = _progress("purging")
    done = engine.purge(seconds, statuses, show)
    end()
    click.echo(f"purged {done} run(s)")
