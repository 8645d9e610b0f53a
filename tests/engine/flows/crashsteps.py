"""Steps for crash tests: each call appends a line to $CRASH_LOG; $KILL_AT makes the process
SIGKILL itself at `NAME:start` (before the step's effect) or `NAME:end` (after the effect,
before its result is stored) on the first attempt; $HOLD_AT makes attempt 1 of NAME block."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from engine import StepContext, step


def _mark(name: str, ctx: StepContext, event: str) -> None:
    line = {
        "name": name,
        "event": event,
        "attempt": ctx.attempt,
        "key": ctx.idempotency_key,
        "pid": os.getpid(),
    }
    with open(os.environ["CRASH_LOG"], "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


@step("t.record")
def record(name: str, ctx: StepContext) -> dict[str, object]:
    if os.environ.get("KILL_AT") == f"{name}:start" and ctx.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("HOLD_AT") == name and ctx.attempt == 1:
        _mark(name, ctx, "holding")
        time.sleep(120)
    _mark(name, ctx, "effect")
    if os.environ.get("KILL_AT") == f"{name}:end" and ctx.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"name": name, "attempt": ctx.attempt}


@step("t.flaky")
def flaky(ctx: StepContext) -> dict[str, int]:
    _mark("flaky", ctx, "effect")
    if ctx.attempt == 1:
        raise ConnectionError("first attempt always fails")
    return {"attempt": ctx.attempt}


@step("t.not_json")
def not_json() -> object:
    return {"when": Path("/tmp")}


@step("t.slow")
def slow(seconds: float) -> str:
    time.sleep(seconds)
    return "late"


@step("t.fail")
def fail(message: str) -> None:
    from engine import NonRetryableError

    raise NonRetryableError(message)


@step("t.needs_file")
def needs_file(path: str, ctx: StepContext) -> str:
    """Fails until `path` exists: a cause a user can fix before `resume`."""
    _mark("needs_file", ctx, "effect")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing")
    return Path(path).read_text()
