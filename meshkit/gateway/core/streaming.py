"""Streaming RPCs over plain HTTP.

* Server streaming answers newline-delimited JSON, one ``{"result": ...}`` per
  line and ``{"error": <Status>}`` if the stream fails after it began; with
  ``Accept: text/event-stream`` Server-Sent Events (``event: error`` for the
  failure); with ``stream_format: json-array`` one JSON array.
* Client streaming (and bidi over HTTP/1.1, half-duplex) reads request
  messages from a newline-delimited JSON body as it arrives.
* Nothing is buffered whole: each message is written as it comes, and
  ``send`` waits while the HTTP client is slow, so gRPC flow control slows
  the upstream. A client that disconnects cancels the call.
* A server stream's trailing metadata goes out as HTTP trailers
  ``Grpc-Trailer-<key>`` when the client sent ``TE: trailers`` and the server
  offers the ASGI ``http.response.trailers`` extension; otherwise, when there is
  any, in the last record: ``{"trailers": {key: [values]}}`` (merged into the
  ``{"error": ...}`` record of a failed stream), an ``event: trailers`` in SSE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from meshkit.gateway.core.errors import (
    GatewayError,
    bad_request,
    metadata_headers,
    metadata_json,
    status_from_rpc_error,
    status_json,
)
from meshkit.gateway.core.metadata import RequestHeaders, accepts_trailers, read_headers
from meshkit.gateway.core.transcoding import Binding

if TYPE_CHECKING:
    from meshkit.gateway._asgi import Receive, Scope, Send
    from meshkit.gateway.core.types import StateView

log = logging.getLogger("meshkit.gateway")


class _ClientGone(Exception):
    pass


async def ndjson_messages(
    state: StateView,
    b: Binding,
    scope: Scope,
    receive: Receive,
    path_values: list[str],
    first: bytes = b"",
) -> AsyncIterator[Message]:
    """Request messages from a newline-delimited JSON body, as chunks arrive."""
    limit = state.options.max_body_bytes
    query = scope.get("query_string", b"")
    buf = first
    more = True
    line_no = 0
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line_no += 1
            if line.strip():
                yield _line_message(state, b, line, query, path_values, line_no)
        if not more:
            break
        if len(buf) > limit:
            raise GatewayError(
                "RESOURCE_EXHAUSTED", f"a request message exceeds {limit} bytes", http_status=413
            )
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone()
        buf += msg.get("body", b"")
        more = msg.get("more_body", False)
    if buf.strip():
        yield _line_message(state, b, buf, query, path_values, line_no + 1)


def _line_message(
    state: StateView, b: Binding, line: bytes, query: bytes, path_values: list[str], line_no: int
) -> Message:
    try:
        return state.transcoder.build_streamed(b, line, query, path_values)
    except GatewayError as err:
        raise bad_request(
            f"request message on line {line_no}: {err.message}", f"line {line_no}"
        ) from None


def _stream_format(state: StateView, accept: bytes) -> str:
    if b"text/event-stream" in accept:
        return "sse"
    return state.options.stream_format


_CTYPES = {
    "sse": b"text/event-stream",
    "ndjson": b"application/x-ndjson",
    "json-array": b"application/json",
}


def _http_trailers(scope: Scope) -> bool:
    """Whether trailing metadata can go out as HTTP trailers: the server offers the ASGI
    trailers extension and the client accepts trailers."""
    ext = scope.get("extensions") or {}
    return "http.response.trailers" in ext and accepts_trailers(scope["headers"])


def _last_record(
    state: StateView,
    fmt: str,
    n: int,
    error: dict[str, Any] | None,
    trailers: dict[str, list[str]] | None,
) -> bytes:
    """The bytes that close a server stream of ``n`` messages: the failure and the
    in-band trailing metadata (each when present), and the JSON array's end."""
    dumps = state.codec.dumps
    if fmt == "sse":
        out = b""
        if error is not None:
            out += b"event: error\ndata: " + dumps(error) + b"\n\n"
        if trailers:
            out += b"event: trailers\ndata: " + dumps(trailers) + b"\n\n"
        return out
    record: dict[str, Any] = {}
    if error is not None:
        record["error"] = error
    if trailers:
        record["trailers"] = trailers
    if fmt == "ndjson":
        return dumps(record) + b"\n" if record else b""
    if not record:
        return b"[]" if n == 0 else b"]"
    return (b"[" if n == 0 else b",") + dumps(record) + b"]"


async def _surface_feed_error(
    feeder: asyncio.Task[None] | None, feed_error: list[BaseException]
) -> None:
    """After a call failed: let the request feeder finish, and raise its error (a bad
    request line) instead of the CANCELLED it caused, so the client sees the real cause."""
    if feeder is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
    if feed_error and isinstance(feed_error[0], GatewayError):
        raise feed_error[0] from None


