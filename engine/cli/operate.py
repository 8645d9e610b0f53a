"""Long-running processes and what they show: worker, serve, schedules, workers."""

from __future__ import annotations

import time

import click

from ..settings import resolve_settings
from .common import _engine, _json, cli, new_engine, settings_options


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
    "--group-commit/--no-group-commit",
    default=None,
    help="Commit the results of steps that end together in one transaction (default: on "
    "SQLite, off on PostgreSQL).",
)
@click.option(
    "--lease-seconds",
    type=click.FloatRange(1, 3600),
    default=30.0,
    show_default=True,
    help="How long a run stays leased without a heartbeat (then others take it).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    metavar="P",
    help="Serve Prometheus metrics on http://HOST:P/metrics (this worker's own).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address of the metrics endpoint (0.0.0.0 for a scraper on another host).",
)
@settings_options
def worker(
    concurrency: int,
    queues: tuple[str, ...],
    grace: float,
    no_schedules: bool,
    group_commit: bool | None,
    lease_seconds: float,
    metrics_port: int | None,
    metrics_host: str,
    db: str | None,
    modules: tuple[str, ...],
    workflows: str | None,
) -> None:
    """Execute queued runs, fire cron schedules and wake timers until stopped."""
    import logging

    from ..tracing import RunContextFilter, StepLogFormatter
    from ..worker import Worker

    handler = logging.StreamHandler()
    handler.setFormatter(StepLogFormatter())  # a run's records end with [run=... step=...#n]
    handler.addFilter(RunContextFilter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    engine = _engine(db, modules, workflows)
    engine.refresh_catalog()
    w = Worker(
        engine,
        concurrency=concurrency,
        queues=queues,
        grace=grace,
        schedules=not no_schedules,
        lease_seconds=lease_seconds,
        group_commit=group_commit,
    )
    metrics = None
    if metrics_port is not None:
        from ..metrics import serve_metrics

        try:
            metrics = serve_metrics(engine.store, metrics_host, metrics_port)
        except OSError as exc:
            raise click.UsageError(
                f"--metrics-port {metrics_port}: cannot listen on {metrics_host}:{metrics_port}: "
                f"{exc.strerror or exc}"
            ) from None
    click.echo(w.status_line())
    if metrics is not None:
        click.echo(f"metrics http://{metrics_host}:{metrics_port}/metrics")
    for p in engine.catalog.problems:
        click.echo(f"  skipped: {p}", err=True)
    try:
        w.run()
    finally:
        if metrics is not None:
            metrics.shutdown()
    click.echo("worker stopped")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@settings_options
def serve(
    host: str, port: int, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """The HTTP API (/api, /openapi.json) and the dashboard (/)."""
    import os

    from ..server.security import is_loopback

    key = os.environ.get("DURABLE_YAML_API_KEY") or None
    if key is None and not is_loopback(host):
        raise click.UsageError(
            f"refusing to listen on {host} without an API key: set DURABLE_YAML_API_KEY "
            "(clients send it as `Authorization: Bearer ...`), or listen on 127.0.0.1"
        )
    from ..inputs import parse_count
    from ..server import create_app, serve_app

    _check_port_free(host, port)
    engine = new_engine(
        resolve_settings(db=db, modules=modules, workflows=workflows), import_steps=False
    )
    engine.refresh_catalog()
    engine.save_all_definitions()
    if key is None:
        click.echo("no DURABLE_YAML_API_KEY: listening on loopback only, without authentication")
    url = engine.store.engine.url.render_as_string(hide_password=True)
    click.echo(f"dashboard http://{host}:{port}/  API http://{host}:{port}/api  database {url}")
    max_body = os.environ.get("DURABLE_YAML_MAX_BODY", "")
    body_limit = parse_count(max_body)
    if max_body and body_limit is None:
        raise click.UsageError(
            f"DURABLE_YAML_MAX_BODY={max_body!r} must be a number of bytes (e.g. 1048576)"
        )
    app = create_app(
        engine,
        key,
        port=port,
        reload_workflows=True,
        **({"max_body": body_limit} if body_limit is not None else {}),
    )
    serve_app(app, host, port)


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
    from ..views import schedule_views  # (not at import: a worker's start does without it)

    engine = new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False)
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
    from ..views import iso

    store = new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False).store
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
def queues() -> None:
    """Queues: depth, limits, pause and resume."""


@queues.command("list")
@click.option("--json", "as_json", is_flag=True)
@settings_options
def queues_list(
    as_json: bool, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Each queue: queued, running and waiting runs, its limits, whether it is paused."""
    store = new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False).store
    listed = store.queue_stats()
    if as_json:
        _json(listed)
        return
    if not listed:
        click.echo("no queues yet")
    for q in listed:
        limit = f"concurrency {q['concurrency']}" if q["concurrency"] else "unlimited"
        if q["rate_limit"]:
            limit += f", {q['rate_limit']} per {q['rate_period']:g}s"
        state = "PAUSED" if q["paused"] else "active"
        click.echo(
            f"{q['name']:<24} {state:<7} queued {q['queued']:<6} running {q['running']:<5} "
            f"waiting {q['waiting']:<5} {limit}"
        )


@queues.command("pause")
@click.argument("name")
@settings_options
def queues_pause(
    name: str, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Start no run of queue NAME until it is resumed (its runs stay queued; runs already
    executing go on)."""
    new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False).pause_queue(name)
    click.echo(f"paused queue {name}: its queued runs start when it is resumed")


@queues.command("resume")
@click.argument("name")
@settings_options
def queues_resume(
    name: str, db: str | None, modules: tuple[str, ...], workflows: str | None
) -> None:
    """Let queue NAME start runs again."""
    new_engine(resolve_settings(db=db, workflows=workflows), import_steps=False).resume_queue(name)
    click.echo(f"resumed queue {name}")
