"""Streaming RPCs over WebSocket (bidirectional streaming's natural home).

Protocol, per connection to a streaming route's path (``GET`` binding):

* each client text (or binary) frame is one request message as JSON; path and
  query variables of the upgrade URL are applied to every message;
* an empty frame half-closes the request stream (``done_writing``);
* each response message arrives as a text frame ``{"result": ...}``;
* when the call ends the server sends, when there is any, the call's trailing
  metadata as ``{"trailers": {key: [values]}}`` (the in-band record of HTTP
  streams), ``{"error": <Status>}`` instead if the call failed (with ``"trailers"``
  merged in, when there are some), then closes with 1000; a client that closes
  the socket cancels the call.

Metadata and deadline come from the upgrade request's headers, as for HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import grpc

from meshkit.gateway.core._paths import route_path
from meshkit.gateway.core.errors import (
    GatewayError,
    metadata_json,
    status_from_rpc_error,
    status_json,
)
from meshkit.gateway.core.metadata import read_headers
from meshkit.gateway.core.routing import BadPathError, Match

if TYPE_CHECKING:
    from meshkit.gateway._asgi import Receive, Scope, Send
    from meshkit.gateway.core.types import StateView

log = logging.getLogger("meshkit.gateway")


async def _reject(send: Send) -> None:
    await send({"type": "websocket.close", "code": 1008})


async def serve_websocket(state: StateView, scope: Scope, receive: Receive, send: Send) -> None:
    """Route and serve one WebSocket connection."""
    path = route_path(scope)
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    try:
        found = state.router.match(path, "GET")
        if not isinstance(found, Match):
            await _reject(send)
            return
        values = [v for _, v in found.bindings()]
        b = found.target.binding
        hdrs = read_headers(
            scope["headers"],
            scope.get("client"),
            generate_request_id=state.options.generate_request_id,
        )
        channel = state._upstream_channel(b, scope)
    except (BadPathError, GatewayError):
        await _reject(send)
        return
    m = b.method
    if not (m.client_streaming or m.server_streaming):
        await _reject(send)
        return
    scope["meshkit.route"] = found.target
    await send({"type": "websocket.accept", "headers": state.request_id_header(hdrs)})
    timeout = state._timeout(b, hdrs)
    query = scope.get("query_string", b"")
    tr = state.transcoder
    codec = state.codec
    call: Any = None
    closed = asyncio.Event()

    async def next_request() -> Any:
        """The next request message; None on half-close; raises on disconnect."""
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                closed.set()
                raise ConnectionResetError("websocket closed")
            if msg["type"] != "websocket.receive":
                continue
            data = msg.get("bytes") or (msg.get("text") or "").encode()
            if not data.strip():
                return None
            return tr.build_streamed(b, data, query, values)

    async def send_json(obj: Any) -> None:
        await send({"type": "websocket.send", "text": codec.dumps(obj).decode()})

    async def feed() -> None:
        try:
            while True:
                req = await next_request()
                if req is None:
                    await call.done_writing()
                    return
                await call.write(req)
        except ConnectionResetError:
            call.cancel()
        except GatewayError as err:
            await send_json({"error": status_json(err.to_status(), state.catalog.pool)})
            call.cancel()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return

    feeder: asyncio.Task[None] | None = None
    try:
        if m.client_streaming:
            kind = "stream_stream" if m.server_streaming else "stream_unary"
            call = state._callable(channel, b, kind)(metadata=hdrs.metadata, timeout=timeout)
            feeder = asyncio.create_task(feed())
        else:
            req = await next_request()
            if req is None:
                req = tr.build_streamed(b, b"", query, values)
            call = state._callable(channel, b, "unary_stream")(
                req, metadata=hdrs.metadata, timeout=timeout
            )

            async def watch() -> None:
                with contextlib.suppress(ConnectionResetError):
                    while True:
                        await next_request()
                call.cancel()

            feeder = asyncio.create_task(watch())
        if m.server_streaming:
            async for resp in call:
                await send_json({"result": tr.response_obj(b, resp)})
        else:
            resp = await call
            await send_json({"result": tr.response_obj(b, resp)})
        trailers = metadata_json(await call.trailing_metadata())
        if trailers:
            await send_json({"trailers": trailers})
        await send({"type": "websocket.close", "code": 1000})
    except grpc.aio.AioRpcError as err:
        if not closed.is_set():
            record: dict[str, Any] = {
                "error": status_json(
                    status_from_rpc_error(err, hdrs.request_id), state.catalog.pool
                )
            }
            trailers = metadata_json(err.trailing_metadata())
            if trailers:
                record["trailers"] = trailers
            await send_json(record)
            await send({"type": "websocket.close", "code": 1000})
    except GatewayError as err:
        if not closed.is_set():
            await send_json({"error": status_json(err.to_status(), state.catalog.pool)})
            await send({"type": "websocket.close", "code": 1000})
    except ConnectionResetError:
        pass
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if call is None or (task is not None and task.cancelling()):
            raise
        # We cancelled the call (the client left, or sent a bad message and was told).
        if not closed.is_set():
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1000})
    except Exception:
        log.exception("websocket error in %s", m.full_name)
        if not closed.is_set():
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011})
    finally:
        if feeder is not None and not feeder.done():
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
        if call is not None and not call.done():
            call.cancel()
