"""uvicorn's httptools protocol, writing each response's head and first body chunk at once.

uvicorn writes the status line and headers, then the body, as two ``transport.write``
calls; uvloop tries each write at once, so a small unary response costs two ``write``
syscalls, which profiling showed to be the largest single cost of a proxied request.
Here the head is held back and goes out with the first body chunk. So that a head is
never delayed (a streaming response may send its first chunk much later), a held head
is also flushed at the end of the current event-loop iteration.

Everything else (parsing, keep-alive, pipelining, flow control, WebSocket upgrades,
graceful shutdown) is uvicorn's own.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http import httptools_impl as _impl
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

_HEADER_RE = _impl.HEADER_RE
_HEADER_VALUE_RE = _impl.HEADER_VALUE_RE
_STATUS_LINE = _impl.STATUS_LINE
_FORWARDED = frozenset((b"x-forwarded-for", b"x-forwarded-proto"))


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
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
                out = b""
            elif self.chunked_encoding:
                parts = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
                if not more_body:
                    parts.append(b"0\r\n\r\n")
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
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()
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

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._forwarded = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        elif name in _FORWARDED:
            self._forwarded = True
        self.headers.append((name, value))

    def data_received(self, data: bytes) -> None:
        # uvicorn's, minus cancelling the keep-alive timer: the connection is marked busy.
        self._idle_since = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
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
        self.cycle = cycle
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(cycle, app)
        else:
            # Pipelined requests wait their turn.
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))
