"""Live output of the real CLI in a subprocess, on SQLite and PostgreSQL: `run` shows a step
as it starts and its log line while it still works; `runs logs --follow` prints the lines a
worker writes after it started, and exits 0 when the run ends."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.registry import import_modules
from engine.service import Engine
from engine.settings import resolve_settings
from engine.worker import Worker
from tests.conftest import ROOT

LIVE = ROOT / "tests" / "server" / "live"


class Lines:
    """A subprocess whose stdout (and stderr) lines are read as they come."""

    def __init__(self, *args: str, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine", *args],
            cwd=cwd,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.seen: list[str] = []
        self.errors: list[str] = []
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _read(self, name: str, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.put((name, line.rstrip("\n")))
        self.lines.put((name, None))

    def until(self, text: str, timeout: float = 30) -> list[str]:
        """Lines (stdout) up to the first one containing `text` (stdout or stderr)."""
        while True:
            try:
                name, line = self.lines.get(timeout=timeout)
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(
                    f"no {text!r} in {timeout}s: {self.seen} {self.errors}"
                ) from None
            if line is None:
                continue
            (self.seen if name == "out" else self.errors).append(line)
            if text in line:
                return self.seen

    def finish(self, timeout: float = 30) -> int:
        rc = self.proc.wait(timeout)
        while not self.lines.empty():
            name, line = self.lines.get()
            if line is not None:
                (self.seen if name == "out" else self.errors).append(line)
        return rc


def test_run_streams_steps_and_log_lines_as_they_happen(tmp_path: Path, sqlite_url: str) -> None:
    """What `run` prints does not depend on the database (the logs' store path is tested on
    both by --follow below and by the SSE tests)."""
    db_url = sqlite_url
    gate = tmp_path / "gate"
    proc = Lines(
        "run",
        "gated",
        "--payload",
        '{"label": "lamp"}',
        "-m",
        "livesteps",
        "--workflows",
        str(LIVE),
        "--db",
        db_url,
        env={"LIVE_GATE_FILE": str(gate)},
        cwd=LIVE,
    )
    before = proc.until("working on lamp")
    # the step still works (it waits for the gate): its start and log line are shown
    assert before[0].startswith("run ") and " of gated v1" in before[0]
    assert before[1] == "  ▸ work call"
    assert before[2] == '    info    working on lamp  {"label": "lamp"}'
    assert not any("✓" in line for line in before)
    gate.touch()
    assert proc.finish() == 0, proc.errors
    out = proc.seen
    assert out[3] == "    warning done with lamp"
    assert out[4].startswith("  ✓ work") and '{"label": "lamp"}' in out[4]
    assert out[5:8] == ["  ▸ after call", "    info    quick step ran", out[7]]
    assert out[7].startswith("  ✓ after")
    assert out[8].startswith("completed run ")
    text = "\n".join(out + proc.errors)
    assert "\x1b" not in text and "Traceback" not in text
    # the Python logger's copy of the lines does not print them a second time
    assert not any("done with lamp" in e for e in proc.errors)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["livesteps"], str(LIVE))
    e = Engine(resolve_settings(db=db_url, workflows=str(LIVE)), import_steps=False)
    e.save_all_definitions()
    yield e
    e.close()


def test_follow_prints_what_a_worker_writes_then_exits(
    tmp_path: Path, db_url: str, engine: Engine
) -> None:
    import livesteps  # type: ignore[import-not-found]

    livesteps.GATE.clear()
    (run_id,) = engine.send_event("gated.requested", {"label": "kite"}).run_ids
    env = {"DURABLE_YAML_DB": db_url}
    follow = Lines("runs", "logs", run_id, "--follow", env=env, cwd=tmp_path)
    follow.until("following run")  # it looks before the worker starts
    worker = Worker(engine, concurrency=1, poll_interval=0.05, grace=5, schedules=False)
    worker.start()
    try:
        first = follow.until("working on kite")
        assert len(first) == 1 and "work#1" in first[0]
        assert follow.proc.poll() is None  # the run goes on: so does --follow
        livesteps.GATE.set()  # the step writes its next line only now
        assert follow.finish() == 0, follow.errors
    finally:
        livesteps.GATE.set()
        worker.stop()
        worker.shutdown()
    messages = [line.split(maxsplit=3)[3] for line in follow.seen]
    assert messages == ['working on kite  {"label": "kite"}', "done with kite", "quick step ran"]
    assert engine.store.get_run(run_id).status.value == "completed"

    # a finished run: every line at once, exit 0; --json gives one object a line
    again = subprocess.run(
        [sys.executable, "-m", "engine", "runs", "logs", run_id, "-f", "--json"],
        cwd=tmp_path,
        env={**os.environ, **env},
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    rows = [json.loads(line) for line in again.stdout.splitlines()]
    assert [r["message"] for r in rows] == ["working on kite", "done with kite", "quick step ran"]
    if not db_url.startswith("sqlite"):
        return  # the rest is the same on every database
    missing = subprocess.run(
        [sys.executable, "-m", "engine", "runs", "logs", "nope", "--follow"],
        cwd=tmp_path,
        env={**os.environ, **env},
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert missing.returncode != 0 and "nope" in missing.stderr
    assert "Traceback" not in missing.stderr


def _on_a_terminal(tmp_path: Path, env: dict[str, str]) -> str:
    """`run gated` with stdout on a pseudo-terminal; all it wrote. The gate opens once the
    step's log line is on the screen, so the spinner draws a few frames first."""
    import pty
    import select

    gate = tmp_path / "gate"
    main, child = pty.openpty()
    full = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "engine", "run", "gated", "--payload", '{"label": "tty"}'),
            *("-m", "livesteps", "--workflows", str(LIVE), "--db", f"sqlite:///{tmp_path}/s.db"),
        ],
        cwd=LIVE,
        env={**full, "TERM": "xterm", "COLUMNS": "100", "LIVE_GATE_FILE": str(gate), **env},
        stdin=child,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    out = b""
    while True:
        ready, _, _ = select.select([main], [], [], 30)
        assert ready, out
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
        if b"working on tty" in out and not gate.exists():
            select.select([], [], [], 0.5)  # a few frames of the spinner
            gate.touch()
    assert proc.wait(30) == 0, out
    os.close(main)
    return out.decode()


def test_a_terminal_gets_a_spinner_and_no_color_gets_plain_lines(tmp_path: Path) -> None:
    fancy = _on_a_terminal(tmp_path / "a", {})
    assert "\x1b[" in fancy  # redrawn in place, coloured
    assert "work call" in fancy and "s\r" in fancy.replace("\x1b[0m", "")  # elapsed time
    assert "working on tty" in fancy and "completed" in fancy
    assert "▸" not in fancy  # the spinner stands for the plain start line
    plain = _on_a_terminal(tmp_path / "b", {"NO_COLOR": "1"})
    assert "\x1b" not in plain
    assert "  ▸ work call" in plain and "working on tty" in plain and "completed run" in plain
