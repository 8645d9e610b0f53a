"""Property-based API test against the OpenAPI document: whatever schemathesis sends, the
server never answers 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from engine.registry import import_modules
from engine.server import create_app
from engine.service import Engine
from engine.settings import resolve_settings

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
