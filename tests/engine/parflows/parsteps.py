"""Steps for the parallel tests: echo a value (recording the call; told to fail, take its
time or SIGKILL its process)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from engine import NonRetryableError, StepContext, step


@step("par.echo")
def echo(value: object, ctx: StepContext, fail: bool = False) -> object:
    log = os.environ.get("PAR_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"step": ctx.step_id, "run": ctx.run_id}) + "\n")
    if fail:
        raise NonRetryableError(f"could not read {value}")
    if os.environ.get("PAR_KILL_AT") == ctx.step_id:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get("PAR_SECONDS", "0")))
    return value


MEETING = threading.Barrier(2, timeout=20)


@step("par.meet")
def meet(ctx: StepContext) -> str:
    """Returns only once the other branch's step has come too: both run at once."""
    MEETING.wait()
    return threading.current_thread().name
