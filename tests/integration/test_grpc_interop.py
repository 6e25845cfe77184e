"""gRPC's interop cases through meshkit (grpc/grpc doc/interop-test-descriptions.md).

Every case runs for sync and aio clients against sync and aio servers, twice: bare
grpcio (``control``) and through meshkit's client interceptors and server builders
(``meshkit``) under a policy that turns every feature on without changing a healthy
call's outcome. A case that passes in ``control`` and fails with ``meshkit`` is a
meshkit bug: the interceptors must be transparent to every grpcio call API.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

import meshkit.grpc
import meshkit.grpc.aio
from meshkit import Policy
from tests.integration._interop import (
    ECHO_INITIAL,
    ECHO_TRAILING,
    EMPTY_CALL,
    FULL_DUPLEX,
    STREAMING_INPUT,
    STREAMING_OUTPUT,
    UNARY_CALL,
    UNIMPLEMENTED_METHOD,
    UNIMPLEMENTED_SERVICE,
    AioServerThread,
    aio_handlers,
    decode,
    encode,
    plain_sync_server,
    sync_handlers,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

# Every client and server feature on, none firing for a healthy call: generous limits,
# a breaker that cannot reach its minimum calls, faults at 0%, a fallback for a trigger
# that never fires, hedges later than any case takes.
POLICY = Policy.from_dict(
    {
        "defaults": {
            "timeout": "20s",
            "deadline_margin": "5ms",
            "retry": {
                "max_attempts": 3,
                "initial_backoff": "10ms",
                "max_backoff": "50ms",
                "retryable_codes": ["UNAVAILABLE"],
                "budget": {"ratio": 0.2, "min_per_second": 10},
            },
            "circuit_breaker": {
                "window": {"type": "count", "size": 1000},
                "minimum_calls": 1000,
                "scope": "method",
            },
            "bulkhead": {"max_concurrent": 1000, "side": "both"},
            "rate_limit": {"rate": 100000, "per": "1s", "burst": 100000, "side": "both"},
            "fallback": {"on": ["circuit_open"], "kind": "error", "code": "UNAVAILABLE"},
            "fault": {"abort": {"percent": 0, "code": "UNAVAILABLE"}, "side": "both"},
        },
        "rules": [
            {
                "match": [
                    "grpc.testing.TestService/EmptyCall",
                    "grpc.testing.TestService/UnaryCall",
                ],
                "hedging": {"max_attempts": 2, "delay": "10s"},
                "retry": None,
            }
        ],
    }
)

# The spec's sizes.
LARGE_REQUEST, LARGE_RESPONSE = 271828, 314159
INPUT_SIZES = (27182, 8, 1828, 45904)
OUTPUT_SIZES = (31415, 9, 2653, 58979)
SPECIAL_MESSAGE = "\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n"
TRAILING_VALUE = b"\xab\xab\xab"
INITIAL_VALUE = "test_initial_metadata_value"


class Servers:
    """The module's four servers: {sync, aio} x {control, meshkit}; ``port(kind, mode)``."""

    def __init__(self) -> None:
        self._stops: list[Callable[[], None]] = []
        self.ports: dict[tuple[str, str], int] = {}

    def start(self) -> Servers:
        plain, port = plain_sync_server()
        self._stops.append(lambda: plain.stop(0))
        self.ports["sync", "control"] = port
        mesh = meshkit.grpc.server(
            policy=POLICY, services=[sync_handlers()], handle_signals=False, health=False
        ).start()
        self._stops.append(lambda: mesh.stop(0))
        self.ports["sync", "meshkit"] = mesh.port

        async def aio_plain() -> tuple[Any, int]:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((aio_handlers(),))
            p = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, p

        async def aio_mesh() -> tuple[Any, int]:
            srv = meshkit.grpc.aio.server(
                policy=POLICY, services=[aio_handlers()], handle_signals=False, health=False
            )
            await srv.start()
            return srv, srv.port

        for mode, make in (("control", aio_plain), ("meshkit", aio_mesh)):
            thread = AioServerThread(make).start()
            self._stops.append(thread.stop)
            self.ports["aio", mode] = thread.port
        return self

    def stop(self) -> None:
        for stop in reversed(self._stops):
            stop()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers().start()
    yield s
    s.stop()


