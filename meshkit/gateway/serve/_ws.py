"""WebSocket connections of the CLI server, over ``websockets``' sans-I/O protocol.

:class:`~meshkit.gateway.serve._http.HttpProtocol` parses the handshake request (with its
header limits) and hands the connection here: the request's bytes go to a
``websockets.server.ServerProtocol``, which validates the handshake, frames and unframes
messages, answers pings and runs the closing handshake. This class is the ASGI side:
``websocket.connect``/``receive``/``disconnect`` in, ``websocket.accept``/``send``/
``close`` out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from meshkit.gateway.serve._http import status_response

if TYPE_CHECKING:
    from meshkit.gateway.serve._http import ASGIApp, ServerState

log = logging.getLogger("meshkit.gateway.ws")

#: Seconds the server waits for the client's reply to its close frame.
CLOSE_TIMEOUT = 10.0


class ClientDisconnected(ConnectionResetError):
    """``send()`` on a WebSocket whose client has gone (ASGI: an ``OSError``)."""


class WebSocketConnection(asyncio.Protocol):
    """One WebSocket connection, from the handshake request on."""

    def __init__(
        self,
        app: ASGIApp,
        state: ServerState,
        transport: asyncio.Transport,
        scope: dict[str, Any],
    ) -> None:
        self.app = app
        self.state = state
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.conn = ServerProtocol(max_size=state.options.ws_max_size, logger=log)
        subprotocols: list[str] = []
        for name, value in scope["headers"]:
            if name == b"sec-websocket-protocol":
                subprotocols += [t.strip() for t in value.decode("latin-1").split(",")]
        scope["subprotocols"] = subprotocols
        self.scope = scope
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.response: Response | None = None  # the 101 to send on websocket.accept
        self.handshake_done = False  # accepted or refused
        self.close_sent = False
        self.disconnected = False
        self.disconnect_queued = False
        self.read_paused = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.close_timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.frames: list[bytes] = []
        self.text = False
        state.connections.add(self)

    # ------------------------------------------------------------------ transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        self._queue_disconnect(1005 if self.response is not None else 1006)
        self.disconnected = True
        self.handshake_done = True
        # A send() waiting for the buffer to drain would wait forever: it never will.
        self.writable.set()
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None

    def eof_received(self) -> bool:
        self.conn.receive_eof()
        self._flush()
        return False

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        if conn.handshake_exc is not None and not self.handshake_done:
            self.handshake_done = True
            self._refuse(400, 3, "invalid WebSocket handshake")
            return
        for event in conn.events_received():
            if isinstance(event, Request):
                self._connect(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush()  # pongs, the reply to a close frame, a close after a protocol error
        if conn.close_expected():
            self._queue_disconnect(conn.close_code or 1006)
            if self.close_timer is None and not self.transport.is_closing():
                self.close_timer = self.loop.call_later(CLOSE_TIMEOUT, self.transport.close)

    def shutdown(self) -> None:
        """The server is stopping: close with 1012 (service restart)."""
        if self.response is not None and not self.close_sent and not self.disconnected:
            self._queue_disconnect(1012)
            self.conn.send_close(1012)
            self.close_sent = True
            self._flush()
        self.transport.close()

    def _flush(self) -> None:
        for chunk in self.conn.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:
                # The sans-I/O protocol's end of the connection (after the closing handshake
                # or a failure): buffered frames go out, then the socket closes.
                self.transport.close()

    def _refuse(self, status: int, code: int, message: str) -> None:
        self.close_sent = True
        if not self.transport.is_closing():
            self.transport.write(
                status_response(status, code, message, self.state.date, close=True)
            )
        self.transport.close()

    def _queue_disconnect(self, code: int, reason: str = "") -> None:
        if not self.disconnect_queued:
            self.disconnect_queued = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})

    # ------------------------------------------------------------------ events

    def _connect(self, request: Request) -> None:
        response = self.conn.accept(request)
        if response.status_code != 101:
            self.handshake_done = True
            body = response.body or b""
            message = body.decode("utf-8", "replace").strip() or "invalid WebSocket handshake"
            code = 3 if response.status_code < 500 else 13
            self._refuse(response.status_code, code, message)
            return
        self.response = response
        self.queue.put_nowait({"type": "websocket.connect"})
        task = self.task = self.loop.create_task(self._run())
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self.text = opcode is Opcode.TEXT
            self.frames = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            self.frames.append(bytes(frame.data))
        elif opcode is Opcode.CLOSE:
            rcvd = self.conn.close_rcvd
            if rcvd is not None:
                self._queue_disconnect(rcvd.code, rcvd.reason)
            else:
                self._queue_disconnect(1005)
            return
        else:
            return  # PING (the protocol queued the pong) or PONG
        if not frame.fin:
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # past websocket.close: read on until the peer's close reply
        message: dict[str, Any]
        if self.text:
            try:
                message = {"type": "websocket.receive", "text": data.decode()}
            except UnicodeDecodeError:
                self.conn.fail(1007, "invalid UTF-8")
                self.close_sent = True
                return
        else:
            message = {"type": "websocket.receive", "bytes": data}
        self.queue.put_nowait(message)
        # One message waits for the app at a time: reading resumes when it takes it.
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    # ------------------------------------------------------------------ ASGI

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException as exc:
            log.error("Exception in ASGI application", exc_info=exc)
            if not self.handshake_done:
                self.handshake_done = True
                self._refuse(500, 13, "internal error")
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        else:
            if not self.handshake_done:
                log.error("ASGI callable returned without completing the handshake.")
                self.handshake_done = True
                self._refuse(500, 13, "internal error")
        if self.close_timer is None:
            self.transport.close()

    async def receive(self) -> dict[str, Any]:
        """The ASGI ``receive``."""
        message = await self.queue.get()
        if self.read_paused and self.queue.empty() and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: MutableMapping[str, Any]) -> None:
        """The ASGI ``send``."""
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        kind = message["type"]
        if not self.handshake_done:
            self.handshake_done = True
            response = self.response
            assert response is not None
            if kind == "websocket.accept":
                for name, value in message.get("headers", ()):
                    response.headers[name.decode("latin-1")] = value.decode("latin-1")
                subprotocol = message.get("subprotocol")
                if subprotocol:
                    response.headers["Sec-WebSocket-Protocol"] = subprotocol
                self.conn.send_response(response)
                self._flush()
            elif kind == "websocket.close":
                # Refused before accepting: 403, as ASGI says.
                self._queue_disconnect(1006)
                self.response = None
                self._refuse(403, 7, "WebSocket connection refused")
            else:
                raise RuntimeError(
                    "Expected ASGI message 'websocket.accept' or 'websocket.close', "
                    f"but got '{kind}'."
                )
        elif not self.close_sent:
            if kind == "websocket.send":
                data = message.get("bytes")
                if data is not None:
                    self.conn.send_binary(data)
                else:
                    self.conn.send_text(message.get("text", "").encode())
                self._flush()
            elif kind == "websocket.close":
                code = message.get("code", 1000)
                reason = message.get("reason") or ""
                self._queue_disconnect(code, reason)
                self.conn.send_close(code, reason)
                self.close_sent = True
                self._flush()
                if self.read_paused:
                    self.read_paused = False
                    self.transport.resume_reading()
                if self.close_timer is None and not self.transport.is_closing():
                    self.close_timer = self.loop.call_later(CLOSE_TIMEOUT, self.transport.close)
            else:
                raise RuntimeError(
                    f"Expected ASGI message 'websocket.send' or 'websocket.close', but got '{kind}'."
                )
        else:
            raise RuntimeError(
                f"Unexpected ASGI message '{kind}', after sending 'websocket.close'."
            )


__all__ = ["ClientDisconnected", "WebSocketConnection"]
