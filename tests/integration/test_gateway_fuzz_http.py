"""The gateway's bad-input tests over a real socket, against ``meshkit gateway`` and
``meshkit edge`` themselves (the CLIs: meshkit's own HTTP/1.1 server on uvloop and
httptools; every test runs against both), including malformed HTTP no client library
would send, written to the socket byte for byte.

Every answer must be a 4xx with a ``google.rpc.Status`` JSON body. Two layers give them:

* the gateway app (bad JSON, percent-encoding, UTF-8, metadata headers, body limits),
  on a connection that stays open and serves the next request;
* the CLI's HTTP server, for what it refuses to parse (bytes that may not appear in a
  request line or header, framing errors: ``Content-Length`` with ``Transfer-Encoding``,
  a bad chunk size, a method that is no method; a missing, repeated or invalid ``Host``)
  with 400, a header section over 64 KiB or 100 fields with 431, a transfer coding other
  than chunked with 501, an HTTP version other than 1.0/1.1 with 505, a header section not
  complete in time with 408; these answer ``Connection: close`` and the server closes the
  connection after the reply, and no request behind a refused one reaches the app.

A request whose body never arrives in full (``Content-Length`` larger than what is sent,
then the client closes) gets no answer: the server closes the connection, and the
upstream is never called. After each case the server still serves a good request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.integration.gateway_backend import ROOT, Backend, descriptor_sets, free_port, serving
from tests.integration.gateway_inputs import BAD_REQUESTS, garbage_bodies, is_long_header

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

HEADER_TIMEOUT = 1.0  # --header-timeout of the gateway under test
KEEP_ALIVE = 1.5  # --keep-alive-timeout


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo() -> AsyncIterator[Backend]:
    async with serving("gwtest") as b:
        yield b


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["gateway", "edge"])
async def port(
    request: pytest.FixtureRequest, echo: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[int]:
    """``meshkit gateway``, then ``meshkit edge`` (the same HTTP server in front of the
    edge's app), in front of the gwtest backend, with a 64 KiB body limit and short header
    and keep-alive timeouts (so their tests need not wait long). Every test of the module
    runs against both."""
    command: str = request.param
    tmp = tmp_path_factory.mktemp(f"{command}-fuzz")
    cfg = tmp / "gateway.yaml"
    text = "gateway:\n  max_body_bytes: 65536\n"
    if command == "edge":
        text += f"upstreams:\n  default: 127.0.0.1:{echo.port}\n"
    cfg.write_text(text)
    log = tmp / f"{command}.log"
    listen = free_port()
    args = ["--descriptor-set", str(descriptor_sets()["gwtest"]), "--config", str(cfg)]
    if command == "gateway":
        args += ["--upstream", f"127.0.0.1:{echo.port}"]
    args += ["--port", str(listen)]
    args += ["--header-timeout", str(HEADER_TIMEOUT), "--keep-alive-timeout", str(KEEP_ALIVE)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshkit.cli", command, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        await _wait_ready(listen, proc, log)
        yield listen
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    # Nothing of the above made the server fail on its own.
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")


async def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + 60
    while loop.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited {proc.returncode}: {log.read_text()}")
        with contextlib.suppress(OSError):
            if (await _exchange(port, b"GET /v1/echo/up HTTP/1.1\r\nHost: gw\r\n\r\n")) is not None:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("gateway did not come up")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after the answer


async def _read_answer(reader: asyncio.StreamReader) -> Answer | None:
    """One response (with a Content-Length) from ``reader``; None if the server closed the
    connection without answering."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise AssertionError(f"truncated response head: {exc.partial!r}") from None
        return None
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    closed = False
    if headers.get("connection") == "close":
        closed = await asyncio.wait_for(reader.read(1), 10) == b""
    return Answer(int(status_line.split(" ")[1]), headers, body, closed)


async def _exchange(port: int, raw: bytes, *, close_write: bool = False) -> Answer | None:
    """Write ``raw`` to a fresh connection (then half-close it if asked) and read one answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if close_write:
            writer.write_eof()
        return await _read_answer(reader)
    finally:
        writer.close()


def _status_json(a: Answer | None, status: int | None = None) -> dict[str, Any]:
    """Assert ``a`` is a 4xx (``status`` if given) with a google.rpc.Status JSON body."""
    assert a is not None, "no answer"
    assert 400 <= a.status < 500 and status in (None, a.status), (a.status, a.body)
    assert a.headers["content-type"] == "application/json", a.headers
    body: dict[str, Any] = json.loads(a.body)
    assert set(body) == {"code", "message", "details"}, body
    assert isinstance(body["code"], int) and 0 < body["code"] <= 16
    assert isinstance(body["message"], str) and isinstance(body["details"], list)
    assert b"Traceback" not in a.body
    return body


def _request(method: str, url: str, kw: dict[str, Any]) -> bytes:
    """A BAD_REQUESTS entry as raw HTTP/1.1: its header bytes as they are, even those a
    client library refuses to send (``@`` in a name, DEL in a value)."""
    lines = [f"{method} {url} HTTP/1.1".encode(), b"host: gw"]
    lines += [
        k.encode("latin-1") + b": " + v.encode("latin-1") for k, v in kw.get("headers", {}).items()
    ]
    content: bytes | None = kw.get("content")
    if content is not None:
        lines.append(b"content-length: %d" % len(content))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (content or b"")


async def _still_serves(port: int) -> None:
    a = await _exchange(port, b"GET /v1/echo/alive HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert a is not None and a.status == 200 and json.loads(a.body) == {"name": "alive"}


@pytest.mark.parametrize(("method", "url", "kw"), BAD_REQUESTS)
async def test_bad_input_over_a_socket_is_4xx_status_json(
    port: int, method: str, url: str, kw: dict[str, Any]
) -> None:
    a = await _exchange(port, _request(method, url, kw))
    if is_long_header(kw):
        assert a is not None and a.status == 200  # long but valid, and under 64 KiB
    else:
        _status_json(a)
    await _still_serves(port)


# (name, raw request, HTTP status, gRPC code, answered by the protocol and then closed)
MALFORMED: list[tuple[str, bytes, int, int, bool]] = [
    ("bad percent escape", b"GET /v1/echo/%zz HTTP/1.1\r\n", 400, 3, False),
    ("cut percent escape", b"GET /v1/echo/%E0%A4%A HTTP/1.1\r\n", 400, 3, False),
    ("escaped invalid UTF-8 in path", b"GET /v1/echo/%ff%fe HTTP/1.1\r\n", 400, 3, False),
    ("overlong UTF-8 in path", b"GET /v1/files/a/%C0%AF HTTP/1.1\r\n", 400, 3, False),
    ("raw invalid UTF-8 in path", b"GET /v1/echo/\xff\xfe HTTP/1.1\r\n", 400, 3, True),
    ("raw UTF-8 in path", b"GET /v1/echo/caf\xc3\xa9 HTTP/1.1\r\n", 400, 3, True),
    ("NUL in path", b"GET /v1/echo/a\x00b HTTP/1.1\r\n", 400, 3, True),
    ("space in path", b"GET /v1/echo/a b HTTP/1.1\r\n", 400, 3, True),
    (
        "bad metadata key",
        b"GET /v1/headers HTTP/1.1\r\nGrpc-Metadata-Bad!Key: v\r\n",
        400,
        3,
        False,
    ),
    ("empty metadata key", b"GET /v1/headers HTTP/1.1\r\nGrpc-Metadata-: v\r\n", 400, 3, False),
    ("not a header token", b"GET /v1/headers HTTP/1.1\r\nGrpc-Metadata-a@b: v\r\n", 400, 3, True),
    ("space in header name", b"GET /v1/headers HTTP/1.1\r\nbad name: v\r\n", 400, 3, True),
    (
        "non-ASCII metadata",
        b"GET /v1/headers HTTP/1.1\r\nGrpc-Metadata-x: caf\xc3\xa9\r\n",
        400,
        3,
        False,
    ),
    (
        "control char in value",
        b"GET /v1/headers HTTP/1.1\r\nGrpc-Metadata-x: \x01\r\n",
        400,
        3,
        True,
    ),
    (
        "bad base64 metadata",
        b"GET /v1/headers HTTP/1.1\r\nGrpc-Metadata-x-bin: a\r\n",
        400,
        3,
        False,
    ),
    (
        "huge header",
        b"GET /v1/headers HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n",
        431,
        8,
        True,
    ),
    ("many headers", b"GET /v1/headers HTTP/1.1\r\n" + b"X-A: b\r\n" * 20_000, 431, 8, True),
    (
        "invalid UTF-8 body",
        b"POST /v1/echo HTTP/1.1\r\nContent-Length: 3\r\n\r\n\xff\xfe\xfd",
        400,
        3,
        False,
    ),
    (
        "invalid UTF-8 in a string",
        b'POST /v1/echo HTTP/1.1\r\nContent-Length: 13\r\n\r\n{"name":"\xc3("}',
        400,
        3,
        False,
    ),
    (
        "declared body too large",
        b"POST /v1/echo HTTP/1.1\r\nContent-Length: 100000\r\n",
        413,
        8,
        False,
    ),
    ("bad Content-Length", b"POST /v1/echo HTTP/1.1\r\nContent-Length: abc\r\n", 400, 3, True),
    (
        "Content-Length and chunked",
        b"POST /v1/echo HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n",
        400,
        3,
        True,
    ),
    (
        "bad chunk size",
        b"POST /v1/echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        3,
        True,
    ),
    ("not a method", b"G@T /v1/echo/x HTTP/1.1\r\n", 400, 3, True),
    ("not HTTP", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400, 3, True),
]


@pytest.mark.parametrize(
    ("raw", "status", "code", "by_protocol"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED],
)
async def test_malformed_http_is_4xx_status_json(
    port: int, raw: bytes, status: int, code: int, by_protocol: bool
) -> None:
    if raw.startswith((b"GET", b"POST", b"G@T")):
        line, _, rest = raw.partition(b"\r\n")
        raw = line + b"\r\nHost: gw\r\n" + rest
        if b"\r\n\r\n" not in raw:
            raw += b"\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        a = await _read_answer(reader)
        assert _status_json(a, status)["code"] == code
        assert a is not None
        if by_protocol:
            # Refused before the app saw it: Connection: close, and the server closes
            # (after reading what was sent, so the reply is not lost to a reset).
            assert a.headers["connection"] == "close" and a.closed
            assert json.loads(a.body)["message"].startswith(
                ("invalid HTTP request", "request header")
            )
        else:
            # Answered by the gateway app: the connection serves the next request.
            assert "connection" not in a.headers
            if status == 413:
                writer.write(b"x" * 100_000)  # the declared body, which nobody reads
            writer.write(b"GET /v1/echo/next HTTP/1.1\r\nHost: gw\r\n\r\n")
            nxt = await _read_answer(reader)
            assert nxt is not None and nxt.status == 200, nxt
            assert json.loads(nxt.body) == {"name": "next"}
    finally:
        writer.close()
    await _still_serves(port)


async def test_header_section_that_never_ends_is_refused_while_arriving(port: int) -> None:
    # Header lines keep coming and the section never completes: the 431 must come from
    # counting the bytes as they arrive, long before the client would stop.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(_read_answer(reader))
    sent = 0
    try:
        writer.write(b"GET /v1/headers HTTP/1.1\r\nHost: gw\r\n")
        while not answer.done() and sent < 4 << 20:
            writer.write(b"X-Pad: " + b"p" * 4089 + b"\r\n")  # 4 KiB a line
            sent += 4098
            await writer.drain()
            await asyncio.sleep(0)
        a = await asyncio.wait_for(answer, 10)
    finally:
        answer.cancel()
        writer.close()
    assert _status_json(a, 431)["code"] == 8
    assert a is not None and a.closed
    assert sent < 4 << 20  # answered while the client was still sending
    await _still_serves(port)


async def test_truncated_body_then_close_gets_no_answer(port: int, echo: Backend) -> None:
    calls = echo.calls
    raw = b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n" + b'{"name": "'
    assert await _exchange(port, raw, close_write=True) is None  # closed, nothing written
    assert echo.calls == calls  # the upstream was never called
    await _still_serves(port)


async def test_garbage_bodies_over_keep_alive(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        for body in garbage_bodies():
            r = await c.post("/v1/echo", content=body)
            assert r.status_code in (200, 400), r.text
            assert r.headers["content-type"] == "application/json"
            if r.status_code == 400:
                assert set(r.json()) == {"code", "message", "details"}
        assert (await c.get("/v1/echo/alive")).json() == {"name": "alive"}


_PIECES = [
    b"a",
    b"/",
    b"%",
    b"%2F",
    b"%2f",
    b"%zz",
    b"%ff",
    b"%C3%A9",
    b"%00",
    b"\xff",
    b"\xc3\xa9",
    b"?",
    b"=",
    b"&",
    b"#",
    b":",
    b";",
    b"*",
    b"\x00",
    b"\x7f",
    b" ",
    b"..",
    b"{x}",
]


async def test_random_request_targets(port: int) -> None:
    # Seeded: the same 150 targets every run. Each is answered (200 for a matched route,
    # otherwise a 4xx Status JSON); none is a 5xx or left without an answer.
    rnd = random.Random(4)
    prefixes = [b"/v1/echo/", b"/v1/files/", b"/v1/query?", b"/v1/", b"/"]
    for _ in range(150):
        target = rnd.choice(prefixes) + b"".join(rnd.choices(_PIECES, k=rnd.randrange(1, 12)))
        a = await _exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert a is not None, target
        if a.status != 200:
            _status_json(a)
    await _still_serves(port)


def _head(target: bytes = b"/v1/echo/x", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + target + b" " + version + b"\r\n"


# (name, raw request, HTTP status, gRPC code): refused by the server itself.
REFUSED: list[tuple[str, bytes, int, int]] = [
    ("101 headers", _head() + b"Host: gw\r\n" + b"X-A: b\r\n" * 100 + b"\r\n", 431, 8),
    (
        "header section just over 64 KiB",
        _head() + b"Host: gw\r\n" + (b"X-Pad: " + b"p" * 16_000 + b"\r\n") * 5 + b"\r\n",
        431,
        8,
    ),
    ("no Host on HTTP/1.1", _head() + b"X-A: b\r\n\r\n", 400, 3),
    ("two Host fields", _head() + b"Host: gw\r\nHost: other\r\n\r\n", 400, 3),
    ("invalid Host", _head() + b"Host: a/b@c\r\n\r\n", 400, 3),
    (
        "Transfer-Encoding then Content-Length",
        b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 3\r\n\r\n0\r\n\r\n",
        400,
        3,
    ),
    (
        "differing Content-Length",
        b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
        3,
    ),
    (
        "gzip transfer coding",
        b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        501,
        12,
    ),
    (
        "gzip then chunked",
        b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        12,
    ),
    ("HTTP/2.0 request line", _head(version=b"HTTP/2.0") + b"Host: gw\r\n\r\n", 505, 12),
    ("HTTP/1.2 request line", _head(version=b"HTTP/1.2") + b"Host: gw\r\n\r\n", 505, 12),
    ("HTTP/0.9 request line", _head(version=b"HTTP/0.9") + b"Host: gw\r\n\r\n", 505, 12),
]


def _refused(a: Answer | None, status: int, code: int) -> None:
    """A Status JSON refusal with ``Connection: close``, the connection then closed."""
    assert a is not None, "no answer"
    assert a.status == status, (a.status, a.body)
    assert a.headers["content-type"] == "application/json", a.headers
    body = json.loads(a.body)
    assert set(body) == {"code", "message", "details"} and body["code"] == code, body
    assert a.headers["connection"] == "close" and a.closed


@pytest.mark.parametrize(
    ("raw", "status", "code"), [pytest.param(*case[1:], id=case[0]) for case in REFUSED]
)
async def test_refused_by_the_server(port: int, raw: bytes, status: int, code: int) -> None:
    _refused(await _exchange(port, raw), status, code)
    await _still_serves(port)


async def test_http_1_0_without_host_and_100_headers_are_served(port: int) -> None:
    # The limits' other side: HTTP/1.0 needs no Host, and exactly 100 fields pass.
    a = await _exchange(port, _head(version=b"HTTP/1.0") + b"\r\n")
    assert a is not None and a.status == 200 and json.loads(a.body) == {"name": "x"}
    a = await _exchange(port, _head() + b"Host: gw\r\n" + b"X-A: b\r\n" * 99 + b"\r\n")
    assert a is not None and a.status == 200


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding: identity\r\n",
    ],
)
async def test_no_request_is_smuggled_behind_content_length_and_chunked(
    port: int, echo: Backend, framing: bytes
) -> None:
    # Whichever framing a front proxy believed, the request hidden in the body must never
    # reach the app: one refusal, then the connection ends.
    calls = echo.calls
    smuggled = b"GET /v1/echo/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
    raw = b"POST /v1/echo HTTP/1.1\r\nHost: gw\r\n" + framing + b"\r\n0\r\n\r\n" + smuggled
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        _refused(await _read_answer(reader), 400, 3)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # nothing after the refusal
    finally:
        writer.close()
    assert echo.calls == calls
    await _still_serves(port)


async def test_header_section_not_complete_in_time_is_408(port: int) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        start = loop.time()
        writer.write(b"GET /v1/echo/slow HTTP/1.1\r\nHost: gw\r\n")  # and never the end
        await writer.drain()
        a = await _read_answer(reader)
        took = loop.time() - start
    finally:
        writer.close()
    _refused(a, 408, 4)
    assert HEADER_TIMEOUT * 0.8 <= took < HEADER_TIMEOUT + 5, took
    await _still_serves(port)


async def test_idle_keep_alive_connection_is_closed(port: int) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /v1/echo/a HTTP/1.1\r\nHost: gw\r\n\r\n")
        a = await _read_answer(reader)
        assert a is not None and a.status == 200 and "connection" not in a.headers
        idle_from = loop.time()
        assert await asyncio.wait_for(reader.read(1), 10) == b""  # closed, silently
        assert KEEP_ALIVE * 0.8 <= loop.time() - idle_from < KEEP_ALIVE + 5
    finally:
        writer.close()
    # A connection that never sends a byte is idle too.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await asyncio.wait_for(reader.read(1), 10) == b""
    finally:
        writer.close()


@pytest.mark.parametrize("command", ["gateway", "edge"])
@pytest.mark.parametrize(
    "flag",
    ["--max-header-bytes=0", "--max-headers=-1", "--header-timeout=0", "--keep-alive-timeout=x"],
)
async def test_http_flags_are_validated(command: str, flag: str) -> None:
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meshkit.cli", command, "--descriptor-set", "x", flag],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert f"argument {flag.split('=')[0]}: must be a positive" in out.stderr, out.stderr
