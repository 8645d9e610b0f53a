"""What every command shares: the command group, settings options, JSON and payload input."""

from __future__ import annotations

import gc
import importlib
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from dsl.limits import JSON_SIZE_MAX

from ..inputs import parse_json
from ..settings import Settings, resolve_settings

if TYPE_CHECKING:
    from ..service import Engine

__all__ = ["EXIT_WAITING", "cli", "new_engine", "settings_options"]

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would raise KeyboardInterrupt, so both end alike."""


def stop_on_sigterm() -> None:
    """SIGTERM ends the command as Ctrl-C does (exit 130, what was done kept, the databases
    closed), instead of killing it where it stands."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, interrupt)


def new_engine(settings: Settings, *, import_steps: bool = True) -> Engine:
    """The engine, imported here: `--help` and `validate` never load the store, SQLAlchemy
    or the runner (they are imported by the commands that use them). The engine's modules
    imported, the command's start-up is over (`start_up_done`): the user's step modules,
    which making the engine imports, are imported with the garbage collector on."""
    from ..service import Engine

    start_up_done()
    return Engine(settings, import_steps=import_steps)


# Whether `entry` (the `durable-yaml` process itself) turned the garbage collector off for
# the command's start-up
collector_held = False


def start_up_done() -> None:
    """The command's start-up is over (its own imports and its libraries', before any user
    code): the garbage collector, which `entry` turned off, is on again, and what start-up
    built is frozen out of its collections (`gc.freeze`). While start-up imports modules,
    each collection walks every object built so far: 40-50 ms of the 0.3-0.4 s before a
    worker's first claim or a `run`'s first step (issue #15). Frozen, the modules and
    classes that live as long as the process are not walked again by a worker's collections
    either. What our start-up left unreachable in cycles stays (a worker's: about 1,500
    objects); the user's step modules come after, so what they leave is collected (found
    by the reviewer helper: frozen, a module's import garbage stayed for the process's
    life). Every command that runs user code calls this first: `new_engine`, `validate`
    and `test`. In a process that did not start at `entry` (a test calling `main`),
    nothing changes."""
    global collector_held
    if collector_held:
        collector_held = False
        gc.freeze()
        gc.enable()


def _engine(db: str | None, modules: tuple[str, ...], workflows: str | None) -> Engine:
    return new_engine(resolve_settings(db=db, modules=modules, workflows=workflows))


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


# Each command's module, imported when the command is used: `validate` then loads neither
# the runner nor the store, and `--help` (which lists them all) everything but the engine.
_COMMANDS = {
    **dict.fromkeys(("validate", "graph", "init", "test"), "authoring"),
    **dict.fromkeys(("run", "resume", "send", "complete"), "foreground"),
    **dict.fromkeys(("worker", "serve", "schedules", "workers", "queues"), "operate"),
    "runs": "runs",
}


class _Commands(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _COMMANDS:
            importlib.import_module(f"{__package__}.{_COMMANDS[cmd_name]}")
        return self.commands.get(cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="durable-yaml")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Durable workflows: YAML steps, Python functions, state that survives anything."""
    if os.environ.get("NO_COLOR"):  # https://no-color.org: no colour even on a terminal
        ctx.color = False
