"""Steps for the live-output tests: a step that logs, then waits for the test to let it go."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from engine import StepContext, step

GATE = threading.Event()  # in-process tests set it once they saw the log line
USER_LOG: logging.Logger | None = None  # a test's own logger, used inside live.quick


@step("live.gated")
def gated(label: str, ctx: StepContext) -> dict[str, str]:
    ctx.logger.info("working on %s", label, extra={"label": label})
    # In another process, the gate is a file the test creates.
    gate_file = os.environ.get("LIVE_GATE_FILE")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if GATE.is_set() or (gate_file and Path(gate_file).exists()):
            break
        time.sleep(0.05)
    ctx.logger.warning("done with %s", label)
    return {"label": label}


@step("live.quick")
def quick(ctx: StepContext) -> str:
    ctx.logger.info("quick step ran")
    if USER_LOG is not None:
        USER_LOG.info("user code logs too")
    return "ok"


@step("live.fail")
def fail() -> None:
    from engine import NonRetryableError

    raise NonRetryableError("the lamp is broken")


@step("live.aquick")
async def aquick(ctx: StepContext) -> str:
    if USER_LOG is not None:
        USER_LOG.info("async user code logs too")
    return "ok"
