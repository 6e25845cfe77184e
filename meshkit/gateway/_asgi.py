"""ASGI types and request-scope helpers shared by every room of the gateway.

Structural ASGI aliases (so any ASGI server or middleware plugs in), the scope keys
edge middleware and upstream routing share (the verified principal, the per-request
notes the access log reads), and small header helpers. Standard library only: the
lowest layer of the gateway, imported by ``core``, ``upstream``, ``edge`` and ``serve``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Middleware = Callable[[ASGIApp], ASGIApp]

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


def is_streaming_type(content_type: bytes | None) -> bool:
    """Whether a response of this type is a stream (never buffered by the edge)."""
    if not content_type:
        return False
    ct = content_type.split(b";", 1)[0].strip().lower()
    return ct in (b"application/x-ndjson", b"text/event-stream", b"application/jsonl")
