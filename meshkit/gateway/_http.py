"""uvicorn's httptools protocol, writing each response's head and first body chunk at once.

uvicorn writes the status line and headers, then the body, as two ``transport.write``
calls; uvloop tries each write at once, so a small unary response costs two ``write``
syscalls, which profiling showed to be the largest single cost of a proxied request.
Here the head is held back and goes out with the first body chunk. So that a head is
never delayed (a streaming response may send its first chunk much later), a held head
is also flushed at the end of the current event-loop iteration.

It also offers what uvicorn's HTTP/1.1 protocols do not:

* the ``meshkit.disconnect`` scope extension (:mod:`meshkit.gateway._disconnect`), so a
  unary call is cancelled when its client goes away without a task watching ``receive()``;
* the ASGI ``http.response.trailers`` extension: trailer fields after the last chunk of a
  chunked response, sent when the request said ``TE: trailers`` (as uvicorn's HTTP/2
  protocol does);
* ``google.rpc.Status`` JSON for the requests it rejects itself (malformed HTTP: 400; a
  header section over :data:`MAX_HEAD_BYTES`: 431), like every other gateway error.

Everything else (parsing, keep-alive, pipelining, flow control, WebSocket upgrades,
graceful shutdown) is uvicorn's own.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http import httptools_impl as _impl
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from meshkit.gateway._disconnect import DISCONNECT_EXTENSION
from meshkit.gateway.metadata import accepts_trailers

_HEADER_RE = _impl.HEADER_RE
_HEADER_VALUE_RE = _impl.HEADER_VALUE_RE
_STATUS_LINE = _impl.STATUS_LINE
_FORWARDED = frozenset((b"x-forwarded-for", b"x-forwarded-proto"))
#: A request whose request line and headers exceed this many bytes is refused with 431:
#: when they are complete, and while they are still arriving (httptools has no limit of
#: its own and holds a header in memory until it is complete).
MAX_HEAD_BYTES = 64 * 1024
#: Seconds a refused connection is still read (and the input dropped) before it closes.
LINGER_SECONDS = 2.0
# Fields that frame or route a message cannot come as trailers (RFC 9110 section 6.5.1).
_NOT_TRAILERS = frozenset(
    (b"content-length", b"transfer-encoding", b"connection", b"host", b"te", b"trailer")
)


_SPECIAL = frozenset((b"content-length", b"transfer-encoding", b"connection"))
# (server_state.default_headers list, its encoded lines): uvicorn replaces that list
# once a second (the Date header), so its validation and encoding happen once per list,
# not per response. Holding the list keeps the identity check sound.
_defaults: list[Any] = [None, None]


def _encoded_defaults(default_headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The server's default headers as head lines; None when one of them needs the
    per-response checks (invalid, or one that sets framing or keep-alive)."""
    if _defaults[0] is default_headers:
        return _defaults[1]  # type: ignore[no-any-return]
    out: bytes | None = None
    parts: list[bytes] = []
    for name, value in default_headers:
        low = name.lower()
        if _HEADER_RE.search(name) or _HEADER_VALUE_RE.search(value) or low in _SPECIAL:
            break
        parts.extend((low, b": ", value, b"\r\n"))
    else:
        out = b"".join(parts)
    _defaults[0], _defaults[1] = default_headers, out
    return out


