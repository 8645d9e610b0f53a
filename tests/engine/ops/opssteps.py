"""Steps for the operations tests: one that tags its run with metadata, a quick one."""

from __future__ import annotations

import time

from engine import NonRetryableError, StepContext, step


@step("ops.mark")
def mark(n: int, ctx: StepContext) -> dict[str, int]:
    ctx.metadata["n"] = n
    ctx.metadata["stage"] = "marked"
    if n < 0:
        raise NonRetryableError("negative")
    return {"n": n}


@step("ops.quick")
def quick(n: int = 0) -> dict[str, int]:
    time.sleep(0.002)
    return {"n": n}


@step("ops.bad_metadata")
def bad_metadata(ctx: StepContext) -> None:
    ctx.metadata["when"] = object()