async def serve_http_stream(
    state: StateView, b: Binding, scope: Scope, receive: Receive, send: Send
) -> None:
    """Serve one streaming RPC over HTTP."""
    m = b.method
    hdrs: RequestHeaders | None = None
    call: Any = None
    watcher: asyncio.Task[None] | None = None
    feeder: asyncio.Task[None] | None = None
    feed_error: list[BaseException] = []
    started = False
    try:
        hdrs = read_headers(
            scope["headers"],
            scope.get("client"),
            generate_request_id=state.options.generate_request_id,
        )
        timeout = state._timeout(b, hdrs)
        channel = state._upstream_channel(b, scope)
        path_values: list[str] = scope["path_params_raw"]
        if m.client_streaming:
            kind = "stream_stream" if m.server_streaming else "stream_unary"
            call = state._callable(channel, b, kind)(metadata=hdrs.metadata, timeout=timeout)

            async def feed() -> None:
                try:
                    async for req in ndjson_messages(state, b, scope, receive, path_values):
                        await call.write(req)
                    await call.done_writing()
                except _ClientGone:
                    call.cancel()
                except (GatewayError, grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                    feed_error.append(exc)
                    call.cancel()

            feeder = asyncio.create_task(feed())
        else:
            raw = await state._read_body(scope, receive) if b.body else b""
            req = state.transcoder.build(
                b, raw, hdrs.content_type, scope.get("query_string", b""), path_values
            )
            call = state._callable(channel, b, "unary_stream")(
                req, metadata=hdrs.metadata, timeout=timeout
            )
            watcher = asyncio.create_task(_watch_disconnect(receive, call))

        if not m.server_streaming:
            try:
                resp = await call
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                await _surface_feed_error(feeder, feed_error)
                raise
            if feeder is not None:
                await feeder
            ctype, body = state.transcoder.response_body(b, resp)
            headers = [
                (b"content-type", ctype),
                (b"content-length", str(len(body)).encode()),
                *state.request_id_header(hdrs),
            ]
            headers.extend(metadata_headers(await call.initial_metadata()))
            headers.extend(metadata_headers(await call.trailing_metadata()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return

        fmt = _stream_format(state, hdrs.accept)
        it = call.__aiter__()
        first: Message | None
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            await _surface_feed_error(feeder, feed_error)
            raise
        headers = [
            (b"content-type", _CTYPES[fmt]),
            (b"cache-control", b"no-cache"),
            *state.request_id_header(hdrs),
        ]
        headers.extend(metadata_headers(await call.initial_metadata()))
        http_trailers = _http_trailers(scope)
        start: dict[str, Any] = {"type": "http.response.start", "status": 200, "headers": headers}
        if http_trailers:
            start["trailers"] = True
        await send(start)
        started = True
        codec = state.codec
        tr = state.transcoder
        n = 0
        error: dict[str, Any] | None = None
        try:
            msg = first
            while msg is not None:
                obj = tr.response_obj(b, msg)
                if fmt == "ndjson":
                    chunk = b'{"result":' + codec.dumps(obj) + b"}\n"
                elif fmt == "sse":
                    chunk = b"data: " + codec.dumps(obj) + b"\n\n"
                else:
                    chunk = (b"[" if n == 0 else b",") + codec.dumps(obj)
                n += 1
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                try:
                    msg = await it.__anext__()
                except StopAsyncIteration:
                    msg = None
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and watcher is not None and watcher.done():
                return  # the client left; nobody to tell
            rid = hdrs.request_id if hdrs is not None else ""
            error = status_json(status_from_rpc_error(err, rid), state.catalog.pool)
            if feed_error and isinstance(feed_error[0], GatewayError):
                error = status_json(feed_error[0].to_status(), state.catalog.pool)
            trailing = err.trailing_metadata()
        in_band = None if http_trailers else metadata_json(trailing)
        chunk = _last_record(state, fmt, n, error, in_band)
        await send({"type": "http.response.body", "body": chunk, "more_body": False})
        if http_trailers:
            await send(
                {
                    "type": "http.response.trailers",
                    "headers": metadata_headers(trailing, b"grpc-trailer-"),
                    "more_trailers": False,
                }
            )
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if call is None or (task is not None and task.cancelling()):
            raise
        # The call was cancelled under us (the client left): nothing to answer.
    except _ClientGone:
        if call is not None:
            call.cancel()
    except grpc.aio.AioRpcError as err:
        if not started:
            await state.send_rpc_error(send, err, hdrs)
    except GatewayError as err:
        if call is not None:
            call.cancel()
        if not started:
            await state.send_error(send, err, hdrs)
    except OSError:
        if call is not None:
            call.cancel()
    except Exception:
        log.exception("gateway stream error in %s", m.full_name)
        if call is not None:
            call.cancel()
        if not started:
            await state.send_error(send, GatewayError("INTERNAL", "internal gateway error"), hdrs)
    finally:
        for task in (watcher, feeder):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if call is not None and not call.done():
            call.cancel()


async def _watch_disconnect(receive: Receive, call: Any) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            call.cancel()
            return