class _Cycle(_impl.RequestResponseCycle):
    _head: bytes | None = None
    _loop: asyncio.AbstractEventLoop
    _trailers = False  # the app announced trailers (http.response.start "trailers")
    _awaiting_trailers = False  # the last chunk is out; the trailer section is not

    def _finish(self) -> None:
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    def _send_trailers(self, message: Any) -> None:
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
        if parts and not self.transport.is_closing():
            self.transport.write(b"".join(parts))
        if not more:
            self._awaiting_trailers = False
            self._finish()

    def _flush_head(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if not self.transport.is_closing():
                self.transport.write(head)

    async def run_asgi(self, app: Any) -> None:
        # uvicorn's, inlined (not a wrapper around it: one coroutine frame less).
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self._flush_head()
                self.transport.close()
        else:
            if result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
                self._flush_head()
                self.transport.close()
            elif not self.response_started and not self.disconnected:
                self.logger.error("ASGI callable returned without starting response.")
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                self.logger.error("ASGI callable returned without completing response.")
                self._flush_head()
                self.transport.close()
        finally:
            self._flush_head()
            self.on_response = lambda: None

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()  # pragma: no cover - needs a stalled client
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{message['type']}'."
                )
            self.response_started = True
            self.waiting_for_100_continue = False
            self._trailers = message.get("trailers", False)
            status_code = message["status"]
            defaults = _encoded_defaults(self.default_headers)
            if defaults is None:
                headers = self.default_headers + list(message.get("headers", []))
            else:
                headers = message.get("headers", ())
            if self.access_log:
                self.access_logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(self.scope),
                    self.scope["method"],
                    get_path_with_query_string(self.scope),
                    self.scope["http_version"],
                    status_code,
                )
            content = [_STATUS_LINE[status_code]]
            if defaults is not None:
                content.append(defaults)
            has_connection_close = False
            for name, value in headers:
                if _HEADER_RE.search(name):
                    raise RuntimeError("Invalid HTTP header name.")
                if _HEADER_VALUE_RE.search(value):
                    raise RuntimeError("Invalid HTTP header value.")
                name = name.lower()
                if name == b"content-length" and self.chunked_encoding is None:
                    self.expected_content_length = int(value.decode())
                    self.chunked_encoding = False
                elif name == b"transfer-encoding" and value.lower() == b"chunked":
                    self.expected_content_length = 0
                    self.chunked_encoding = True
                elif name == b"connection":
                    connection = [token.lower().strip() for token in value.split(b",")]
                    if b"close" in connection:
                        self.keep_alive = False
                        has_connection_close = True
                content.extend((name, b": ", value, b"\r\n"))
            if not self.keep_alive and not has_connection_close:
                content.append(b"connection: close\r\n")
            if (
                self.chunked_encoding is None
                and self.scope["method"] != "HEAD"
                and status_code not in (204, 304)
            ):
                self.chunked_encoding = True
                content.append(b"transfer-encoding: chunked\r\n")
            content.append(b"\r\n")
            self._head = b"".join(content)
            self._loop.call_soon(self._flush_head)
        elif self._awaiting_trailers:
            if message["type"] != "http.response.trailers":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.trailers', but got '{message['type']}'."
                )
            self._send_trailers(message)
        elif not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.body', but got '{message['type']}'."
                )
            body = message.get("body", b"")
            more_body = message.get("more_body", False)
            head = self._head
            self._head = None
            out: bytes
            trailers_follow = False
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
                out = b""
            elif self.chunked_encoding:
                parts = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
                if not more_body:
                    # With trailers announced, the trailer section ends the message.
                    trailers_follow = self._trailers
                    parts.append(b"0\r\n" if trailers_follow else b"0\r\n\r\n")
                out = b"".join(parts)
            else:
                num_bytes = len(body)
                if num_bytes > self.expected_content_length:
                    raise RuntimeError("Response content longer than Content-Length")
                self.expected_content_length -= num_bytes
                out = body
            if head is not None:
                out = head + out
            if out:
                self.transport.write(out)
            if not more_body:
                if self.expected_content_length != 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                if trailers_follow:
                    self._awaiting_trailers = True
                else:
                    self._finish()
        elif message["type"] == "http.response.trailers" and self._trailers:
            # Announced, but a response with a Content-Length (or to HEAD) has nowhere to
            # put them: dropped, as the extension allows.
            self._trailers = message.get("more_trailers", False)
        else:
            raise RuntimeError(
                f"Unexpected ASGI message '{message['type']}' sent, after response already completed."
            )


#: The uvicorn release series this protocol was written and tested against: it extends
#: uvicorn's internals, so other series get uvicorn's stock protocol (see protocol_for).
TESTED_UVICORN = "0.54."


def protocol_for(uvicorn_version: str) -> Any:
    """The ``http=`` protocol for ``uvicorn.Config``: this one on the tested uvicorn
    series, uvicorn's own httptools protocol on any other."""
    return GatewayHttpProtocol if uvicorn_version.startswith(TESTED_UVICORN) else "httptools"


class _HeadTooLarge(Exception):
    """Raised from the parser's headers-complete callback to stop parsing: answer 431."""


