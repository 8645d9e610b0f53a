"""Steps for the block crash tests: `t.record` and `t.flaky` as in crashsteps, and `t.tick`,
a poll whose call N (counted in $CRASH_LOG) answers done from the third call on; $KILL_AT
`tickN:end` SIGKILLs the process after call N's effect, before its result is stored."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from crashsteps import _mark  # registers t.record and t.flaky too

from engine import StepContext, step


@step("t.tick")
def tick(ctx: StepContext) -> dict[str, object]:
    log = Path(os.environ["CRASH_LOG"])
    lines = log.read_text().splitlines() if log.exists() else []
    n = 1 + sum(1 for line in lines if json.loads(line)["name"] == "tick")
    _mark("tick", ctx, "effect")
    if os.environ.get("KILL_AT") == f"tick{n}:end":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"n": n, "done": n >= 3}
