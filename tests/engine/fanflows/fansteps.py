"""Steps for the fan-out tests: a child squares its number, records each call, and can be
told to fail, to take its time or to SIGKILL its process."""

from __future__ import annotations

import json
import os
import signal
import time

from engine import NonRetryableError, StepContext, step


@step("fan.square")
def square(n: int, ctx: StepContext) -> int:
    log = os.environ.get("FAN_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"n": n, "run": ctx.run_id}) + "\n")
    if n < 0:
        raise NonRetryableError(f"negative input {n}")
    if os.environ.get("FAN_KILL_AT") == str(n):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get("FAN_SECONDS", "0")))
    return n * n