def sync_channel(target: str, mode: str) -> grpc.Channel:
    ch = grpc.insecure_channel(target)
    if mode == "meshkit":
        return grpc.intercept_channel(ch, *meshkit.grpc.client_interceptors(POLICY, target=target))
    return ch


def aio_channel(target: str, mode: str) -> grpc.aio.Channel:
    interceptors = (
        meshkit.grpc.aio.client_interceptors(POLICY, target=target) if mode == "meshkit" else None
    )
    return grpc.aio.insecure_channel(target, interceptors=interceptors)


SERVER_KINDS = ("sync", "aio")
MODES = ("control", "meshkit")


@pytest.fixture(scope="module")
def sync_channels(servers: Servers) -> Iterator[dict[tuple[str, str], grpc.Channel]]:
    chans = {
        (kind, mode): sync_channel(f"127.0.0.1:{servers.ports[kind, mode]}", mode)
        for kind in SERVER_KINDS
        for mode in MODES
    }
    yield chans
    for ch in chans.values():
        ch.close()


class Pipe:
    """A request iterator fed by the test (grpc's interop client's ``_Pipe``)."""

    def __init__(self) -> None:
        self._values: list[Any] = []
        self._open = True
        self._cond = threading.Condition()

    def __iter__(self) -> Pipe:
        return self

    def __next__(self) -> Any:
        with self._cond:
            # Bounded: a case that forgets to close its pipe fails instead of hanging.
            if not self._cond.wait_for(lambda: self._values or not self._open, timeout=20):
                raise StopIteration
            if self._values:
                return self._values.pop(0)
            raise StopIteration

    def add(self, value: Any) -> None:
        with self._cond:
            self._values.append(value)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open = False
            self._cond.notify_all()

    def __enter__(self) -> Pipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sizes(data: bytes) -> int:
    return decode(data)[1]


# -- sync client cases -----------------------------------------------------------------


def s_empty_unary(ch: grpc.Channel) -> None:
    assert ch.unary_unary(EMPTY_CALL)(b"", timeout=10) == b""


def s_large_unary(ch: grpc.Channel) -> None:
    out = ch.unary_unary(UNARY_CALL)(
        encode({"response_size": LARGE_RESPONSE}, LARGE_REQUEST), timeout=10
    )
    assert _sizes(out) == LARGE_RESPONSE


def s_client_compressed_unary(ch: grpc.Channel) -> None:
    out = ch.unary_unary(UNARY_CALL)(
        encode({"response_size": LARGE_RESPONSE}, LARGE_REQUEST),
        timeout=10,
        compression=grpc.Compression.Gzip,
    )
    assert _sizes(out) == LARGE_RESPONSE


def s_server_compressed_unary(ch: grpc.Channel) -> None:
    out = ch.unary_unary(UNARY_CALL)(
        encode({"response_size": LARGE_RESPONSE, "response_compressed": True}, LARGE_REQUEST),
        timeout=10,
    )
    assert _sizes(out) == LARGE_RESPONSE


def s_client_streaming(ch: grpc.Channel) -> None:
    out = ch.stream_unary(STREAMING_INPUT)(iter([encode({}, n) for n in INPUT_SIZES]), timeout=10)
    assert decode(out)[0]["aggregated_payload_size"] == sum(INPUT_SIZES)


def s_client_streaming_future(ch: grpc.Channel) -> None:
    with Pipe() as pipe:
        fut = ch.stream_unary(STREAMING_INPUT).future(pipe, timeout=10)
        for n in INPUT_SIZES:  # the future returned before the stream ended
            pipe.add(encode({}, n))
    assert decode(fut.result(timeout=10))[0]["aggregated_payload_size"] == sum(INPUT_SIZES)


