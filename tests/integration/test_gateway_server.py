"""The gateway behind real servers: meshkit's own (the CLIs') and stock uvicorn (streaming,
backpressure, disconnects, WebSocket), and the ``meshkit gateway`` command (workers,
SIGHUP reload, reflection)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
import websockets

from meshkit.gateway import GatewayOptions, create_app
from meshkit.gateway.serve._http import HttpOptions
from meshkit.gateway.serve._serve import HttpServer
from meshkit.gateway.serve._server import bind_socket
from tests.integration.gateway_backend import (
    ROOT,
    Backend,
    descriptor_sets,
    free_port,
    gwtest_backend,
    load_catalog,
    serving,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


async def _wait_for(cond: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo() -> AsyncIterator[Backend]:
    async with serving("gwtest") as b:
        yield b


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shop() -> AsyncIterator[Backend]:
    async with serving("shop") as b:
        yield b


class _Served:
    def __init__(self, port: int, app: Any, protocol: str) -> None:
        self.app = app
        self.port = port
        self.protocol = protocol  # "httptools" (stock uvicorn) or "cli" (meshkit's server)
        self.url = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["httptools", "cli"])
async def served(
    request: pytest.FixtureRequest, echo: Backend, shop: Backend
) -> AsyncIterator[dict[str, _Served]]:
    # Stock uvicorn (public API only: the app must keep working under any ASGI server),
    # and the CLIs' own server.
    out: dict[str, _Served] = {}
    async with contextlib.AsyncExitStack() as stack:
        for name, desc, port in (("echo", "gwtest", echo.port), ("shop", "shop", shop.port)):
            app = create_app(descriptor_sets()[desc], [f"127.0.0.1:{port}"])
            listen = await stack.enter_async_context(_serving(app, request.param))
            out[name] = _Served(listen, app, request.param)
        yield out


def _reset(b: Backend) -> None:
    b.cancelled.clear()
    b.stream_started.clear()
    b.sent = 0
    b.blocked.clear()
    b.blocked_deadline = None
    b.unary_cancelled.clear()
    b.unary_terminated.clear()


@contextlib.asynccontextmanager
async def _serving(
    app: Any, via: str, lifespan: str = "on", options: HttpOptions | None = None
) -> AsyncIterator[int]:
    """``app`` served on a free port for the block: by meshkit's server (``via="cli"``)
    or stock uvicorn (``"httptools"``)."""
    sock = bind_socket("127.0.0.1", 0)
    port: int = sock.getsockname()[1]
    if via == "cli":
        server = HttpServer(
            [(sock, app)], options=options, lifespan=app if lifespan == "on" else None
        )
        task = asyncio.create_task(server.serve())
        try:
            await asyncio.wait_for(server.started_event.wait(), 10)
            yield port
        finally:
            server.stop()
            assert await asyncio.wait_for(task, 15) == 0
        return
    config = uvicorn.Config(
        app,
        http="httptools",
        ws="websockets-sansio",
        lifespan=lifespan,
        log_level="warning",
        access_log=False,
    )
    userver = uvicorn.Server(config)
    userver.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    utask = asyncio.create_task(userver.serve(sockets=[sock]))
    try:
        await _wait_for(lambda: userver.started)
        yield port
    finally:
        userver.should_exit = True
        await asyncio.wait_for(utask, 15)


async def _leave_a_blocked_call(port: int, backend: Backend) -> None:
    """Start the backend's blocking unary call through the gateway on ``port``, close the
    socket, and wait (bounded) for the backend to see the call cancelled."""
    _reset(backend)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/headers?name=block HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(backend.blocked.wait(), 10)
    # No deadline: only a cancellation from the gateway can end the call.
    assert backend.blocked_deadline is None
    writer.close()
    await asyncio.wait_for(backend.unary_cancelled.wait(), 5)  # the handler was cancelled
    await asyncio.wait_for(backend.unary_terminated.wait(), 5)  # and the RPC terminated


async def test_stream_arrives_incrementally_and_disconnect_cancels(
    served: dict[str, _Served], echo: Backend
) -> None:
    _reset(echo)
    async with (
        httpx.AsyncClient(base_url=served["echo"].url, timeout=10) as c,
        c.stream("GET", "/v1/count/-1", params={"delayMs": 20}) as r,
    ):
        assert r.status_code == 200
        lines: list[dict[str, Any]] = []
        async for line in r.aiter_lines():
            lines.append(json.loads(line))
            if len(lines) == 3:
                break
    # Three lines arrived while the upstream stream was still open (it never ends).
    assert [x["result"]["name"] for x in lines] == ["0", "1", "2"]
    await asyncio.wait_for(echo.cancelled.wait(), 10)


async def test_unary_call_cancelled_when_client_disconnects(
    served: dict[str, _Served], echo: Backend
) -> None:
    # The CLI protocol tells the app through its meshkit.disconnect extension; under stock
    # uvicorn a watcher reading receive() starts once the call has run 0.05-0.1 s.
    await _leave_a_blocked_call(served["echo"].port, echo)
    await _wait_for(lambda: served["echo"].app.state.inflight == 0)
    async with httpx.AsyncClient(base_url=served["echo"].url, timeout=10) as c:
        assert (await c.get("/v1/echo/after")).json() == {"name": "after"}


async def test_unary_cancel_on_disconnect_through_client_interceptors(echo: Backend) -> None:
    # With a client policy the call goes through grpc.aio's public API and meshkit's
    # interceptors instead of the direct path; leaving cancels it all the same.
    app = create_app(descriptor_sets()["gwtest"], [f"127.0.0.1:{echo.port}"], policy={})
    async with _serving(app, "cli") as port:
        await _leave_a_blocked_call(port, echo)
        await _wait_for(lambda: app.state.inflight == 0)


@pytest.mark.parametrize("via", ["httptools", "cli", "asgi"])
async def test_slow_unary_call_is_answered_not_cancelled(echo: Backend, via: str) -> None:
    # Calls that outlive the 0.1 s by which the fallback watches receive(), with and
    # without a request body: the watch must not take the body's end for a disconnect.
    app = create_app(
        descriptor_sets()["gwtest"],
        [f"127.0.0.1:{echo.port}"],
        options=GatewayOptions(fallback_routes="all"),  # POST /gwtest.v1.EchoService/Headers
    )

    async def calls(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await c.get("/v1/headers", params={"i32": 300}),
            await c.post("/gwtest.v1.EchoService/Headers", json={"i32": 250}),
        ]

    if via == "asgi":
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw")
        async with client as c:
            got = await calls(c)
    else:
        async with (
            _serving(app, via) as port,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c,
        ):
            got = await calls(c)
    assert [r.status_code for r in got] == [200, 200], [r.text for r in got]
    assert [r.json()["i32"] for r in got] == [300, 250]


async def _h11_get(
    port: int, target: str, headers: list[tuple[str, str]]
) -> tuple[int, dict[str, str], bytes, list[tuple[str, str]]]:
    """One GET over a fresh socket, parsed by h11 (which, unlike httpx, returns trailers):
    status, headers, body, trailer fields."""
    import h11

    conn = h11.Connection(h11.CLIENT)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = h11.Request(method="GET", target=target, headers=[("host", "gw"), *headers])
    writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, head, body = 0, {}, b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await asyncio.wait_for(reader.read(65536), 10))
            elif isinstance(event, h11.Response):
                status = event.status_code
                head = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                trailers = [(k.decode(), v.decode()) for k, v in event.headers]
                return status, head, body, trailers
            else:
                raise AssertionError(f"unexpected {event!r}")
    finally:
        writer.close()


_TRAILERS = {"x-done": ["yes"], "x-multi": ["a", "b"], "x-raw-bin": ["AP8="]}  # \x00\xff


_STREAM_QUOTA = {"code": 8, "message": "stream quota", "details": []}


@pytest.mark.parametrize("fail", [False, True])
async def test_stream_trailing_metadata_as_http_trailers(
    served: dict[str, _Served], fail: bool
) -> None:
    # Asked for with TE: trailers, trailing metadata comes as Grpc-Trailer-<key> trailer
    # fields where the server can send them (the CLI protocol), and then not in the body.
    query = "?trailers=true" + ("&failAfter=1" if fail else "")
    status, head, body, trailers = await _h11_get(
        served["echo"].port, "/v1/count/2" + query, [("te", "trailers")]
    )
    assert status == 200 and head["content-type"] == "application/x-ndjson"
    lines = [json.loads(x) for x in body.splitlines()]
    results = [{"result": {"name": "0"}}]
    if not fail:
        results.append({"result": {"name": "1", "i32": 1}})
    if served["echo"].protocol == "cli":
        assert lines == results + ([{"error": _STREAM_QUOTA}] if fail else [])
        assert trailers == [
            ("grpc-trailer-x-done", "yes"),
            ("grpc-trailer-x-multi", "a"),
            ("grpc-trailer-x-multi", "b"),
            ("grpc-trailer-x-raw-bin", "AP8="),
        ]
    else:
        # Stock uvicorn cannot send HTTP/1.1 trailers: the metadata comes in-band instead.
        last = {"error": _STREAM_QUOTA, "trailers": _TRAILERS} if fail else {"trailers": _TRAILERS}
        assert lines == [*results, last]
        assert trailers == []


@pytest.mark.parametrize("fail", [False, True])
async def test_stream_trailing_metadata_in_band_without_te_trailers(
    served: dict[str, _Served], fail: bool
) -> None:
    # A client that did not ask for trailers gets the metadata as the stream's last record:
    # its own record after a success, merged into the error record after a failure.
    query = "?trailers=true" + ("&failAfter=1" if fail else "")
    status, _, body, trailers = await _h11_get(served["echo"].port, "/v1/count/2" + query, [])
    assert status == 200 and trailers == []
    lines = [json.loads(x) for x in body.splitlines()]
    if fail:
        assert lines == [{"result": {"name": "0"}}, {"error": _STREAM_QUOTA, "trailers": _TRAILERS}]
    else:
        assert lines == [
            {"result": {"name": "0"}},
            {"result": {"name": "1", "i32": 1}},
            {"trailers": _TRAILERS},
        ]
    # A stream without trailing metadata has no such record.
    _, _, plain, _ = await _h11_get(served["echo"].port, "/v1/count/1", [])
    assert plain == b'{"result":{"name":"0"}}\n'


async def test_stream_trailing_metadata_over_sse(served: dict[str, _Served]) -> None:
    # SSE: an "event: trailers" last (EventSource's onmessage ignores named events), after
    # the error event of a failed stream; or HTTP trailers when asked for and possible.
    accept = ("accept", "text/event-stream")
    port = served["echo"].port
    _, _, body, _ = await _h11_get(port, "/v1/count/2?trailers=true&failAfter=1", [accept])
    assert body.decode().split("\n\n") == [
        'data: {"name":"0"}',
        'event: error\ndata: {"code":8,"message":"stream quota","details":[]}',
        "event: trailers\ndata: " + json.dumps(_TRAILERS, separators=(",", ":")),
        "",
    ]
    _, _, body, trailers = await _h11_get(
        port, "/v1/count/1?trailers=true", [accept, ("te", "trailers")]
    )
    if served["echo"].protocol == "cli":
        assert body == b'data: {"name":"0"}\n\n'
        assert ("grpc-trailer-x-done", "yes") in trailers
    else:
        assert trailers == []
        assert body.decode().split("\n\n") == [
            'data: {"name":"0"}',
            "event: trailers\ndata: " + json.dumps(_TRAILERS, separators=(",", ":")),
            "",
        ]


async def test_stream_trailing_metadata_json_array(echo: Backend) -> None:
    app = create_app(
        descriptor_sets()["gwtest"],
        [f"127.0.0.1:{echo.port}"],
        options=GatewayOptions(stream_format="json-array"),
    )
    async with _serving(app, "cli") as port:
        _, _, body, _ = await _h11_get(port, "/v1/count/1?trailers=true", [])
        assert json.loads(body) == [{"name": "0"}, {"trailers": _TRAILERS}]
        _, _, body, _ = await _h11_get(port, "/v1/count/0?trailers=true", [])
        assert json.loads(body) == [{"trailers": _TRAILERS}]
        _, _, body, _ = await _h11_get(port, "/v1/count/3?trailers=true&failAfter=1", [])
        assert json.loads(body) == [
            {"name": "0"},
            {"error": _STREAM_QUOTA, "trailers": _TRAILERS},
        ]
        _, _, body, trailers = await _h11_get(
            port, "/v1/count/1?trailers=true", [("te", "trailers")]
        )
        assert json.loads(body) == [{"name": "0"}]
        assert ("grpc-trailer-x-multi", "b") in trailers


async def test_cli_protocol_http_response_trailers_extension() -> None:
    # The ASGI extension itself, on a plain app: trailer fields after the last chunk (for a
    # client that sent TE: trailers; framing fields never), several trailers messages, and
    # a response with a Content-Length, whose announced trailers are dropped.
    import h11

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert "http.response.trailers" in scope["extensions"]
        start: dict[str, Any] = {"type": "http.response.start", "status": 200, "trailers": True}
        if scope["path"] == "/chunked":
            await send({**start, "headers": []})
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            await send({"type": "http.response.body", "body": b"c"})
            await send(
                {
                    "type": "http.response.trailers",
                    "headers": [(b"X-One", b"1")],
                    "more_trailers": True,
                }
            )
            trailers = [(b"x-two", b"2"), (b"content-length", b"9")]
            await send({"type": "http.response.trailers", "headers": trailers})
        else:
            await send({**start, "headers": [(b"content-length", b"3")]})
            await send({"type": "http.response.body", "body": b"abc"})
            await send({"type": "http.response.trailers", "headers": [(b"x-one", b"1")]})

    async with _serving(app, "cli", lifespan="off") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)

        async def get(target: str, te: bool) -> tuple[bytes, list[tuple[bytes, bytes]]]:
            if conn.our_state is h11.DONE:
                conn.start_next_cycle()
            headers = [("host", "x"), *([("te", "trailers")] if te else [])]
            writer.write(conn.send(h11.Request(method="GET", target=target, headers=headers)))
            writer.write(conn.send(h11.EndOfMessage()))
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await asyncio.wait_for(reader.read(65536), 10))
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return body, list(event.headers)

        try:
            # All on one keep-alive connection: each response is framed right.
            assert await get("/chunked", te=True) == (b"abc", [(b"x-one", b"1"), (b"x-two", b"2")])
            assert await get("/chunked", te=False) == (b"abc", [])
            assert await get("/length", te=True) == (b"abc", [])
            assert await get("/chunked", te=True) == (b"abc", [(b"x-one", b"1"), (b"x-two", b"2")])
        finally:
            writer.close()


async def test_backpressure_slow_reader_slows_upstream(
    served: dict[str, _Served], echo: Backend
) -> None:
    _reset(echo)
    payload = "x" * 4000
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)  # >= loopback MSS
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(s, ("127.0.0.1", served["echo"].port))
    await loop.sock_sendall(
        s, f"GET /v1/count/-1?payload={payload} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    await asyncio.wait_for(echo.stream_started.wait(), 10)
    # Read nothing: the upstream must stall once socket, HTTP and HTTP/2 buffers are full.
    last = -1
    stable = 0
    for _ in range(200):
        await asyncio.sleep(0.1)
        stable = stable + 1 if echo.sent == last else 0
        last = echo.sent
        if stable >= 5:
            break
    assert stable >= 5, f"upstream kept sending: {echo.sent}"
    stalled_at = echo.sent
    # Bounded by socket, HTTP/1.1 and HTTP/2 windows (a few MB of ~4 KB messages).
    assert stalled_at < 20000
    # Reading resumes the stream.
    got = 0
    while echo.sent <= stalled_at + 10:
        chunk = await asyncio.wait_for(loop.sock_recv(s, 65536), 10)
        assert chunk
        got += len(chunk)
    assert got > 0
    assert served["echo"].app.state.inflight == 1
    s.close()
    # The gateway cancels its call (a grpc.aio server blocked on flow control may not
    # notice at once, so this checks the gateway side).
    await _wait_for(lambda: served["echo"].app.state.inflight == 0)


async def test_client_streaming_chunked_body(served: dict[str, _Served]) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"name": "a", "i32": 1}\n{"na'
        await asyncio.sleep(0.01)
        yield b'me": "b", "i32": 2}\n'
        yield b'{"name": "c", "i32": 3}'

    async with httpx.AsyncClient(base_url=served["echo"].url, timeout=10) as c:
        r = await c.post("/v1/collect", content=body())
    assert r.json() == {"name": "a,b,c", "i32": 6, "i64": "3"}


async def test_sse_over_real_server(served: dict[str, _Served]) -> None:
    async with httpx.AsyncClient(base_url=served["echo"].url, timeout=10) as c:
        r = await c.get("/v1/count/2", headers={"accept": "text/event-stream"})
    assert r.headers["content-type"] == "text/event-stream"
    assert r.text == 'data: {"name":"0"}\n\ndata: {"name":"1","i32":1}\n\n'


async def test_websocket_bidi(served: dict[str, _Served]) -> None:
    async with websockets.connect(served["echo"].ws + "/v1/bidi") as ws:
        await ws.send(json.dumps({"name": "a", "i32": 1}))
        assert json.loads(await ws.recv()) == {"result": {"name": "A", "i32": 2}}
        await ws.send(json.dumps({"name": "bb", "i32": 5}))
        assert json.loads(await ws.recv()) == {"result": {"name": "BB", "i32": 10}}
        await ws.send("")  # half-close
        with pytest.raises(websockets.ConnectionClosedOK):
            await ws.recv()
        assert ws.close_code == 1000


async def test_websocket_trailing_metadata_is_the_last_message(served: dict[str, _Served]) -> None:
    # Bidi: after the last result, {"trailers": ...} (the HTTP streams' in-band record),
    # then the close. A stream without trailing metadata has no such message
    # (test_websocket_bidi).
    async with websockets.connect(served["echo"].ws + "/v1/bidi") as ws:
        await ws.send(json.dumps({"name": "a", "i32": 1, "flag": True}))
        assert json.loads(await ws.recv()) == {"result": {"name": "A", "i32": 2}}
        await ws.send(json.dumps({"name": "b"}))
        assert json.loads(await ws.recv()) == {"result": {"name": "B"}}
        await ws.send("")  # half-close: the call ends
        assert json.loads(await ws.recv()) == {"trailers": _TRAILERS}
        with pytest.raises(websockets.ConnectionClosedOK):
            await ws.recv()
        assert ws.close_code == 1000
    # A failed call: the trailing metadata merged into the error record, as for streams.
    async with websockets.connect(served["echo"].ws + "/v1/bidi") as ws:
        await ws.send(json.dumps({"name": "a", "flag": True}))
        assert json.loads(await ws.recv()) == {"result": {"name": "A"}}
        await ws.send(json.dumps({"name": "fail"}))
        assert json.loads(await ws.recv()) == {"error": _STREAM_QUOTA, "trailers": _TRAILERS}
        with pytest.raises(websockets.ConnectionClosedOK):
            await ws.recv()
        assert ws.close_code == 1000
    # A server stream over WebSocket ends the same way.
    async with websockets.connect(served["echo"].ws + "/v1/count/2?trailers=true") as ws:
        await ws.send("")
        got = [json.loads(await ws.recv()) for _ in range(3)]
        assert got == [
            {"result": {"name": "0"}},
            {"result": {"name": "1", "i32": 1}},
            {"trailers": _TRAILERS},
        ]
        with pytest.raises(websockets.ConnectionClosedOK):
            await ws.recv()


async def test_websocket_shop_chat_and_bad_message(served: dict[str, _Served]) -> None:
    async with websockets.connect(
        served["shop"].ws + "/v1/chat", additional_headers={"x-request-id": "ws-1"}
    ) as ws:
        await ws.send(json.dumps({"from": "me", "text": "hello"}))
        assert json.loads(await ws.recv()) == {"result": {"from": "bot", "text": "HELLO"}}
        await ws.send("{not json")
        err = json.loads(await ws.recv())
        assert err["error"]["code"] == 3 and "malformed JSON" in err["error"]["message"]


async def test_websocket_server_stream_and_disconnect(
    served: dict[str, _Served], echo: Backend
) -> None:
    async with websockets.connect(served["echo"].ws + "/v1/count/2") as ws:
        await ws.send("")
        got = [json.loads(await ws.recv()) for _ in range(2)]
        assert [g["result"]["name"] for g in got] == ["0", "1"]
        with pytest.raises(websockets.ConnectionClosedOK):
            await ws.recv()
    _reset(echo)
    async with websockets.connect(served["echo"].ws + "/v1/count/-1?delayMs=10") as ws:
        await ws.send("{}")
        await ws.recv()
    await asyncio.wait_for(echo.cancelled.wait(), 10)


async def test_websocket_unknown_route_rejected(served: dict[str, _Served]) -> None:
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(served["echo"].ws + "/v1/nothing"):
            pass
    with pytest.raises(websockets.InvalidStatus):  # unary methods are HTTP only
        async with websockets.connect(served["echo"].ws + "/v1/echo/x"):
            pass


async def test_forwarded_headers_from_a_trusted_proxy(served: dict[str, _Served]) -> None:
    # uvicorn trusts 127.0.0.1 by default: X-Forwarded-For names the client the gateway
    # appends; without it the peer address is appended.
    async with httpx.AsyncClient(base_url=served["echo"].url, timeout=10) as c:
        r = await c.get("/v1/headers", headers={"x-forwarded-for": "198.51.100.1"})
        assert r.json()["labels"]["x-forwarded-for"] == "198.51.100.1, 198.51.100.1"
        r = await c.get("/v1/headers")
        assert r.json()["labels"]["x-forwarded-for"] == "127.0.0.1"


async def test_cli_protocol_keep_alive_times_out_after_idle(echo: Backend) -> None:
    # The CLI server arms one keep-alive timer per idle stretch and re-arms it when it
    # fires early: requests 0.6 s apart keep the connection, 1 s of idleness ends it.
    app = create_app(descriptor_sets()["gwtest"], [f"127.0.0.1:{echo.port}"])
    async with _serving(app, "cli", options=HttpOptions(keep_alive_timeout=1)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        for i in range(3):
            if i:
                await asyncio.sleep(0.6)
            writer.write(b"GET /v1/echo/k" + str(i).encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        idle_from = loop.time()
        assert await asyncio.wait_for(reader.read(1), 5) == b""
        assert 0.8 <= loop.time() - idle_from < 3
        writer.close()


# --------------------------------------------------------------------------- the CLI


def _spawn(args: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "meshkit.cli", "gateway", *args],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb") if log else subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def _wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(timeout=2) as c:
        for _ in range(300):
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"gateway exited {proc.returncode}: {out}")
            try:
                await c.get(url)
                return
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise AssertionError("gateway did not come up")


def _stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.stdout.read().decode() if proc.stdout else ""


async def test_cli_workers_and_sighup_reload(echo: Backend, tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("gateway:\n  fallback_routes: unannotated\n")
    port = free_port()
    proc = _spawn(
        [
            "--descriptor-set",
            str(descriptor_sets()["gwtest"]),
            "--upstream",
            f"127.0.0.1:{echo.port}",
            "--port",
            str(port),
            "--workers",
            "2",
            "--config",
            str(cfg),
        ]
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_http(base + "/", proc)
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            assert (await c.get("/v1/echo/w")).json() == {"name": "w"}
            assert (await c.post("/gwtest.v1.EchoService/Echo", json={})).status_code == 404
            # A slow request in flight survives the reload.
            slow = asyncio.create_task(c.get("/v1/count/3", params={"delayMs": 300}))
            await asyncio.sleep(0.2)
            cfg.write_text("gateway:\n  fallback_routes: all\n")
            proc.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                # Both workers must pick it up; new connections land on either.
                for _ in range(6):
                    async with httpx.AsyncClient(base_url=base, timeout=10) as fresh:
                        r = await fresh.post("/gwtest.v1.EchoService/Echo", json={"name": "r"})
                        if r.status_code != 200:
                            return False
                return True

            for _ in range(100):
                if await reloaded():
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("reload not observed")
            r = await slow
            assert r.status_code == 200 and len(r.text.splitlines()) == 3
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


async def test_cli_workers_survive_sighup_while_starting_and_reload(
    echo: Backend, tmp_path: Path
) -> None:
    """A SIGHUP forwarded to a worker still starting (before its app installed its
    handler) neither ends it nor is lost: it reloads once it can."""
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("gateway:\n  fallback_routes: unannotated\n")
    port = free_port()
    args = ["--descriptor-set", str(descriptor_sets()["gwtest"])]
    args += ["--upstream", f"127.0.0.1:{echo.port}", "--port", str(port)]
    proc = _spawn([*args, "--workers", "2", "--config", str(cfg)])
    base = f"http://127.0.0.1:{port}"
    try:
        # The parent starts its workers only once it forwards (or ignores) SIGHUP.
        for _ in range(600):
            if _children(proc.pid) or proc.poll() is not None:
                break
            await asyncio.sleep(0.01)
        cfg.write_text("gateway:\n  fallback_routes: all\n")
        answering = False
        for _ in range(600):  # SIGHUPs all through the workers' start, and a while after
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.1 if answering else 0.05)
            if not answering:
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    answering = True
                    after = 20  # 2 s more: the other worker may be slower to start
            else:
                after -= 1
                if after == 0:
                    break
        assert answering, "the gateway did not come up"
        for _ in range(8):  # fresh connections land on either worker: both serve the new file
            async with httpx.AsyncClient(base_url=base, timeout=10) as fresh:
                r = await fresh.post("/gwtest.v1.EchoService/Echo", json={"name": "r"})
                assert r.status_code == 200, r.text
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    assert len(_workers_reloads(out)) >= 2, out


def _workers_reloads(log: str) -> set[str]:
    """The pids of the workers that logged a reload."""
    return set(re.findall(r"gateway reloaded: \d+ routes \(pid (\d+)\)", log))


async def test_cli_single_process_drains_on_sigterm_and_exits_0(echo: Backend) -> None:
    port = free_port()
    args = ["--descriptor-set", str(descriptor_sets()["gwtest"])]
    proc = _spawn([*args, "--upstream", f"127.0.0.1:{echo.port}", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_http(base + "/", proc)
        async with (
            httpx.AsyncClient(base_url=base, timeout=10) as c,
            c.stream("GET", "/v1/count/3", params={"delayMs": 300}) as r,
        ):
            # The stream's head is here, its three lines 300 ms apart: stop mid-stream.
            assert r.status_code == 200
            proc.send_signal(signal.SIGTERM)
            lines = [line async for line in r.aiter_lines() if line]
            assert len(lines) == 3, lines
        out = await asyncio.to_thread(_stop, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    # A graceful stop is a success (uvicorn alone would end the process by the signal).
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out


async def test_cli_bad_descriptor_set_fails_fast(tmp_path: Path) -> None:
    bad = tmp_path / "bad.binpb"
    bad.write_bytes(b"\xff\xff\xff not a descriptor set")
    proc = _spawn(["--descriptor-set", str(bad), "--upstream", "127.0.0.1:1", "--port", "0"])
    proc.wait(60)
    out = _stop(proc)
    assert proc.returncode == 2
    assert "bad.binpb" in out


async def test_cli_reflect(tmp_path: Path) -> None:
    b = gwtest_backend(load_catalog(descriptor_sets()["gwtest"]))
    await b.start(reflection=True)
    port = free_port()
    proc = _spawn(["--reflect", "--upstream", f"127.0.0.1:{b.port}", "--port", str(port)])
    try:
        await _wait_http(f"http://127.0.0.1:{port}/", proc)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            assert (await c.get("/v1/nested/a/b")).json() == {
                "inner": {"name": "a", "child": {"name": "b"}}
            }
    finally:
        _stop(proc)
        await b.stop()


async def test_cli_serves_edge_profile_and_reloads(echo: Backend, tmp_path: Path) -> None:
    """A config with an ``edge:`` section is served through meshkit.gateway.edge.edge."""
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f"edge:\n  upstreams:\n    echo: [127.0.0.1:{echo.port}]\n  services:\n    default: echo\n"
        "  profiles:\n    web:\n      routes: []\n"
    )
    port = free_port()
    log = tmp_path / "gateway.log"
    args = ["--descriptor-set", str(descriptor_sets()["gwtest"]), "--config", str(cfg)]
    proc = _spawn([*args, "--port", str(port), "--profile", "web"], log)
    try:
        await _wait_http(f"http://127.0.0.1:{port}/", proc)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            assert (await c.get("/v1/echo/x")).json() == {"name": "x"}
            proc.send_signal(signal.SIGHUP)
            await _wait_for(lambda: "edge reloaded" in log.read_text())
            assert (await c.get("/v1/echo/y")).json() == {"name": "y"}
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- the CLI server


async def _raw_exchange(port: int, raw: bytes, until: bytes | None = None) -> bytes:
    """Write ``raw`` on a fresh connection and read until ``until`` appears (or the server
    closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        got = b""
        while until is None or until not in got:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        writer.close()


async def test_cli_server_http_semantics() -> None:
    # A plain ASGI app: the scope, pipelining in order, HEAD/204 without a body, chunked
    # framing without a Content-Length, Expect: 100-continue, a Status JSON 500, a
    # Content-Length the app does not honour.
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(dict(scope))
        path = scope["path"]
        if path == "/boom":
            raise RuntimeError("boom")
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if path == "/empty":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/short":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"9")],
                }
            )
            await send({"type": "http.response.body", "body": b"abc"})
            return
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            await send({"type": "http.response.body", "body": b"c"})
            return
        out = path.encode() + b":" + body
        headers = [(b"content-length", b"%d" % len(out))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    async with _serving(app, "cli", lifespan="off") as port:
        # Pipelined: answered in order on one connection.
        got = await _raw_exchange(
            port,
            b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
            b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
        assert got.count(b"HTTP/1.1 200 OK\r\n") == 3, got
        assert got.index(b"/a:") < got.index(b"/b:hi") < got.index(b"/c:"), got
        assert b"date: " in got and b"server:" not in got.lower()
        scope = seen[0]
        assert scope["method"] == "GET" and scope["path"] == "/a" and scope["raw_path"] == b"/a"
        assert scope["query_string"] == b"x=1" and scope["http_version"] == "1.1"
        assert scope["scheme"] == "http" and scope["root_path"] == ""
        assert scope["client"][0] == "127.0.0.1" and scope["server"] == ("127.0.0.1", port)
        assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
        assert scope["headers"] == [(b"host", b"h")]
        # HEAD: the head only; 204: no body, no chunked framing.
        got = await _raw_exchange(port, b"HEAD /h HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\n"), got
        assert b"content-length: 3\r\n" in got
        got = await _raw_exchange(
            port, b"GET /empty HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        assert got.startswith(b"HTTP/1.1 204 ") and b"transfer-encoding" not in got, got
        assert got.endswith(b"\r\n\r\n")
        # No Content-Length: chunked.
        got = await _raw_exchange(port, b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n", b"0\r\n\r\n")
        assert b"transfer-encoding: chunked\r\n" in got and got.endswith(
            b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
        )
        # Expect: 100-continue: the interim response comes when the app reads the body.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(b"ok")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"/e:ok"
        writer.close()
        # The app raises before answering: 500 with a Status JSON body.
        got = await _raw_exchange(
            port, b"GET /boom HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 500 ") and b"application/json" in head
        assert json.loads(body)["code"] == 13
        # Fewer bytes than the declared Content-Length: the connection ends (the client
        # must not take the next response for the rest of this one).
        got = await _raw_exchange(port, b"GET /short HTTP/1.1\r\nHost: h\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"abc"), got


async def test_cli_server_forwarded_headers_only_from_trusted_peers() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        out = json.dumps([scope["client"][0], scope["scheme"]]).encode()
        headers = [(b"content-length", b"%d" % len(out))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    forwarded = {"x-forwarded-for": "203.0.113.9, 10.0.0.1", "x-forwarded-proto": "https"}
    for trusted, expected in (
        (("127.0.0.1",), ["10.0.0.1", "https"]),  # the nearest untrusted hop
        (("127.0.0.1", "10.0.0.0/8"), ["203.0.113.9", "https"]),
        (("192.0.2.1",), ["127.0.0.1", "http"]),  # the peer is not trusted: ignored
    ):
        options = HttpOptions(forwarded_allow_ips=trusted)
        async with (
            _serving(app, "cli", lifespan="off", options=options) as port,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c,
        ):
            assert (await c.get("/", headers=forwarded)).json() == expected, trusted
            assert (await c.get("/")).json() == ["127.0.0.1", "http"]


async def test_cli_server_drain_finishes_requests_and_closes_websockets() -> None:
    # A graceful stop: the request in flight is answered, an idle keep-alive connection
    # is closed, a WebSocket gets 1012, and the lifespan shutdown runs last.
    release = asyncio.Event()
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                kind = msg["type"].rsplit(".", 1)[1]
                events.append(kind)
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        elif scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while (await receive())["type"] != "websocket.disconnect":
                pass
            events.append("ws-gone")
        else:
            if scope["path"] == "/slow":
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = HttpServer([(sock, app)], lifespan=app)
    task = asyncio.create_task(server.serve())
    await asyncio.wait_for(server.started_event.wait(), 10)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        assert (await c.get("/fast")).text == "done"  # leaves an idle keep-alive connection
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            slow = asyncio.create_task(c.get("/slow"))
            await _wait_for(lambda: len(server.state.tasks) == 2)  # /slow and the socket
            server.stop()
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1012
            assert await asyncio.wait_for(idle_reader.read(), 10) == b""
            idle_writer.close()
            assert not task.done()  # still draining /slow
            release.set()
            assert (await slow).text == "done"
    assert await asyncio.wait_for(task, 15) == 0
    assert events == ["startup", "ws-gone", "shutdown"]
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_cli_server_memory_flat_under_slow_and_endless_heads() -> None:
    # Many connections whose header section never completes, slowly (408 each) or with
    # endless bytes (431 each): none buffers beyond the limit, nothing stays behind.
    import gc
    import tracemalloc

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("no request may reach the app")

    options = HttpOptions(max_header_bytes=8192, header_timeout=0.5)

    async def slow(port: int) -> bytes:
        return await _raw_exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n")

    async def endless(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n")
            for _ in range(64):  # 256 KiB if nobody stopped it
                writer.write(b"X-Pad: " + b"p" * 4089 + b"\r\n")
                await writer.drain()
            return await asyncio.wait_for(reader.read(), 10)
        except (ConnectionResetError, BrokenPipeError):
            return b"reset"
        finally:
            writer.close()

    async with _serving(app, "cli", lifespan="off", options=options) as port:

        async def burst() -> None:
            got = await asyncio.gather(*[slow(port) for _ in range(50)])
            assert all(g.startswith(b"HTTP/1.1 408 ") for g in got), got[:2]
            got = await asyncio.gather(*[endless(port) for _ in range(50)])
            assert all(g.startswith(b"HTTP/1.1 431 ") or g == b"reset" for g in got), got[:2]
            assert sum(g.startswith(b"HTTP/1.1 431 ") for g in got) >= 40

        await burst()  # warm up
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        await burst()
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert after - before < 1_000_000, after - before
    # 100 connections with up to 8 KiB of head each (+ one read): far below 256 KiB each.
    assert peak - before < 16_000_000, peak - before


async def test_cli_server_websocket_limits_and_refusals() -> None:
    # Messages over the size limit close the connection with 1009 (the sans-I/O protocol
    # enforces it); fragments are reassembled; a close before the accept is a 403; the
    # lifespan state reaches the scope as a copy.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            scope["state"]["ready"] = True
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert scope["type"] == "websocket" and scope["state"] == {"ready": True}
        await receive()
        if scope["path"] == "/refuse":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept", "subprotocol": "echo"})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": msg["text"].upper()})

    options = HttpOptions(ws_max_size=1024)
    async with _serving(app, "cli", options=options) as port:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo",
            subprotocols=["echo"],  # type: ignore[list-item]
        ) as ws:
            assert ws.subprotocol == "echo"
            await ws.send(["ab", "cd"])  # two frames, one message
            assert await ws.recv() == "ABCD"
            await ws.send("x" * 2000)
            with pytest.raises(websockets.ConnectionClosedError):
                await ws.recv()
            assert ws.close_code == 1009
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"ws://127.0.0.1:{port}/refuse"):
                pass
        assert refused.value.response.status_code == 403
        assert json.loads(refused.value.response.body or b"{}")["code"] == 7


# --------------------------------------------------------------------------- configuration (#13)


async def test_cli_balances_an_upstream_list_over_both_backends(tmp_path: Path) -> None:
    """``--upstream a:1,b:2`` (docs/gateway.md) spreads requests over both targets."""
    async with serving("gwtest") as one, serving("gwtest") as two:
        port = free_port()
        targets = f"127.0.0.1:{one.port},127.0.0.1:{two.port}"
        args = ["--descriptor-set", str(descriptor_sets()["gwtest"]), "--upstream", targets]
        proc = _spawn([*args, "--port", str(port)])
        try:
            await _wait_http(f"http://127.0.0.1:{port}/", proc)
            one.calls = two.calls = 0
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                for i in range(10):
                    r = await c.get(f"/v1/echo/n{i}")
                    assert r.status_code == 200, r.text
        finally:
            _stop(proc)
        assert one.calls + two.calls == 10
        assert one.calls == two.calls == 5  # round-robin, in turn


# `on:` is the fallback's trigger key; read as YAML 1.1 it became True and every request
# failed with 500 after a clean start.
_FALLBACK_ON = """\
policy:
  defaults:
    circuit_breaker: {}
    fallback: {on: [circuit_open]}
"""


@pytest.mark.parametrize("workers", [1, 2])
async def test_cli_policy_with_fallback_on_serves(
    echo: Backend, tmp_path: Path, workers: int
) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"upstreams: {{default: 127.0.0.1:{echo.port}}}\n" + _FALLBACK_ON)
    port = free_port()
    log = tmp_path / "gateway.log"
    args = ["--descriptor-set", str(descriptor_sets()["gwtest"]), "--config", str(cfg)]
    proc = _spawn([*args, "--port", str(port), "--workers", str(workers)], log)
    try:
        # The listening line comes only once the port answers: a connection made as
        # soon as it is in the log succeeds.
        loop = asyncio.get_running_loop()
        end = loop.time() + 60
        while "meshkit gateway on" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert loop.time() < end, log.read_text()
            await asyncio.sleep(0.01)
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for i in range(4):
                r = await c.get(f"/v1/echo/x{i}")
                assert r.status_code == 200, r.text
    finally:
        _stop(proc)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "policy:\n  defaults:\n    retry: {max_attempts: four}\n",
            ':4:27: policy.defaults.retry.max_attempts: expected an integer >= 1, got "four"',
        ),
        (
            "edge:\n  profiles:\n    web: {prefx: /web}\n",
            ":4:11: edge.profiles.web.prefx: unknown key; did you mean 'prefix'?",
        ),
    ],
)
async def test_cli_bad_config_stops_the_start_before_listening(
    echo: Backend, tmp_path: Path, workers: int, text: str, where: str
) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(f"upstreams: {{default: 127.0.0.1:{echo.port}}}\n" + text)
    args = ["--descriptor-set", str(descriptor_sets()["gwtest"]), "--config", str(cfg)]
    proc = _spawn([*args, "--port", str(free_port()), "--workers", str(workers)])
    out = (await asyncio.to_thread(proc.communicate, None, 60))[0].decode()
    assert proc.returncode == 2, out
    assert f"{cfg}{where}" in out, out
    assert "meshkit gateway on" not in out and "Traceback" not in out, out


