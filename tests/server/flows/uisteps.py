"""Steps for the browser tests."""

from __future__ import annotations

import os
import time

from engine import step


@step("ui.always_fails")
def always_fails() -> None:
    raise ConnectionError("upstream refused the connection")


@step("ui.slow")
def slow(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@step("ui.echo")
def echo(value: object) -> object:
    return value


@step("ui.needs_file")
def needs_file(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing (create it, then resume)")
    return "found"
