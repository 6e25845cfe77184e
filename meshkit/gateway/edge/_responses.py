"""Responses written by edge middleware: Status errors, JSON bodies, and a buffering
``send`` for middleware that rewrites bodies (shaping, cache).

Error bodies use the gateway's own :class:`GatewayError` and
:func:`~meshkit.gateway.core.errors.send_status`, so a client sees one error shape
whatever refused it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meshkit.gateway._asgi import Message, Send, is_streaming_type
from meshkit.gateway.core.errors import GatewayError, send_status


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
