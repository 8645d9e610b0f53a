"""How a foreground run shows itself while it goes (`run`, `resume`, `runs replay`).

Each step is shown as it starts and as it ends, and each `ctx.logger` line as it is written.
On an interactive terminal a working step is a spinner with its elapsed time (rich, redrawn
in place, gone when the step ends); otherwise - a pipe, a file, `NO_COLOR`, `TERM=dumb` -
every line is plain text printed once, without escape codes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

import click

from dsl import State

from ..models import NewLog, Run
from ..transitions import Done, Enter, Failed, Outcome, Skipped, Suspended
from ..views import iso

__all__ = ["LiveReporter", "interactive"]

_LEVEL_COLOURS = {"debug": "bright_black", "info": "blue", "warning": "yellow", "error": "red"}


def interactive(stream: TextIO) -> bool:
    """Whether `stream` is a terminal that may be redrawn and coloured."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Working:
    """The spinner's line: the step's name and how long it has been working."""

    def __init__(self, label: str) -> None:
        from rich.spinner import Spinner

        self.label = label
        self.started = time.monotonic()
        self.spinner = Spinner("dots", style="cyan")

    def __rich__(self) -> Any:
        self.spinner.update(text=f" {self.label}  {time.monotonic() - self.started:.1f}s")
        return self.spinner


class LiveReporter:
    """Shows each step as it goes: its start, its log lines, its attempt, duration, outcome."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.width = 18
        self.stream = stream or sys.stdout
        self.fancy = interactive(self.stream)
        # None: click colours a terminal and strips the codes elsewhere; False: never
        self.colour: bool | None = False if os.environ.get("NO_COLOR") else None
        self._lock = threading.RLock()
        self._live: Any = None
        self._console: Any = None
        # The lines are shown here: the Python logger's copy of them (`durable_yaml.step`,
        # for workers) would print them a second time if a steps module configured logging.
        logging.getLogger("durable_yaml.step").propagate = False

    # output ----------------------------------------------------------------------------------
    def _echo(self, text: str) -> None:
        with self._lock:
            if self._live is not None:
                from rich.text import Text

                self._console.print(Text.from_ansi(text), soft_wrap=True)
            else:
                click.echo(text, file=self.stream, color=self.colour)

    def _style(self, text: str, colour: str) -> str:
        return click.style(text, fg=colour) if self.colour is None else text

    def _spin(self, label: str) -> None:
        from rich.console import Console
        from rich.live import Live

        with self._lock:
            self._stop()
            self._console = Console(file=self.stream, highlight=False)
            self._live = Live(
                _Working(label),
                console=self._console,
                refresh_per_second=8,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()

    def _stop(self) -> None:
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None

    def close(self) -> None:
        """Take the spinner away (the run ended, or was interrupted mid-step)."""
        self._stop()

    # the Reporter protocol -------------------------------------------------------------------
    def run_started(self, run: Run) -> None:
        self._echo(f"run {run.id} of {run.workflow_id} v{run.version}")

    def step_started(self, run: Run, state: State, attempt: int) -> None:
        tries = f" (attempt {attempt})" if attempt > 1 else ""
        label = f"{state.id} {state.kind}{tries}"
        if self.fancy:
            self._spin(label)
        else:
            self._echo(f"  {self._style('▸', 'cyan')} {label}")

    def log_written(self, entry: NewLog) -> None:
        """A `ctx.logger` line (or a `log` step), as it is written."""
        level = entry.level.ljust(7)
        extra = f"  {json.dumps(entry.extra, default=str)}" if entry.extra else ""
        where = f"{entry.step_key}: " if entry.step_key and "[" in entry.step_key else ""
        coloured = self._style(level, _LEVEL_COLOURS.get(entry.level, "blue"))
        self._echo(f"    {coloured} {where}{entry.message}{extra}")

    def step_ended(
        self, run: Run, state: State, attempt: int, outcome: Outcome, seconds: float
    ) -> None:
        self._stop()
        took = f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"
        name = state.id.ljust(self.width)
        tries = f" (attempt {attempt})" if attempt > 1 else ""
        if isinstance(outcome, Done):
            shown = json.dumps(outcome.output, default=str)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            self._echo(f"  {self._style('✓', 'green')} {name} {state.kind}{tries} {took}  {shown}")
        elif isinstance(outcome, Skipped):
            self._echo(f"  {self._style('-', 'yellow')} {name} skipped (when is false)")
        elif isinstance(outcome, Failed):
            retry = state.retry
            more = (
                " - will retry"
                if outcome.retryable and retry and attempt < retry.max_attempts
                else ""
            )
            self._echo(
                f"  {self._style('✗', 'red')} {name} {state.kind}{tries} {took}  "
                f"{outcome.error_type}: {outcome.message}{more}"
            )
        elif isinstance(outcome, Enter):  # a block opens a list (engine/blocks.py)
            progress = outcome.progress or {}
            opened = f"round {progress['round']}" if "round" in progress else "case"
            opened = f"case {progress['case']}" if "case" in progress else opened
            self._echo(f"  {self._style('↳', 'cyan')} {name} {state.kind} {opened}")
        elif isinstance(outcome, Suspended):
            pass

    def waiting(
        self, run: Run, state: State, until: float | None, wait: dict[str, Any] | None
    ) -> None:
        self._stop()
        name = state.id.ljust(self.width)
        mark = self._style("…", "cyan")
        wait = wait or {}
        if wait.get("kind") == "token":
            self._echo(f"  {mark} {name} waiting for token {wait['token']}")
        elif wait.get("kind") == "event":
            self._echo(
                f"  {mark} {name} waiting for event {wait['event']}"
                f" matching {json.dumps(wait.get('match') or {})}"
            )
        elif wait.get("kind") == "child":
            self._echo(f"  {mark} {name} running child {wait['workflow']} ({wait['run_id']})")
        elif until is None:
            self._echo(f"  {mark} {name} waiting ({state.label})")
        else:
            left = max(0.0, until - time.time())
            self._echo(f"  {mark} {name} waiting {left:.1f}s (until {iso(until)})")