async def test_cli_admin_reload_reaches_every_worker(echo: Backend, tmp_path: Path) -> None:
    """``POST /admin/reload`` with ``--workers 2`` reloads both workers, as SIGHUP does."""
    token = "s3cret-admin-token"
    digest = hashlib.sha256(token.encode()).hexdigest()

    def config(prefix: str) -> str:
        return (
            f"edge:\n  upstreams:\n    echo: [127.0.0.1:{echo.port}]\n"
            f"  admin: {{token_sha256: '{digest}'}}\n"
            f"  profiles:\n    web: {{prefix: '{prefix}'}}\n"
        )

    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(config("/v1api"))
    port = free_port()
    log = tmp_path / "gateway.log"
    args = ["--descriptor-set", str(descriptor_sets()["gwtest"]), "--config", str(cfg)]
    proc = _spawn([*args, "--port", str(port), "--workers", "2"], log)
    base = f"http://127.0.0.1:{port}"

    async def statuses(path: str) -> set[int]:
        # Fresh connections, so SO_REUSEPORT spreads them over both workers.
        out = set()
        for _ in range(16):
            async with httpx.AsyncClient(base_url=base, timeout=10) as fresh:
                out.add((await fresh.get(path)).status_code)
        return out

    try:
        await _wait_http(base + "/healthz", proc)
        assert await statuses("/v1api/v1/echo/a") == {200}
        cfg.write_text(config("/v2api"))
        async with httpx.AsyncClient(base_url=base, timeout=20) as c:
            r = await c.post("/admin/reload", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        # Each worker says it reloaded, by pid: both did, not only the one asked.
        await _wait_for(lambda: len(_reloaded_pids(log)) == 2, timeout=20)
        assert await statuses("/v2api/v1/echo/a") == {200}
        assert await statuses("/v1api/v1/echo/a") == {404}
        # A bad file is refused by the worker asked, and nobody reloads.
        cfg.write_text(config("/v3api") + "  metrics: maybe\n")
        async with httpx.AsyncClient(base_url=base, timeout=20) as c:
            r = await c.post("/admin/reload", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 400 and "edge.metrics" in r.text, r.text
        await asyncio.sleep(0.3)
        assert len(_reloaded_pids(log)) == 2 and log.read_text().count("edge reloaded") == 2
    finally:
        _stop(proc)


def _reloaded_pids(log: Path) -> set[str]:
    return set(re.findall(r"edge reloaded \(pid (\d+)\)", log.read_text()))
