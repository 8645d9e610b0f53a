"""Named points where a test can pause this process, to make an interleaving of two
processes happen every time instead of once in ten thousand runs.

`pause_point(name)` costs a dict lookup when nothing is registered. In-process tests
register a callable with `pause_at`; tests that start real processes set
`DURABLE_YAML_PAUSE="name=seconds,..."` in the child's environment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["pause_at", "pause_point"]

_hooks: dict[str, Callable[[], None]] = {}


def _from_environment() -> None:
    for item in filter(None, os.environ.get("DURABLE_YAML_PAUSE", "").split(",")):
        name, _, seconds = item.partition("=")
        delay = float(seconds or 0)
        _hooks[name.strip()] = lambda delay=delay: time.sleep(delay)  # type: ignore[misc]


_from_environment()


def pause_point(name: str) -> None:
    hook = _hooks.get(name)
    if hook is not None:
        hook()


@contextmanager
def pause_at(name: str, hook: Callable[[], None]) -> Iterator[None]:
    """Call `hook` whenever any thread of this process reaches point `name`."""
    _hooks[name] = hook
    try:
        yield
    finally:
        _hooks.pop(name, None)
