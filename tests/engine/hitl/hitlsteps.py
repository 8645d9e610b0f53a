"""Steps for the human-in-the-loop and composition tests."""

from __future__ import annotations

import json
import os
import signal
import time

from engine import NonRetryableError, StepContext, step


@step("hitl.double")
def double(x: int) -> int:
    if x < 0:
        raise NonRetryableError(f"negative input {x}")
    return 2 * x


@step("hitl.square")
def square(n: int, ctx: StepContext) -> int:
    log = os.environ.get("HITL_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"n": n, "key": ctx.idempotency_key, "attempt": ctx.attempt}) + "\n")
    if os.environ.get("HITL_KILL_AT") == str(n):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get("HITL_ITEM_SECONDS", "0")))
    return n * n
