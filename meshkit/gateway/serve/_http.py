"""The CLI's HTTP/1.1 server protocol: httptools' public parser under asyncio.

``meshkit gateway`` and ``meshkit edge`` serve with this protocol (and
:mod:`meshkit.gateway.serve._ws` for WebSocket upgrades, :mod:`meshkit.gateway.serve._serve` for
the listening sockets, lifespan and graceful drain). It stands on public APIs only
(``httptools.HttpRequestParser``, ``httptools.parse_url``, asyncio), and offers what an
ASGI server in front of the gateway otherwise would not guarantee:

* bounds on a request's header section, enforced while it arrives: its size
  (:attr:`HttpOptions.max_header_bytes`) and its number of fields
  (:attr:`HttpOptions.max_headers`), 431 beyond either; a header section not complete
  within :attr:`HttpOptions.header_timeout` gets 408, an idle keep-alive connection is
  closed after :attr:`HttpOptions.keep_alive_timeout`;
* ``google.rpc.Status`` JSON for every request it refuses itself (400 malformed, a bad,
  missing or repeated ``Host``, ``Content-Length`` with ``Transfer-Encoding``; 431; 501
  for a transfer coding other than chunked; 505 for an HTTP version other than 1.0/1.1),
  answered ``Connection: close`` with the connection lingering briefly so the reply is
  not lost to a reset; no request behind a refused one reaches the app;
* the ``meshkit.disconnect`` scope extension (:mod:`meshkit.gateway.core._disconnect`) and the
  ASGI ``http.response.trailers`` extension (sent to clients that said ``TE: trailers``);
* one write per small response: the head is held and goes out with the first body
  chunk, or at the end of the event-loop iteration, so a streaming head is never delayed;
* keep-alive, pipelining (in order), read and write flow control, ``Expect:
  100-continue``, ``X-Forwarded-For``/``X-Forwarded-Proto`` from trusted proxies only.

Why this module is long: it is one connection state machine (parser callbacks, the
request cycle, timers, flow control, refusals) whose states every part reads and
writes; split across files, each part would reach into the others' private state.
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
import json
import logging
import re
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import httptools

from meshkit.gateway.core._disconnect import DISCONNECT_EXTENSION
from meshkit.gateway.core.metadata import accepts_trailers

if TYPE_CHECKING:
    from meshkit.gateway.serve._ws import WebSocketConnection

log = logging.getLogger("meshkit.gateway.http")

# The app may return anything (an app that returns a value is logged as an error).
ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[object],
]

#: Seconds a refused connection is still read (and the input dropped) before it closes.
LINGER_SECONDS = 2.0
#: A request body buffered beyond this many bytes pauses reading until the app reads it.
HIGH_WATER = 65536
ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """The CLI server's limits and timeouts (``meshkit gateway``/``meshkit edge`` flags)."""

    #: Request line plus header section, in bytes; over it the request gets 431.
    max_header_bytes: int = 64 * 1024
    #: Header fields per request (Envoy's default); over it the request gets 431.
    max_headers: int = 100
    #: Seconds from a request's first byte until its header section is complete (408).
    header_timeout: float = 30.0
    #: Seconds an idle keep-alive connection stays open.
    keep_alive_timeout: float = 5.0
    #: Peers whose X-Forwarded-For/-Proto are believed: addresses, networks or ``*``.
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1",)
    #: Seconds a graceful stop waits for requests in flight.
    graceful_timeout: float = 10.0
    #: Largest WebSocket message accepted, in bytes.
    ws_max_size: int = 16 * 1024 * 1024
    #: The ASGI ``root_path``.
    root_path: str = ""

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_headers", "ws_max_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("header_timeout", "keep_alive_timeout", "graceful_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


class _Trust:
    """``forwarded_allow_ips`` compiled: literal addresses, networks, or everyone."""

    __slots__ = ("everyone", "hosts", "networks")

    def __init__(self, entries: tuple[str, ...]) -> None:
        self.everyone = "*" in entries
        self.hosts: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            if entry == "*":
                continue
            if "/" in entry:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            else:
                self.hosts.add(entry)

    def __contains__(self, host: object) -> bool:
        if self.everyone or host in self.hosts:
            return True
        if not self.networks or not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)


