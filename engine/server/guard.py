"""The ASGI layer in front of every route: Host and Origin checks, no NUL in the URL (no
column can hold it), the body limit and the security headers (see `security.py` for the rules). Pure ASGI, so streamed responses pass
through untouched."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.datastructures import Headers

from ..inputs import parse_count
from .security import Keys, same_origin

__all__ = ["MAX_BODY", "SECURITY_HEADERS", "Guard"]

MAX_BODY = 1024 * 1024  # bytes of a request body; DURABLE_YAML_MAX_BODY overrides it
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'; object-src 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Refusal = Callable[[Scope, int, str], Awaitable[tuple[int, bytes, bytes]]]


class _BodyTooLarge(Exception):
    pass


class Guard:
    """Refuses foreign hosts (without a key), cross-site state changes and bodies over
    `max_body` bytes (413); adds the security headers to every response. `refusal` renders
    a refusal as (status, content type, body): the dashboard's error page or JSON."""

    def __init__(self, app: ASGIApp, keys: Keys, max_body: int, refusal: Refusal) -> None:
        self.app = app
        self.keys = keys
        self.max_body = max_body
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.keys.host_ok(host):
            port = self.keys.port or "PORT"
            await self._refuse(
                scope,
                send,
                421,
                f"this server answers only http://127.0.0.1:{port}/ "
                "(set DURABLE_YAML_API_KEY to serve other names)",
            )
            return
        if "\x00" in scope["path"] or b"\x00" in unquote_to_bytes(scope.get("query_string", b"")):
            await self._refuse(
                scope, send, 422, "the URL contains the NUL character (%00), which is not text"
            )
            return
        if scope["method"] not in _SAFE_METHODS:
            # A browser sends cookies by itself, not an Authorization header: a request with
            # one is a client's own (cross-origin, it needs a CORS preflight this server
            # never grants), so only requests without one must come from this site.
            source = headers.get("origin") or headers.get("referer")
            foreign = ("origin" in headers or source) and not same_origin(source, host)
            if foreign and "authorization" not in headers:
                await self._refuse(
                    scope, send, 403, "a request from another site cannot change anything here"
                )
                return
            length = headers.get("content-length")
            size = parse_count(length)
            if length is not None and (size is None or size > self.max_body):
                await self._refuse(scope, send, 413, self._too_large())
                return

        started = False
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge()
            return message

        async def secured_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        try:
            await self.app(scope, counted_receive, secured_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(scope, send, 413, self._too_large())

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_body:,} bytes"

    async def _refuse(self, scope: Scope, send: Send, status: int, message: str) -> None:
        status, content_type, body = await self.refusal(scope, status, message)
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, *SECURITY_HEADERS],
            }
        )
        await send({"type": "http.response.body", "body": body})
