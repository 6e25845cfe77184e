"""Small ASGI helpers shared by the edge middleware (auth, limits, cache, shaping, ...).

The types are the same structural ASGI types :mod:`meshkit.gateway.core.app` uses, so
edge middleware plugs into ``create_app(middleware=..., route_middleware=...)``.
Error bodies are written with the gateway's own :class:`GatewayError` and
:func:`~meshkit.gateway.core.errors.send_status`, so a client sees one error shape whatever refused it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

from meshkit.gateway.core.errors import GatewayError, send_status

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Where edge middleware leaves the authenticated caller for later middleware.
PRINCIPAL_KEY = "meshkit.principal"
#: Where edge middleware counts what it did, for the access log and metrics.
EDGE_NOTES_KEY = "meshkit.edge"


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of request header ``name`` (lower-case bytes), or None."""
    for k, v in scope.get("headers") or ():
        if k == name:
            return bytes(v)
    return None


def set_headers(
    scope: Scope, add: Iterable[tuple[bytes, bytes]] = (), remove: Iterable[bytes] = ()
) -> None:
    """Replace ``scope["headers"]`` with a copy minus ``remove`` (and any name in
    ``add``) plus ``add``. Copying keeps the caller's list untouched."""
    add = list(add)
    drop = set(remove) | {k for k, _ in add}
    kept = [(k, v) for k, v in scope.get("headers") or () if k not in drop]
    scope["headers"] = kept + add


def client_ip(scope: Scope) -> str:
    """The peer address ASGI reports (the gateway is the edge: X-Forwarded-For is
    client-controlled and not trusted for limits)."""
    client = scope.get("client")
    return str(client[0]) if client else ""


def notes(scope: Scope) -> dict[str, Any]:
    """The per-request notes dict (created on first use)."""
    n = scope.get(EDGE_NOTES_KEY)
    if n is None:
        n = {}
        scope[EDGE_NOTES_KEY] = n
    return n  # type: ignore[no-any-return]


async def send_error(send: Send, err: GatewayError) -> None:
    """Answer with ``err`` as a ``google.rpc.Status`` JSON body."""
    await send_status(send, err.http_status, err.to_status(), None, err.headers)


async def send_json(
    send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A complete JSON (or other, if ``headers`` says so) response."""
    hdrs = list(headers)
    if not any(k == b"content-type" for k, _ in hdrs):
        hdrs.append((b"content-type", b"application/json"))
    hdrs.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def replay(body: bytes) -> Receive:
    """A ``receive`` that yields ``body`` once, then waits like a quiet client (it never
    reports a disconnect: the unary handler's disconnect watch must not cancel the call)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # until the caller is cancelled
        return {"type": "http.disconnect"}  # pragma: no cover - never reached

    return receive


class BufferedResponse:
    """A ``send`` that collects a whole response, for middleware that rewrites bodies.

    A streaming response (NDJSON, SSE) is never held: given ``stream_to``, its start
    (headers passed through ``stream_headers``) and every chunk go straight there, and
    :attr:`passed` says so; the middleware then has nothing left to do.
    """

    def __init__(
        self,
        stream_to: Send | None = None,
        stream_headers: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]
        | None = None,
    ) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.started = False
        self.complete = False
        self.passed = False
        self._stream_to = stream_to
        self._stream_headers = stream_headers

    async def __call__(self, message: Message) -> None:
        if self.passed:
            await self._stream_to(message)  # type: ignore[misc]
            return
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
            self.started = True
            if self._stream_to is not None and is_streaming_type(self.header(b"content-type")):
                self.passed = True
                headers = self.headers
                if self._stream_headers is not None:
                    headers = self._stream_headers(headers)
                await self._stream_to({**message, "headers": headers})
        elif message["type"] == "http.response.body":
            self.chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                self.complete = True

    @property
    def body(self) -> bytes:
        """The collected body."""
        return b"".join(self.chunks)

    def header(self, name: bytes) -> bytes | None:
        """The first response header ``name``."""
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    async def replay(
        self,
        send: Send,
        body: bytes | None = None,
        headers: Sequence[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Send the collected response (optionally with a new body/headers)."""
        b = self.body if body is None else body
        hdrs = [
            (k, v)
            for k, v in (self.headers if headers is None else headers)
            if k.lower() != b"content-length"
        ]
        hdrs.append((b"content-length", str(len(b)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": hdrs})
        await send({"type": "http.response.body", "body": b})


def is_streaming_type(content_type: bytes | None) -> bool:
    """Whether a response of this type is a stream (never buffered by the edge)."""
    if not content_type:
        return False
    ct = content_type.split(b";", 1)[0].strip().lower()
    return ct in (b"application/x-ndjson", b"text/event-stream", b"application/jsonl")
