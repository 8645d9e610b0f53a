"""`durable-yaml`: parse options, call the engine, render the result. Nothing else."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading

import click

from dsl import DslError, WorkflowInvalid

from ..errors import EngineError
from . import common
from .common import cli

__all__ = ["cli", "entry", "main"]


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


def entry() -> None:
    """The `durable-yaml` command (and `python -m engine`): `main`, then, where nothing needs
    it, an exit that skips the interpreter's teardown. Freeing every module and object of
    a process about to end cost 40-120 ms of each command (issue #15: a quarter of
    `validate`); the operating system frees them at once. What Python promises of an exit
    is still done: the `atexit` handlers run (logging's flush, a tracing exporter's last
    spans) and stdout and stderr are flushed; and what the teardown did for the command's
    own objects is done first: every database it opened is closed (SQLite's last close
    folds the write-ahead log into the database file, so a copy of the file alone is
    whole; PostgreSQL's connections end with a goodbye).

    The ordinary exit is taken instead when the teardown may matter to code that is not
    ours or to someone watching: once a user's step module was imported (what it holds is
    finalized by the teardown: a file written and never closed, its own SQLite database,
    a C library's buffered output), while a non-daemon thread runs (the ordinary exit
    waits for it), under a profiler or a tracer (cProfile writes its profile after the
    program returns), and with `python -i` (its prompt comes after the program). An
    exception `main` does not map to a message propagates as it would without this.

    The garbage collector is off until the command's start-up is over (see
    `common.start_up_done`); what start-up froze is unfrozen for an ordinary exit, so its
    teardown finalizes what it would without the freeze."""
    gc.disable()
    common.collector_held = True
    try:
        main()
    except SystemExit as exc:
        _exit_now(exc.code)
    finally:
        gc.unfreeze()


def _exit_now(code: object) -> None:
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # what `sys.exit("message")` does
        print(code, file=sys.stderr)
        status = 1
    registry = sys.modules.get("engine.registry")
    main_thread = threading.main_thread()
    if (
        getattr(registry, "user_modules_imported", False)
        or sys.getprofile() is not None
        or sys.gettrace() is not None
        or sys.flags.inspect
        or os.environ.get("PYTHONINSPECT")
        or any(
            t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()
        )
    ):
        sys.exit(status)
    atexit._run_exitfuncs()  # the handlers an ordinary exit runs, in the same order
    store = sys.modules.get("engine.store.db")
    if store is not None:  # (loaded by every command that opens a database)
        with contextlib.suppress(Exception):  # one that cannot say goodbye: the OS ends it
            store.close_all()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with that descriptor closed (`>&-`): nothing to flush
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`), a closed stream
            if stream is sys.stdout and status == 0:
                status = 120  # what the interpreter exits with when it cannot flush stdout
    os._exit(status)
