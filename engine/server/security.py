"""Who may use the server, and from where.

- `/api`: `Authorization: Bearer KEY` (the scheme in any case) when the server has a key.
- The dashboard: a signed session cookie that expires (`SESSION_SECONDS`). With a key it is
  set by signing in; without one (loopback only) every browser gets one on its first page.
  Forms carry a CSRF token derived from the session, so each session has its own.
- Every state-changing request that relies on the browser's cookie (no `Authorization`
  header) must come from the dashboard itself: an `Origin` (or `Referer`) header naming
  another site is refused, in both modes.
- Without a key the server answers only requests whose `Host` is a loopback name
  (`127.0.0.1`, `localhost`, `[::1]`) with the port it listens on: a rebinding DNS name
  pointing at 127.0.0.1 gets nothing.

The key itself is never rendered, logged or put in a cookie: cookies and tokens are HMACs
under a secret derived from it (or random per process without a key).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from urllib.parse import urlsplit

__all__ = ["COOKIE", "SESSION_SECONDS", "Keys", "is_loopback", "same_origin"]

COOKIE = "durable_yaml_session"
SESSION_SECONDS = 12 * 3600
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def same_origin(source: str | None, host: str | None) -> bool:
    """True if the `Origin`/`Referer` value `source` names the site at `host` (host:port)."""
    if not source or not host:
        return False
    parts = urlsplit(source)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


class Keys:
    def __init__(self, api_key: str | None, port: int | None = None) -> None:
        self.api_key = api_key or None
        self.port = port
        self._secret = (
            hmac.new(self.api_key.encode(), b"durable-yaml dashboard", hashlib.sha256).digest()
            if self.api_key
            else secrets.token_bytes(32)
        )

    @property
    def required(self) -> bool:
        return self.api_key is not None

    def _sign(self, message: str) -> str:
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def host_ok(self, host: str | None) -> bool:
        """Without a key, only loopback names on our port; with one, any host."""
        if self.required:
            return True
        if not host:
            return False
        host = host.lower()
        if host.startswith("["):  # [::1]:8080
            name, _, rest = host.partition("]")
            name, port = name + "]", rest.removeprefix(":")
        else:
            name, _, port = host.partition(":")
        if name not in LOOPBACK_NAMES:
            return False
        return self.port is None or port == str(self.port) or (not port and self.port == 80)

    def bearer_ok(self, header: str | None) -> bool:
        if not self.required:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), (self.api_key or "").encode())

    def key_ok(self, candidate: str) -> bool:
        return self.required and hmac.compare_digest(
            candidate.encode(), (self.api_key or "").encode()
        )

    def new_session(self, now: float | None = None) -> str:
        """A fresh signed session value: `id.expiry.signature`."""
        expires = int((now or time.time()) + SESSION_SECONDS)
        sid = secrets.token_urlsafe(16)
        return f"{sid}.{expires}.{self._sign(f'session:{sid}:{expires}')}"

    def session_id(self, cookie: str | None, now: float | None = None) -> str | None:
        """The session's id if `cookie` is a session this server signed and it has not expired."""
        try:
            sid, expires, signature = (cookie or "").split(".")
            alive = int(expires) > (now or time.time())
        except ValueError:
            return None
        expected = self._sign(f"session:{sid}:{expires}")
        return sid if alive and hmac.compare_digest(signature, expected) else None

    def session_ok(self, cookie: str | None) -> bool:
        return self.session_id(cookie) is not None

    def csrf_token(self, cookie: str | None) -> str:
        sid = self.session_id(cookie)
        return self._sign(f"csrf:{sid}") if sid else ""

    def csrf_ok(self, cookie: str | None, token: str | None) -> bool:
        expected = self.csrf_token(cookie)
        return bool(expected) and hmac.compare_digest((token or "").encode(), expected.encode())
