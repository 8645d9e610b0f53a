"""The dashboard's run page of a waiting wait_for_any: what it waits for, and a person's
answer to its token alternative (which wins it)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.server import create_app
from engine.service import Engine
from engine.settings import resolve_settings

FLOWS = Path(__file__).resolve().parents[1] / "engine" / "anyflows"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    e = Engine(resolve_settings(db=db_url, workflows=str(FLOWS)), import_steps=False)
    yield e
    e.close()


def test_a_wait_for_any_with_a_token_is_answered_from_its_page(engine: Engine) -> None:
    client = TestClient(create_app(engine, None, port=8080), base_url="http://127.0.0.1:8080")
    machine = engine.workflow("decision")
    new = engine.new_run(machine, {"doc": "d1"}, {"kind": "manual"})
    run = engine.runner().start(machine, {"doc": "d1"}, new=new)
    page = client.get(f"/runs/{run.id}").text
    assert "Waiting for a person" in page
    assert "Alternative <code>human</code> of a wait_for_any" in page
    assert "the first of approved (event review.approved)" in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf
    answered = client.post(
        f"/runs/{run.id}/respond",
        data={"csrf": csrf.group(1), "decision": "approve", "comment": "ok"},
        follow_redirects=False,
    )
    assert answered.status_code == 303
    done = engine.resume(run.id)
    assert done.output == {"winner": "human", "data": {"approved": True, "comment": "ok"}}
