"""Steps for the clock-skew and chaos tests: each call is logged (run, step, attempt, pid,
start, end) so the tests count executions."""

from __future__ import annotations

import json
import os
import time

from engine import StepContext, step


def _log(line: dict[str, object]) -> None:
    with open(os.environ["CLUSTER_LOG"], "a") as f:
        f.write(json.dumps(line) + "\n")


def _work(ctx: StepContext, value: object) -> object:
    start = time.time()
    time.sleep(float(os.environ.get("CLUSTER_STEP_SECONDS", "0.2")))
    _log(
        {
            "run": ctx.run_id,
            "step": ctx.step_id,
            "attempt": ctx.attempt,
            "pid": os.getpid(),
            "start": start,
            "end": time.time(),
        }
    )
    return value


@step("cluster.double")
def double(n: int, ctx: StepContext) -> int:
    return int(_work(ctx, n * 2))  # type: ignore[call-overload]


@step("cluster.plus_one")
def plus_one(x: int, ctx: StepContext) -> int:
    return int(_work(ctx, x + 1))  # type: ignore[call-overload]


@step("cluster.tick")
def tick(timestamp: str, ctx: StepContext) -> str:
    return str(_work(ctx, timestamp))
