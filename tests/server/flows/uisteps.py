"""Steps for the browser tests."""

from __future__ import annotations

import time

from engine import step


@step("ui.always_fails")
def always_fails() -> None:
    raise ConnectionError("upstream refused the connection")


@step("ui.slow")
def slow(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"
