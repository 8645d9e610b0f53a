"""Helpers for engine tests: compile a workflow from text, open a store, a fake clock."""

from __future__ import annotations

from pathlib import Path

from dsl import Machine, load_workflow
from engine.store import SqlStore, open_store


def compile_text(tmp_path: Path, text: str, name: str = "wf.yaml") -> Machine:
    path = tmp_path / name
    path.write_text(text)
    return load_workflow(path)


def store_for(url: str) -> SqlStore:
    return open_store(url)


class FakeClock:
    """time.time/time.sleep stand-ins: sleeping advances the clock, nothing waits."""

    def __init__(self, start: float = 2_147_155_200.0) -> None:  # 2038-01-15T08:00:00Z
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
