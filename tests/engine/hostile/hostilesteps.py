"""Steps that return or raise what a step must not: each must fail the run cleanly."""

from __future__ import annotations

import sys

from engine import step


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