class _Linger(asyncio.Protocol):
    """Takes over a connection the gateway has refused: its reply and a FIN are on the
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


class GatewayHttpProtocol(_impl.HttpToolsProtocol):
    """``uvicorn.Config(http=GatewayHttpProtocol)``: httptools with coalesced writes.

    Two more per-request costs of uvicorn's protocol go: its proxy-headers middleware
    runs only for requests that carry ``X-Forwarded-For``/``X-Forwarded-Proto`` (for any
    other request it changes nothing), and the keep-alive timer is armed once per idle
    stretch and re-armed when it fires early, instead of created and cancelled per request.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app: Any = self.app
        self._proxied: Any = app
        self._direct: Any = app.app if type(app) is ProxyHeadersMiddleware else app
        self._forwarded = False
        self._idle_since: float | None = None
        # The meshkit.disconnect callback of the request being served. The extension is
        # this protocol's method, bound once: a per-request bound method of the cycle,
        # held by the scope the cycle holds, would make every request a reference cycle
        # for the garbage collector (measured: p99 latency doubled under load).
        self._on_lost: Callable[[], object] | None = None
        self._disconnect_hook = self._on_disconnect
        self._in_head = False  # a request line or header section is being parsed
        self._head_bytes = 0  # its bytes in reads before the current one
        self._read_len = 0  # the current read's size

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._forwarded = False
        self._in_head = True
        self._head_bytes = 0

    def _on_disconnect(self, callback: Callable[[], object] | None) -> None:
        """The ``meshkit.disconnect`` extension: ``callback`` is called once if the
        connection is lost before the response is complete; ``None`` withdraws it. Only
        the request being served can register (pipelined ones wait their turn)."""
        if callback is not None and self.transport.is_closing():
            callback()  # already gone: connection_lost has come, or is on its way
            return
        self._on_lost = callback

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._fire_disconnect()

    def _fire_disconnect(self) -> None:
        callback = self._on_lost
        if callback is not None:
            self._on_lost = None
            callback()

    def _reject(self, status: int, code: int, message: str) -> None:
        """Answer ``status`` with a Status JSON body and end the connection. When a
        response has begun (a reply now would land inside it), or requests are queued
        behind the one running, it just closes."""
        cycle = self.cycle
        transport = self.transport
        running = cycle is not None and not cycle.response_complete
        if (
            (running and cycle.response_started)
            or self.pipeline
            or transport.is_closing()
            or not transport.can_write_eof()
        ):
            transport.close()
            return
        if running:
            # The app has not answered this request yet: this reply is its answer, and
            # the app sees the client gone (its upstream call is cancelled).
            cycle.disconnected = True
            cycle.message_event.set()
            self._fire_disconnect()
        body = json.dumps(
            {"code": code, "message": message, "details": []}, separators=(",", ":")
        ).encode()
        content = [_STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend((name, b": ", value, b"\r\n"))
        content.extend(
            (
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            )
        )
        transport.write(b"".join(content))
        transport.write_eof()
        # Out of uvicorn's hands from here, as for a WebSocket upgrade.
        self.connections.discard(self)
        self._unset_keepalive_if_required()
        transport.set_protocol(_Linger(transport, self.loop))
        self.flow.resume_reading()

    def send_400_response(self, msg: str) -> None:
        self._reject(400, 3, msg)  # INVALID_ARGUMENT

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        elif name in _FORWARDED:
            self._forwarded = True
        self.headers.append((name, value))

    def data_received(self, data: bytes) -> None:
        # uvicorn's, minus cancelling the keep-alive timer (the connection is marked busy),
        # plus a bound on the header section.
        self._idle_since = None
        cycle = self.cycle
        # Head bytes are counted from a read that starts inside a request's head or between
        # requests; one that starts inside a body holds an unknown share of the next head.
        counted = self._in_head or cycle is None or not cycle.more_body
        self._read_len = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._head_too_large()
                return
            self.logger.warning("Invalid HTTP request received: %s", exc)
            self.send_400_response(f"invalid HTTP request: {exc}")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head and counted:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._in_head = False
                self._head_too_large()

    def _head_too_large(self) -> None:
        self.logger.warning("Request header section over %d bytes.", MAX_HEAD_BYTES)
        message = f"request header section exceeds {MAX_HEAD_BYTES} bytes"
        self._reject(431, 8, message)  # RESOURCE_EXHAUSTED

    def _head_size(self) -> int:
        # The request line and header lines as sent, give or take optional whitespace.
        size = len(self.url) + 14
        for name, value in self.headers:
            size += len(name) + len(value) + 4
        return size

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        self._on_lost = None  # answered: an app that did not withdraw its callback loses it
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        idle_since = self._idle_since
        if idle_since is None or self.transport.is_closing():
            return  # busy: the end of the current response arms the timer again
        remaining = idle_since + self.timeout_keep_alive - self.loop.time()
        if remaining > 0:
            self.timeout_keep_alive_task = self.loop.call_later(
                remaining, self.timeout_keep_alive_handler
            )
        else:
            self.transport.close()

    def on_headers_complete(self) -> None:
        # uvicorn's own method, building a _Cycle instead of its RequestResponseCycle.
        self._in_head = False
        # A head within one small read is under the limit; only a big one is measured. (A
        # pipelined head that began in the read holding the previous body may get through
        # at up to one read over the limit: its share of that read is unknown.)
        if self._head_bytes + self._read_len > MAX_HEAD_BYTES and (
            self._head_size() > MAX_HEAD_BYTES
        ):
            raise _HeadTooLarge
        parser = self.parser
        http_version = parser.get_http_version()
        scope: Any = self.scope
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["path"] = self.root_path + path
        scope["raw_path"] = (
            self.root_path.encode("ascii") + raw_path if self.root_path else raw_path
        )
        scope["query_string"] = parsed_url.query or b""
        if self.limit_concurrency is not None and (
            len(self.connections) >= self.limit_concurrency
            or len(self.tasks) >= self.limit_concurrency
        ):
            app: Any = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        else:
            app = self._proxied if self._forwarded else self._direct
        existing_cycle = self.cycle
        cycle = _Cycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        cycle._loop = self.loop
        scope["extensions"] = {
            "http.response.trailers": {},
            DISCONNECT_EXTENSION: self._disconnect_hook,
        }
        self.cycle = cycle
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(cycle, app)
        else:
            # Pipelined requests wait their turn.
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))