def s_server_streaming(ch: grpc.Channel) -> None:
    stream = ch.unary_stream(STREAMING_OUTPUT)(
        encode({"response_sizes": list(OUTPUT_SIZES)}), timeout=10
    )
    assert [_sizes(m) for m in stream] == list(OUTPUT_SIZES)
    assert stream.code() is grpc.StatusCode.OK


def s_ping_pong(ch: grpc.Channel) -> None:
    with Pipe() as pipe:
        stream = ch.stream_stream(FULL_DUPLEX)(pipe, timeout=10)
        for n_in, n_out in zip(INPUT_SIZES, OUTPUT_SIZES, strict=True):
            pipe.add(encode({"response_sizes": [n_out]}, n_in))
            assert _sizes(next(stream)) == n_out
    assert list(stream) == []
    assert stream.code() is grpc.StatusCode.OK


def s_empty_stream(ch: grpc.Channel) -> None:
    stream = ch.stream_stream(FULL_DUPLEX)(iter(()), timeout=10)
    assert list(stream) == []


def s_cancel_after_begin(ch: grpc.Channel) -> None:
    with Pipe() as pipe:
        fut = ch.stream_unary(STREAMING_INPUT).future(pipe, timeout=10)
        assert fut.cancel()
        assert fut.cancelled()
        assert fut.code() is grpc.StatusCode.CANCELLED


def s_cancel_after_first_response(ch: grpc.Channel) -> None:
    with Pipe() as pipe:
        stream = ch.stream_stream(FULL_DUPLEX)(pipe, timeout=10)
        pipe.add(encode({"response_sizes": [OUTPUT_SIZES[0]]}, INPUT_SIZES[0]))
        assert _sizes(next(stream)) == OUTPUT_SIZES[0]
        stream.cancel()
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
    assert info.value.code() is grpc.StatusCode.CANCELLED


def s_timeout_on_sleeping_server(ch: grpc.Channel) -> None:
    with Pipe() as pipe:
        stream = ch.stream_stream(FULL_DUPLEX)(pipe, timeout=0.001)
        pipe.add(encode({"sleep": True}, 27182))
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def s_custom_metadata(ch: grpc.Channel) -> None:
    md = ((ECHO_INITIAL, INITIAL_VALUE), (ECHO_TRAILING, TRAILING_VALUE))
    req = encode({"response_size": 314159}, 271828)
    _, call = ch.unary_unary(UNARY_CALL).with_call(req, timeout=10, metadata=md)
    assert (ECHO_INITIAL, INITIAL_VALUE) in call.initial_metadata()
    assert (ECHO_TRAILING, TRAILING_VALUE) in call.trailing_metadata()
    with Pipe() as pipe:
        stream = ch.stream_stream(FULL_DUPLEX)(pipe, timeout=10, metadata=md)
        pipe.add(encode({"response_sizes": [314159]}, 271828))
        assert _sizes(next(stream)) == 314159
        pipe.close()
        assert list(stream) == []
        assert (ECHO_INITIAL, INITIAL_VALUE) in stream.initial_metadata()
        assert (ECHO_TRAILING, TRAILING_VALUE) in stream.trailing_metadata()