@dataclass(eq=False)
class ServerState:
    """What the connections of one server share."""

    options: HttpOptions
    #: Every open connection (HTTP and WebSocket), for the graceful drain.
    connections: set[Any] = field(default_factory=set)
    #: The tasks running the app, so none is collected while it waits.
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: The ``date`` header line, refreshed once a second by the server.
    date: bytes = b""
    #: The lifespan state (ASGI ``scope["state"]``), copied into each scope when not empty.
    lifespan_state: dict[str, Any] = field(default_factory=dict)
    draining: bool = False
    trust: _Trust = field(init=False)

    def __post_init__(self) -> None:
        self.trust = _Trust(self.options.forwarded_allow_ips)
        self.refresh_date()

    def refresh_date(self) -> None:
        """Recompute the ``date`` header line (the server calls this once a second)."""
        from email.utils import formatdate

        self.date = b"date: " + formatdate(usegmt=True).encode("ascii") + b"\r\n"


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("ascii"))


_STATUS_LINE = {status: _status_line(status) for status in range(100, 600)}
# Bytes a header name (a token) or value may not hold.
_HEADER_RE = re.compile(b'[\x00-\x1f\x7f()<>@,;:[\\]={} \t\\\\"]')
_HEADER_VALUE_RE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 section 3.2 / RFC 3986: uri-host [":" port]; an IP literal in brackets.
_HOST_RE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
# Request headers noted while parsing (the others are only collected).
_NOTED = frozenset(
    (
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
    )
)
# Fields that frame or route a message cannot come as trailers (RFC 9110 section 6.5.1).
_NOT_TRAILERS = frozenset(
    (b"content-length", b"transfer-encoding", b"connection", b"host", b"te", b"trailer")
)
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_body(code: int, message: str) -> bytes:
    """A ``google.rpc.Status`` JSON body."""
    doc = {"code": code, "message": message, "details": []}
    return json.dumps(doc, separators=(",", ":")).encode()


def status_response(status: int, code: int, message: str, date: bytes, *, close: bool) -> bytes:
    """A whole response carrying a ``google.rpc.Status`` JSON body."""
    body = status_body(code, message)
    return b"".join(
        (
            _STATUS_LINE.get(status) or _status_line(status),
            date,
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n" if close else b"\r\n",
            body,
        )
    )


class _Refuse(Exception):
    """Raised from a parser callback to stop parsing: answer with this status."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Linger(asyncio.Protocol):
    """Takes over a connection the server has refused: its reply and a FIN are on the
    way, and what the client still sends is read and dropped until it closes (or for
    :data:`LINGER_SECONDS`). Closing a socket with unread input would send a RST instead,
    which can destroy the reply before the client reads it."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = loop.call_later(LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        return None

    def eof_received(self) -> bool:
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


