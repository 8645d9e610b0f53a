"""API keys: a bearer token on every /api call; a signed cookie for the dashboard.

The key itself is never rendered, logged or put in a cookie: the cookie and the forms' CSRF
tokens are HMACs derived from it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

__all__ = ["Keys", "is_loopback"]

COOKIE = "durable_yaml_session"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Keys:
    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key or None

    @property
    def required(self) -> bool:
        return self.api_key is not None

    def _derive(self, purpose: str) -> str:
        assert self.api_key is not None
        return hmac.new(self.api_key.encode(), purpose.encode(), hashlib.sha256).hexdigest()

    def bearer_ok(self, header: str | None) -> bool:
        if not self.required:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(
            header[len("Bearer ") :].strip().encode(), (self.api_key or "").encode()
        )

    def key_ok(self, candidate: str) -> bool:
        return self.required and hmac.compare_digest(
            candidate.encode(), (self.api_key or "").encode()
        )

    def session_value(self) -> str:
        return self._derive("session") if self.required else ""

    def session_ok(self, cookie: str | None) -> bool:
        if not self.required:
            return True
        return bool(cookie) and hmac.compare_digest(
            (cookie or "").encode(), self.session_value().encode()
        )

    def csrf_token(self) -> str:
        return self._derive("csrf") if self.required else "open"

    def csrf_ok(self, token: str | None) -> bool:
        return hmac.compare_digest((token or "").encode(), self.csrf_token().encode())
