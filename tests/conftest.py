"""Shared fixtures: a fresh database per test on every backend, and the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("DURABLE_YAML_TEST_PG")
PG_REASON = "DURABLE_YAML_TEST_PG is not set (e.g. postgresql://postgres@127.0.0.1:5432/test); .ci/run sets it"


def _reset_postgres(url: str) -> None:
    from engine.store.sql import normalise_url

    engine = sa.create_engine(normalise_url(url))
    with engine.begin() as c:
        c.execute(sa.text("SELECT pg_advisory_xact_lock(7218391)"))
        names = (
            c.execute(
                sa.text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 'dy\\_%'"
                )
            )
            .scalars()
            .all()
        )
        if names:
            c.execute(sa.text("DROP TABLE " + ", ".join(f'"{n}"' for n in names) + " CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/state.db"
        return
    if not PG_URL:
        pytest.skip(PG_REASON)
    _reset_postgres(PG_URL)
    yield PG_URL


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state.db"


def cli(
    *args: str,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `durable-yaml` command in a subprocess."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=cwd or ROOT,
        env=full_env,
        text=True,
        capture_output=True,
        timeout=timeout,
        input=input,
    )