def _status_cases(ch: grpc.Channel, message: str) -> None:
    status = {"response_status": {"code": 2, "message": message}}
    with pytest.raises(grpc.RpcError) as info:
        ch.unary_unary(UNARY_CALL)(encode(status), timeout=10)
    assert info.value.code() is grpc.StatusCode.UNKNOWN
    assert info.value.details() == message
    stream = ch.stream_stream(FULL_DUPLEX)(iter([encode(status)]), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() is grpc.StatusCode.UNKNOWN
    assert info.value.details() == message


def s_status_code_and_message(ch: grpc.Channel) -> None:
    _status_cases(ch, "test status message")


def s_special_status_message(ch: grpc.Channel) -> None:
    _status_cases(ch, SPECIAL_MESSAGE)


def s_unimplemented_method(ch: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        ch.unary_unary(UNIMPLEMENTED_METHOD)(b"", timeout=10)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


def s_unimplemented_service(ch: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        ch.unary_unary(UNIMPLEMENTED_SERVICE)(b"", timeout=10)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


SYNC_CASES: dict[str, Callable[[grpc.Channel], None]] = {
    name[2:]: fn for name, fn in dict(globals()).items() if name.startswith("s_")
}


# -- aio client cases ------------------------------------------------------------------


async def a_empty_unary(ch: grpc.aio.Channel) -> None:
    assert await ch.unary_unary(EMPTY_CALL)(b"", timeout=10) == b""


async def a_large_unary(ch: grpc.aio.Channel) -> None:
    out = await ch.unary_unary(UNARY_CALL)(
        encode({"response_size": LARGE_RESPONSE}, LARGE_REQUEST), timeout=10
    )
    assert _sizes(out) == LARGE_RESPONSE


async def a_client_compressed_unary(ch: grpc.aio.Channel) -> None:
    out = await ch.unary_unary(UNARY_CALL)(
        encode({"response_size": LARGE_RESPONSE}, LARGE_REQUEST),
        timeout=10,
        compression=grpc.Compression.Gzip,
    )
    assert _sizes(out) == LARGE_RESPONSE


async def a_server_compressed_unary(ch: grpc.aio.Channel) -> None:
    out = await ch.unary_unary(UNARY_CALL)(
        encode({"response_size": LARGE_RESPONSE, "response_compressed": True}, LARGE_REQUEST),
        timeout=10,
    )
    assert _sizes(out) == LARGE_RESPONSE


async def a_client_streaming(ch: grpc.aio.Channel) -> None:
    async def requests() -> AsyncIterator[bytes]:
        for n in INPUT_SIZES:
            yield encode({}, n)

    out = await ch.stream_unary(STREAMING_INPUT)(requests(), timeout=10)
    assert decode(out)[0]["aggregated_payload_size"] == sum(INPUT_SIZES)


async def a_client_streaming_write(ch: grpc.aio.Channel) -> None:
    call = ch.stream_unary(STREAMING_INPUT)(timeout=10)
    for n in INPUT_SIZES:
        await call.write(encode({}, n))
    await call.done_writing()
    assert decode(await call)[0]["aggregated_payload_size"] == sum(INPUT_SIZES)
    assert await call.code() is grpc.StatusCode.OK


async def a_server_streaming(ch: grpc.aio.Channel) -> None:
    call = ch.unary_stream(STREAMING_OUTPUT)(
        encode({"response_sizes": list(OUTPUT_SIZES)}), timeout=10
    )
    assert [_sizes(m) async for m in call] == list(OUTPUT_SIZES)
    assert await call.code() is grpc.StatusCode.OK


async def a_ping_pong(ch: grpc.aio.Channel) -> None:
    call = ch.stream_stream(FULL_DUPLEX)(timeout=10)
    for n_in, n_out in zip(INPUT_SIZES, OUTPUT_SIZES, strict=True):
        await call.write(encode({"response_sizes": [n_out]}, n_in))
        assert _sizes(await call.read()) == n_out
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK


async def a_empty_stream(ch: grpc.aio.Channel) -> None:
    call = ch.stream_stream(FULL_DUPLEX)(timeout=10)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK


async def a_cancel_after_begin(ch: grpc.aio.Channel) -> None:
    call = ch.stream_unary(STREAMING_INPUT)(timeout=10)
    await asyncio.sleep(0)  # let the call begin
    assert call.cancel()
    assert await call.code() is grpc.StatusCode.CANCELLED
    assert call.cancelled()


async def a_cancel_after_first_response(ch: grpc.aio.Channel) -> None:
    call = ch.stream_stream(FULL_DUPLEX)(timeout=10)
    await call.write(encode({"response_sizes": [OUTPUT_SIZES[0]]}, INPUT_SIZES[0]))
    assert _sizes(await call.read()) == OUTPUT_SIZES[0]
    assert call.cancel()
    assert await call.code() is grpc.StatusCode.CANCELLED
    with pytest.raises(asyncio.CancelledError):
        await call.read()


async def a_timeout_on_sleeping_server(ch: grpc.aio.Channel) -> None:
    call = ch.stream_stream(FULL_DUPLEX)(timeout=0.001)
    try:
        await call.write(encode({"sleep": True}, 27182))
    except asyncio.InvalidStateError:
        pass  # the call may already be over (the spec allows it)
    assert await call.code() is grpc.StatusCode.DEADLINE_EXCEEDED


async def a_custom_metadata(ch: grpc.aio.Channel) -> None:
    md = grpc.aio.Metadata((ECHO_INITIAL, INITIAL_VALUE), (ECHO_TRAILING, TRAILING_VALUE))
    call = ch.unary_unary(UNARY_CALL)(
        encode({"response_size": 314159}, 271828), timeout=10, metadata=md
    )
    assert _sizes(await call) == 314159
    assert (ECHO_INITIAL, INITIAL_VALUE) in list(await call.initial_metadata())
    assert (ECHO_TRAILING, TRAILING_VALUE) in list(await call.trailing_metadata())
    stream = ch.stream_stream(FULL_DUPLEX)(timeout=10, metadata=md)
    await stream.write(encode({"response_sizes": [314159]}, 271828))
    assert _sizes(await stream.read()) == 314159
    await stream.done_writing()
    assert await stream.read() is grpc.aio.EOF
    assert (ECHO_INITIAL, INITIAL_VALUE) in list(await stream.initial_metadata())
    assert (ECHO_TRAILING, TRAILING_VALUE) in list(await stream.trailing_metadata())


async def _a_status_cases(ch: grpc.aio.Channel, message: str) -> None:
    status = {"response_status": {"code": 2, "message": message}}
    with pytest.raises(grpc.RpcError) as info:
        await ch.unary_unary(UNARY_CALL)(encode(status), timeout=10)
    assert info.value.code() is grpc.StatusCode.UNKNOWN
    assert info.value.details() == message
    call = ch.stream_stream(FULL_DUPLEX)(timeout=10)
    await call.write(encode(status))
    await call.done_writing()
    assert await call.code() is grpc.StatusCode.UNKNOWN
    assert await call.details() == message


async def a_status_code_and_message(ch: grpc.aio.Channel) -> None:
    await _a_status_cases(ch, "test status message")


async def a_special_status_message(ch: grpc.aio.Channel) -> None:
    await _a_status_cases(ch, SPECIAL_MESSAGE)


async def a_unimplemented_method(ch: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        await ch.unary_unary(UNIMPLEMENTED_METHOD)(b"", timeout=10)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def a_unimplemented_service(ch: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        await ch.unary_unary(UNIMPLEMENTED_SERVICE)(b"", timeout=10)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


AIO_CASES: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    name[2:]: fn for name, fn in dict(globals()).items() if name.startswith("a_")
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("server", SERVER_KINDS)
@pytest.mark.parametrize("case", sorted(SYNC_CASES))
def test_sync_client(
    case: str, server: str, mode: str, sync_channels: dict[tuple[str, str], grpc.Channel]
) -> None:
    SYNC_CASES[case](sync_channels[server, mode])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("server", SERVER_KINDS)
@pytest.mark.parametrize("case", sorted(AIO_CASES))
async def test_aio_client(case: str, server: str, mode: str, servers: Servers) -> None:
    async with aio_channel(f"127.0.0.1:{servers.ports[server, mode]}", mode) as ch:
        await AIO_CASES[case](ch)
