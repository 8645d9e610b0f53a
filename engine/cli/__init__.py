"""`durable-yaml`: parse options, call the engine, render the result. Nothing else."""

from __future__ import annotations

import sys

import click

from dsl import DslError, WorkflowInvalid

from ..errors import EngineError
from .common import cli

__all__ = ["cli", "main"]


# Commands that drive a run print its own resume command when interrupted (foreground.py);
# this is what any other command says (`runs logs --follow`, `serve`, a bulk action).
INTERRUPTED = "interrupted; what was done so far is stored (`durable-yaml runs list` shows runs)"


def main(argv: list[str] | None = None) -> None:
    """Entry point: map every error a user can cause to a message and an exit code."""
    for arg in sys.argv[1:] if argv is None else argv:
        if not _utf8(arg):  # bytes the locale could not decode: no store can hold them
            click.echo(f"error: argument {ascii(arg)[1:-1]} is not valid UTF-8", err=True)
            sys.exit(2)
    try:
        cli.main(args=argv, prog_name="durable-yaml", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt (and our SIGTERM)
        click.echo(
            INTERRUPTED,
            err=True,
        )
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo(
            f"\n{INTERRUPTED}",
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


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
