"""Steps that return or raise what a step must not: each must fail the run cleanly."""

from __future__ import annotations

import sys

from engine import StepContext, step


@step("hostile.deep")
def deep() -> object:
    value: list[object] = []
    for _ in range(100_000):
        value = [value]
    return value


@step("hostile.surrogate")
def surrogate() -> str:
    return "\ud800"


@step("hostile.nan")
def nan() -> float:
    return float("nan")


@step("hostile.nul")
def nul() -> str:
    return "a\x00b"


@step("hostile.exit")
def exits() -> None:
    sys.exit(5)


@step("hostile.logs")
def logs(ctx: StepContext) -> str:
    ctx.logger.info("lone \ud800 and nul \x00", extra={"nan": float("nan"), "big": 2**70})
    return "logged"
