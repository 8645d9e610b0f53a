"""Steps for the wake-up tests: each call is counted in a file, so a test can prove that a
function ran exactly as often as it should."""

from __future__ import annotations

import os

from engine import NonRetryableError, StepContext, step


def _count(name: str) -> None:
    path = os.environ.get("WAKE_COUNT")
    if path:
        with open(path, "a") as f:
            f.write(name + "\n")


@step("wake.nul")
def nul() -> str:
    _count("nul")
    return "a\x00b"


@step("wake.count")
def count(n: int, ctx: StepContext) -> int:
    _count(f"count:{ctx.run_id}:{n}")
    return n


@step("wake.maybe_fail")
def maybe_fail(fail: bool) -> str:
    _count("maybe_fail")
    if fail:
        raise NonRetryableError("asked to fail")
    return "ok"
