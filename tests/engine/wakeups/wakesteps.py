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


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


@step("wake.odd_failure")
def odd_failure(kind: str) -> None:
    if kind == "unprintable":
        raise _Unprintable()
    if kind == "surrogate":
        raise ValueError("bad \udc80 text")
    if kind == "nul":
        raise ValueError("bad \x00 text")
    raise ValueError("x" * 5_000_000)


@step("wake.big")
def big(n: int) -> str:
    return "y" * 600_000