class _Cycle:
    """One request and its response: the ASGI ``receive`` and ``send``."""

    __slots__ = (
        "_awaiting_trailers",
        "_head",
        "_trailers",
        "body",
        "chunked",
        "delivered_last",
        "disconnected",
        "expect_100",
        "expected_length",
        "keep_alive",
        "more_body",
        "no_body",
        "proto",
        "response_complete",
        "response_started",
        "scope",
        "waiter",
    )

    def __init__(
        self, proto: HttpProtocol, scope: dict[str, Any], keep_alive: bool, expect_100: bool
    ) -> None:
        self.proto = proto
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_100 = expect_100
        self.body = b""
        self.more_body = True
        self.delivered_last = False
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.chunked: bool | None = None
        self.expected_length = 0
        self.no_body = False
        self.waiter: asyncio.Future[None] | None = None
        self._head: bytes | None = None
        self._trailers = False  # the app announced trailers (http.response.start)
        self._awaiting_trailers = False  # the last chunk is out; the trailer section not

    def wake(self) -> None:
        """Wake a ``receive()`` waiting for body bytes, the body's end or a disconnect."""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ running the app

    async def run_asgi(self, app: ASGIApp) -> None:
        proto = self.proto
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            log.error("Exception in ASGI application", exc_info=exc)
            if not self.response_started:
                self._send_500()
            else:
                self._flush_head()
                proto.transport.close()
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        else:
            if result is not None:
                log.error("ASGI callable should return None, but returned %r.", result)
                self._flush_head()
                proto.transport.close()
            elif not self.response_started and not self.disconnected:
                log.error("ASGI callable returned without starting response.")
                self._send_500()
            elif not self.response_complete and not self.disconnected:
                log.error("ASGI callable returned without completing response.")
                self._flush_head()
                proto.transport.close()
        finally:
            self._flush_head()

    def _send_500(self) -> None:
        transport = self.proto.transport
        if self.disconnected or transport.is_closing():
            return
        self.response_started = True
        transport.write(
            status_response(
                500, 13, "internal error", self.proto.state.date, close=not self.keep_alive
            )
        )
        self._finish()

    def _finish(self) -> None:
        self.response_complete = True
        self.wake()
        if not self.keep_alive:
            self.proto.transport.close()
        self.proto.on_response_complete()

    def _flush_head(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            transport = self.proto.transport
            if not transport.is_closing():
                transport.write(head)

    # ------------------------------------------------------------------ ASGI receive

    async def receive(self) -> dict[str, Any]:
        """The ASGI ``receive``: body chunks, then ``http.disconnect`` once the client
        has gone (or the response is complete)."""
        proto = self.proto
        if self.expect_100:
            self.expect_100 = False
            if not proto.transport.is_closing():
                proto.transport.write(_CONTINUE)
        while True:
            if self.disconnected or self.response_complete:
                return {"type": "http.disconnect"}
            body = self.body
            if body or not (self.more_body or self.delivered_last):
                self.body = b""
                more = self.more_body
                if not more:
                    self.delivered_last = True
                elif proto.read_paused:
                    proto.resume_reading()
                return {"type": "http.request", "body": body, "more_body": more}
            if self.more_body:
                proto.resume_reading()
            waiter = self.waiter = proto.loop.create_future()
            await waiter

    # ------------------------------------------------------------------ ASGI send

    async def send(self, message: MutableMapping[str, Any]) -> None:
        """The ASGI ``send``: the response head, body chunks, trailers."""
        proto = self.proto
        if proto.write_paused and not self.disconnected:
            await proto.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{kind}'."
                )
            self._start(message)
        elif self._awaiting_trailers:
            if kind != "http.response.trailers":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.trailers', but got '{kind}'."
                )
            self._send_trailers(message)
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
            self._send_body(message)
        elif kind == "http.response.trailers" and self._trailers:
            # Announced, but a response with a Content-Length (or to HEAD) has nowhere to
            # put them: dropped, as the extension allows.
            self._trailers = message.get("more_trailers", False)
        else:
            raise RuntimeError(
                f"Unexpected ASGI message '{kind}' sent, after response already completed."
            )

    def _start(self, message: MutableMapping[str, Any]) -> None:
        proto = self.proto
        self.response_started = True
        self.expect_100 = False
        self._trailers = message.get("trailers", False)
        status = message["status"]
        content = [_STATUS_LINE.get(status) or _status_line(status), proto.state.date]
        has_close = False
        for name, value in message.get("headers", ()):
            if _HEADER_RE.search(name):
                raise RuntimeError("Invalid HTTP header name.")
            if _HEADER_VALUE_RE.search(value):
                raise RuntimeError("Invalid HTTP header value.")
            name = name.lower()
            if name == b"content-length" and self.chunked is None:
                self.expected_length = int(value.decode())
                self.chunked = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_length = 0
                self.chunked = True
            elif name == b"connection":
                if b"close" in [token.lower().strip() for token in value.split(b",")]:
                    self.keep_alive = False
                    has_close = True
            elif name == b"date":
                content[1] = b""  # the app's own
            content.extend((name, b": ", value, b"\r\n"))
        if not self.keep_alive and not has_close:
            content.append(b"connection: close\r\n")
        if self.scope["method"] == "HEAD" or status in (204, 304) or status < 200:
            # No body: whatever framing the app declared describes a body not sent.
            self.no_body = True
            self.chunked = False
            self.expected_length = 0
        elif self.chunked is None:
            self.chunked = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self._head = b"".join(content)
        # Held for the first body chunk, and written at the end of this loop iteration
        # if none comes by then (a streaming response's head is never delayed).
        proto.loop.call_soon(self._flush_head)

    def _send_body(self, message: MutableMapping[str, Any]) -> None:
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        head = self._head
        self._head = None
        trailers_follow = False
        out: bytes
        if self.chunked:
            parts = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
            if not more_body:
                # With trailers announced, the trailer section ends the message.
                trailers_follow = self._trailers
                parts.append(b"0\r\n" if trailers_follow else b"0\r\n\r\n")
            out = b"".join(parts)
        elif self.no_body:
            out = b""  # HEAD, 204, 304: whatever the app sends is not part of the message
        else:
            if len(body) > self.expected_length:
                self.proto.transport.close()
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_length -= len(body)
            out = body
        if head is not None:
            out = head + out
        if out:
            self.proto.transport.write(out)
        if not more_body:
            if self.expected_length != 0:
                self.proto.transport.close()
                raise RuntimeError("Response content shorter than Content-Length")
            if trailers_follow:
                self._awaiting_trailers = True
            else:
                self._finish()

    def _send_trailers(self, message: MutableMapping[str, Any]) -> None:
        parts: list[bytes] = []
        if accepts_trailers(self.scope["headers"]):
            for name, value in message.get("headers", ()):
                if _HEADER_RE.search(name):
                    raise RuntimeError("Invalid HTTP trailer name.")
                if _HEADER_VALUE_RE.search(value):
                    raise RuntimeError("Invalid HTTP trailer value.")
                name = name.lower()
                if name not in _NOT_TRAILERS:
                    parts.extend((name, b": ", value, b"\r\n"))
        more = message.get("more_trailers", False)
        if not more:
            parts.append(b"\r\n")
        transport = self.proto.transport
        if parts and not transport.is_closing():
            transport.write(b"".join(parts))
        if not more:
            self._awaiting_trailers = False
            self._finish()


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: parses requests and runs the app for each, in order."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.options = state.options
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.read_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._cycle: _Cycle | None = None  # the request being parsed or the last one
        self._pipeline: deque[_Cycle] = deque()
        self._base: dict[str, Any] = {}
        # One timer per connection for both timeouts: armed once per idle stretch or
        # head, and re-armed when it fires early (no timer created per request).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._idle_since: float | None = None
        self._head_since: float | None = None
        # The head being parsed.
        self._in_head = False
        self._head_bytes = 0  # its bytes in reads before the current one
        self._read_len = 0  # the current read's size
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._hosts = 0
        self._host = b""
        self._length: bytes | None = None
        self._codings: bytes | None = None
        self._expect = False
        self._forwarded = False
        self._upgrade: dict[str, Any] | None = None  # a WebSocket handshake's scope
        self._dead = False  # the parser stopped (an upgrade not taken): input is dropped
        # The meshkit.disconnect callback of the request being served. The extension is
        # this protocol's method, bound once: a per-request bound method of the cycle,
        # held by the scope the cycle holds, would make every request a reference cycle
        # for the garbage collector (measured: p99 latency doubled under load).
        self._on_lost: Callable[[], object] | None = None

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.state.connections.add(self)
        server = _address(transport.get_extra_info("sockname"))
        client = _address(transport.get_extra_info("peername"))
        tls = transport.get_extra_info("sslcontext") is not None
        self._base = {
            "type": "http",
            "asgi": ASGI_VERSION,
            "http_version": "1.1",
            "server": server,
            "client": client,
            "scheme": "https" if tls else "http",
            "root_path": self.options.root_path,
            "extensions": {
                "http.response.trailers": {},
                DISCONNECT_EXTENSION: self._on_disconnect,
            },
        }
        if self.state.lifespan_state:
            self._base["state"] = self.state.lifespan_state
        self._idle_since = self.loop.time()
        self._arm(self._idle_since + self.options.keep_alive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        cycle = self._cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.wake()
        for queued in self._pipeline:
            queued.disconnected = True
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._fire_disconnect()

    def eof_received(self) -> bool:
        return False  # the transport closes; the app sees http.disconnect

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its low-water mark."""
        if self._drain_waiter is None:
            self._drain_waiter = self.loop.create_future()
        await self._drain_waiter

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def shutdown(self) -> None:
        """The server is stopping: close now if idle, after the current response if not."""
        cycle = self._cycle
        if self._in_head or cycle is None or cycle.response_complete:
            self.transport.close()
        else:
            cycle.keep_alive = False
            for queued in self._pipeline:
                queued.keep_alive = False

    def _on_disconnect(self, callback: Callable[[], object] | None) -> None:
        """The ``meshkit.disconnect`` extension: ``callback`` is called once if the
        connection is lost before the response is complete; ``None`` withdraws it. Only
        the request being served can register (pipelined ones wait their turn)."""
        if callback is not None and self.transport.is_closing():
            callback()  # already gone: connection_lost has come, or is on its way
            return
        self._on_lost = callback

    def _fire_disconnect(self) -> None:
        callback = self._on_lost
        if callback is not None:
            self._on_lost = None
            callback()

    # ------------------------------------------------------------------ timeouts

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return  # fires first, and re-arms for the rest
            timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._head_since is not None:
            due = self._head_since + self.options.header_timeout
            if now >= due:
                self._head_timeout()
                return
        elif self._idle_since is not None:
            due = self._idle_since + self.options.keep_alive_timeout
            if now >= due:
                self.transport.close()
                return
        else:
            return  # a request is being served: the end of its response arms the timer
        self._timer_at = due
        self._timer = self.loop.call_at(due, self._on_timer)

    def _head_timeout(self) -> None:
        cycle = self._cycle
        if cycle is not None and not cycle.response_complete:
            # A request is in flight and the one behind it stalls: no reply could be
            # framed for the stalled one before that response; end the connection.
            self.transport.close()
            return
        log.warning("Request header section not complete in %ss.", self.options.header_timeout)
        message = f"request header section not complete in {self.options.header_timeout}s"
        self._reject(408, 4, message)  # DEADLINE_EXCEEDED

    # ------------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return
        cycle = self._cycle
        # Head bytes are counted from a read that starts inside a request's head or between
        # requests; one that starts inside a body holds an unknown share of the next head.
        counted = self._in_head or cycle is None or not cycle.more_body
        self._read_len = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_to(data, exc.args[0] if exc.args else len(data))
            return
        except httptools.HttpParserError as exc:
            refuse = exc.__context__ if isinstance(exc.__context__, _Refuse) else None
            if refuse is None and str(exc) == "Invalid HTTP version":
                refuse = _Refuse(505, 12, "HTTP version not supported")
            if refuse is None:
                log.warning("Invalid HTTP request received: %s", exc)
                refuse = _Refuse(400, 3, f"invalid HTTP request: {exc}")
            else:
                log.warning("Request refused: %s", refuse.message)
            self._reject(refuse.status, refuse.code, refuse.message)
            return
        if self._in_head and counted:
            self._head_bytes += len(data)
            limit = self.options.max_header_bytes
            if self._head_bytes > limit:
                self._in_head = False
                log.warning("Request header section over %d bytes.", limit)
                self._reject(431, 8, f"request header section exceeds {limit} bytes")

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._headers = []
        self._hosts = 0
        self._length = self._codings = None
        self._expect = self._forwarded = False
        self._idle_since = None
        self._head_since = now = self.loop.time()
        self._arm(now + self.options.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self.options.max_headers:
            limit = self.options.max_headers
            raise _Refuse(431, 8, f"request header section has more than {limit} fields")
        if name in _NOTED:
            self._note(name, value)

    def _note(self, name: bytes, value: bytes) -> None:
        if name == b"host":
            self._hosts += 1
            self._host = value
        elif name == b"content-length":
            if self._length is not None and self._length != value:
                raise _Refuse(400, 3, "invalid HTTP request: differing Content-Length fields")
            self._length = value
        elif name == b"transfer-encoding":
            self._codings = value if self._codings is None else self._codings + b"," + value
        elif name == b"expect":
            self._expect = value.lower() == b"100-continue"
        else:
            self._forwarded = True
        if self._length is not None and self._codings is not None:
            # RFC 9112 section 6.1: either may be a smuggling attempt; the connection ends.
            raise _Refuse(400, 3, "invalid HTTP request: Content-Length with Transfer-Encoding")

    def _head_size(self) -> int:
        # The request line and header lines as sent, give or take optional whitespace.
        size = len(self._url) + 14
        for name, value in self._headers:
            size += len(name) + len(value) + 4
        return size

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_since = None
        options = self.options
        # A head within one small read is under the limit; only a big one is measured. (A
        # pipelined head that began in the read holding the previous body may get through
        # at up to one read over the limit: its share of that read is unknown.)
        limit = options.max_header_bytes
        if self._head_bytes + self._read_len > limit and self._head_size() > limit:
            raise _Refuse(431, 8, f"request header section exceeds {limit} bytes")
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Refuse(505, 12, f"HTTP version {version} not supported")
        if self._codings is not None:
            for coding in self._codings.split(b","):
                if coding.strip().lower() != b"chunked":
                    raise _Refuse(501, 12, "request transfer coding not implemented")
        if self._hosts != 1:
            if self._hosts > 1:
                raise _Refuse(400, 3, "invalid HTTP request: more than one Host field")
            if version == "1.1":
                raise _Refuse(400, 3, "invalid HTTP request: no Host field")
        elif _HOST_RE.fullmatch(self._host) is None:
            raise _Refuse(400, 3, "invalid HTTP request: invalid Host field")
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        try:
            parsed = httptools.parse_url(self._url)
            raw_path = parsed.path or b"/"
            path = raw_path.decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            raise _Refuse(400, 3, "invalid HTTP request: invalid request target") from None
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope = self._base.copy()
        if version != "1.1":
            scope["http_version"] = version
        scope["method"] = method
        root = options.root_path
        scope["path"] = root + path if root else path
        scope["raw_path"] = root.encode("ascii") + raw_path if root else raw_path
        scope["query_string"] = parsed.query or b""
        scope["headers"] = self._headers
        if "state" in scope:
            scope["state"] = scope["state"].copy()  # ASGI: a shallow copy per request
        if self._forwarded:
            self._apply_forwarded(scope)
        if parser.should_upgrade() and self._wants_websocket():
            scope["type"] = "websocket"
            scope["scheme"] = "wss" if scope["scheme"] in ("https", "wss") else "ws"
            del scope["method"]
            scope["extensions"] = {}
            self._upgrade = scope
            return
        keep_alive = version == "1.1" and parser.should_keep_alive() and not self.state.draining
        cycle = _Cycle(self, scope, keep_alive, self._expect)
        previous = self._cycle
        self._cycle = cycle
        if previous is None or previous.response_complete:
            self._run(cycle)
        else:
            # Pipelined requests wait their turn, and reading waits with them.
            self.pause_reading()
            self._pipeline.append(cycle)

    def on_body(self, body: bytes) -> None:
        cycle = self._cycle
        if cycle is None or cycle.response_complete or self._upgrade is not None:
            return  # answered without reading it: dropped
        cycle.body += body
        if len(cycle.body) > HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self._cycle
        if cycle is None or self._upgrade is not None:
            return
        cycle.more_body = False
        cycle.wake()

    def _wants_websocket(self) -> bool:
        for name, value in self._headers:
            if name == b"upgrade" and b"websocket" in value.lower():
                return True
        return False

    def _apply_forwarded(self, scope: dict[str, Any]) -> None:
        """X-Forwarded-For/-Proto, believed from a trusted peer only (the client becomes
        the nearest untrusted address in X-Forwarded-For)."""
        client = scope["client"]
        trust = self.state.trust
        if client is None or client[0] not in trust:
            return
        for name, value in scope["headers"]:
            if name == b"x-forwarded-proto":
                proto = value.decode("latin-1").strip().lower()
                if proto in ("http", "https", "ws", "wss"):
                    scope["scheme"] = proto
            elif name == b"x-forwarded-for":
                hosts = [h.strip() for h in value.decode("latin-1").split(",") if h.strip()]
                if not hosts:
                    continue
                chosen = hosts[0]
                if not trust.everyone:
                    for host in reversed(hosts):
                        if host not in trust:
                            chosen = host
                            break
                scope["client"] = (chosen, 0)

    # ------------------------------------------------------------------ requests

    def _run(self, cycle: _Cycle) -> None:
        task = self.loop.create_task(cycle.run_asgi(self.app))
        tasks = self.state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_response_complete(self) -> None:
        """The current response is out: the next pipelined request, or idle."""
        self._on_lost = None  # answered: an app that did not withdraw its callback loses it
        if self.transport.is_closing():
            return
        self.resume_reading()
        pipeline = self._pipeline
        if pipeline:
            self._run(pipeline.popleft())
            return
        if self.state.draining and not self._in_head:
            self.transport.close()
            return
        if not self._in_head:
            self._idle_since = now = self.loop.time()
            self._arm(now + self.options.keep_alive_timeout)

    def _reject(self, status: int, code: int, message: str) -> None:
        """Answer ``status`` with a Status JSON body and end the connection. When a
        response has begun (a reply now would land inside it), or requests are queued
        behind the one running, it just closes."""
        cycle = self._cycle
        transport = self.transport
        self._dead = True
        running = cycle is not None and not cycle.response_complete
        if (
            (running and cycle is not None and cycle.response_started)
            or self._pipeline
            or transport.is_closing()
            or not transport.can_write_eof()
        ):
            transport.close()
            return
        if running and cycle is not None:
            # The app has not answered this request yet: this reply is its answer, and
            # the app sees the client gone (its upstream call is cancelled).
            cycle.disconnected = True
            cycle.wake()
            self._fire_disconnect()
        transport.write(status_response(status, code, message, self.state.date, close=True))
        transport.write_eof()
        self.state.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport.set_protocol(_Linger(transport, self.loop))
        self.resume_reading()

    # ------------------------------------------------------------------ WebSocket

    def _upgrade_to(self, data: bytes, offset: int) -> None:
        scope = self._upgrade
        self._dead = True
        if scope is None:
            # An upgrade to something else (h2c...): the request is served as plain
            # HTTP/1.1, and the connection ends with its response.
            cycle = self._cycle
            if cycle is not None:
                cycle.keep_alive = False
            return
        previous = self._cycle
        if previous is not None and not previous.response_complete:
            self.transport.close()  # a handshake pipelined behind a request: not taken
            return
        from meshkit.gateway.serve._ws import WebSocketConnection

        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines = [self.parser.get_method(), b" ", self._url, b" HTTP/1.1\r\n"]
        for name, value in self._headers:
            lines.extend((name, b": ", value, b"\r\n"))
        lines.append(b"\r\n")
        self.state.connections.discard(self)
        ws: WebSocketConnection = WebSocketConnection(self.app, self.state, self.transport, scope)
        self.transport.set_protocol(ws)
        self.resume_reading()
        ws.data_received(b"".join(lines) + data[offset:])


def _address(addr: Any) -> tuple[str, int] | None:
    if isinstance(addr, tuple | list) and len(addr) >= 2:
        return (str(addr[0]), int(addr[1]))
    return None


__all__ = ["HttpOptions", "HttpProtocol", "ServerState", "status_body", "status_response"]
