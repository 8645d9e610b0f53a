"""Property-based API test against the OpenAPI document: whatever schemathesis sends, the
server never answers 5xx — on SQLite and, when DURABLE_YAML_TEST_PG is set, on PostgreSQL."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from engine.registry import import_modules
from engine.server import create_app
from engine.service import Engine
from engine.settings import resolve_settings
from tests.conftest import PG_REASON, PG_URL, _reset_postgres

HITL = Path(__file__).parent.parent / "engine" / "hitl"
KEY = "fuzz-key"
import_modules(["hitlsteps"], str(HITL))
_folder = tempfile.mkdtemp(prefix="dy-fuzz-")
_engine = Engine(
    resolve_settings(db=f"sqlite:///{_folder}/state.db", workflows=str(HITL)), import_steps=False
)
_engine.save_all_definitions()
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_engine, KEY))


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call(headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:500]}"


if PG_URL:  # the app's metrics open the store now, at collection: a database left by any
    _reset_postgres(PG_URL)  # earlier run (another version's schema, say) must not fail it
_pg_engine = Engine(
    resolve_settings(db=PG_URL or "postgresql://unused@localhost/unused", workflows=str(HITL)),
    import_steps=False,
)
postgres = schemathesis.openapi.from_asgi("/openapi.json", create_app(_pg_engine, KEY))
_pg_ready: list[bool] = []


def _fresh_postgres() -> None:
    """Once per session, when the PostgreSQL operations start: an empty database (the tests
    before may have left or dropped tables) with the workflows saved."""
    if _pg_ready:
        return
    assert PG_URL
    _reset_postgres(PG_URL)
    _pg_engine.close()
    _pg_engine._store = None
    _pg_engine._saved.clear()
    _pg_engine.save_all_definitions()
    _pg_ready.append(True)


@postgres.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_on_postgresql(case: schemathesis.Case) -> None:
    if not PG_URL:
        pytest.skip(PG_REASON)
    _fresh_postgres()
    response = case.call(headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:500]}"
