"""The dashboard cannot be driven from another site, in both modes (with an API key, and
without one on loopback): cross-origin form posts, foreign Host headers and framing are
refused; each session has its own CSRF token; every dashboard error is the error page."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.registry import import_modules
from engine.server import create_app
from engine.service import Engine
from engine.settings import resolve_settings

FLOWS = Path(__file__).parent.parent / "engine" / "hostile"
KEY = "security-key"
PORT = 8080
BASE = f"http://127.0.0.1:{PORT}"
EVIL = "https://evil.example"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["hostilesteps"], str(FLOWS))
    e = Engine(resolve_settings(db=db_url, workflows=str(FLOWS)), import_steps=False)
    e.save_all_definitions()
    yield e
    e.close()


@pytest.fixture(params=["key", "no-key"])
def browser(request: pytest.FixtureRequest, engine: Engine) -> TestClient:
    """A signed-in browser on the dashboard, in each mode."""
    key = KEY if request.param == "key" else None
    client = TestClient(
        create_app(engine, key, port=PORT), base_url=BASE, raise_server_exceptions=False
    )
    if key:
        signed_in = client.post("/login", data={"key": KEY}, headers={"origin": BASE})
        assert signed_in.status_code == 200  # followed the redirect to /
    return client


def _waiting_run(engine: Engine) -> str:
    run = engine.run(engine.workflow("approve"), {})
    assert run.status.value == "waiting"
    return run.id


def _csrf(client: TestClient, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text[:300]
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, "the page has a form with a CSRF token"
    return found.group(1)


FRAMING = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


def test_every_response_forbids_framing(browser: TestClient) -> None:
    for path in ("/", "/schedules", "/login", "/api/runs", "/healthz", "/runs/nope", "/nope"):
        response = browser.get(path, headers={"Authorization": f"Bearer {KEY}"})
        for header, value in FRAMING.items():
            assert response.headers.get(header) == value, (path, header)
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_a_cross_origin_form_post_changes_nothing(browser: TestClient, engine: Engine) -> None:
    run_id = _waiting_run(engine)
    token = _csrf(browser, f"/runs/{run_id}")
    for headers in ({"origin": EVIL}, {"referer": f"{EVIL}/page"}, {"origin": "null"}):
        forged = browser.post(f"/runs/{run_id}/cancel", data={"csrf": token}, headers=headers)
        assert forged.status_code == 403, headers
        assert "another site" in forged.text and "<html" in forged.text
    assert engine.store.get_run(run_id).status.value == "waiting"
    same = browser.post(
        f"/runs/{run_id}/cancel", data={"csrf": token}, headers={"origin": BASE},
        follow_redirects=False,
    )  # fmt: skip
    assert same.status_code == 303
    assert engine.store.get_run(run_id).status.value == "cancelled"


def test_a_post_without_this_sessions_token_is_refused(browser: TestClient, engine: Engine) -> None:
    run_id = _waiting_run(engine)
    token = _csrf(browser, f"/runs/{run_id}")
    assert token != "open"
    other = TestClient(browser.app, base_url=BASE, raise_server_exceptions=False)
    if browser.app.state.keys.required:  # type: ignore[attr-defined]
        other.post("/login", data={"key": KEY})
    assert _csrf(other, f"/runs/{run_id}") != token  # a token per session
    stolen = other.post(f"/runs/{run_id}/cancel", data={"csrf": token})
    assert stolen.status_code == 400 and "CSRF" in stolen.text
    no_cookie = TestClient(browser.app, base_url=BASE, raise_server_exceptions=False)
    blind = no_cookie.post(f"/runs/{run_id}/cancel", data={"csrf": token}, follow_redirects=False)
    assert blind.status_code in (303, 400)  # to the login page, or refused
    assert engine.store.get_run(run_id).status.value == "waiting"


def test_foreign_host_headers(engine: Engine) -> None:
    open_app = create_app(engine, None, port=PORT)
    for host in ("evil.example", f"evil.example:{PORT}", "127.0.0.1:9999", "127.0.0.2:8080"):
        client = TestClient(open_app, base_url=f"http://{host}", raise_server_exceptions=False)
        for path in ("/", "/api/runs"):
            response = client.get(path)
            assert response.status_code == 421, (host, path)
            assert response.headers["x-frame-options"] == "DENY"
    for host in (f"127.0.0.1:{PORT}", f"localhost:{PORT}", f"[::1]:{PORT}"):
        client = TestClient(open_app, base_url=f"http://{host}")
        assert client.get("/api/runs").status_code == 200, host
    keyed = TestClient(create_app(engine, KEY, port=PORT), base_url="http://dash.example")
    assert keyed.get("/api/runs", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    forged = keyed.post("/api/events", json={"name": "x"}, headers={"origin": EVIL})
    assert forged.status_code == 403
    with_key = keyed.post(
        "/api/events",
        json={"name": "x"},
        headers={"origin": EVIL, "Authorization": f"Bearer {KEY}"},
    )
    assert with_key.status_code == 202  # a client's own request, not a browser's cookie


def test_session_cookie_expires_and_logout_ends_it(engine: Engine) -> None:
    client = TestClient(create_app(engine, KEY, port=PORT), base_url=BASE)
    signed_in = client.post("/login", data={"key": KEY}, follow_redirects=False)
    cookie = signed_in.headers["set-cookie"]
    assert "Max-Age=43200" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert KEY not in cookie
    token = _csrf(client, "/")
    out = client.post("/logout", data={"csrf": token}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"


def test_dashboard_errors_are_the_error_page(browser: TestClient, engine: Engine) -> None:
    run_id = _waiting_run(engine)
    for path, status in (
        ("/?cursor=garbage", 422),
        (f"/runs/{run_id}?logs_after={10**23}", 422),
        ("/runs/nope", 404),
    ):
        page = browser.get(path)
        assert page.status_code == status, path
        assert page.headers["content-type"].startswith("text/html") and "<html" in page.text
    token = _csrf(browser, f"/runs/{run_id}")
    deep = browser.post(
        f"/runs/{run_id}/respond",
        data={"csrf": token, "data": "[" * 100_000 + "]" * 100_000},
        headers={"origin": BASE},
    )
    assert deep.status_code == 400 and "nested more than 64" in deep.text
    assert engine.store.get_run(run_id).status.value == "waiting"
