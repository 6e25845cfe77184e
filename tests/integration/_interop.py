"""grpc.testing.TestService for the interop cases, without codegen, for sync and aio servers.

grpc's interop cases (grpc/grpc doc/interop-test-descriptions.md) use the messages of
``grpc/testing/messages.proto``. Here a message is bytes: a 4-byte big-endian length,
a JSON header (the fields the cases use: ``response_size``, ``response_sizes``,
``response_status``, ``response_compressed``, ``aggregated_payload_size``) and the
payload (``payload_size`` zero bytes), so large_unary sends and receives its real sizes.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio

SERVICE = "grpc.testing.TestService"
EMPTY_CALL = f"/{SERVICE}/EmptyCall"
UNARY_CALL = f"/{SERVICE}/UnaryCall"
STREAMING_OUTPUT = f"/{SERVICE}/StreamingOutputCall"
STREAMING_INPUT = f"/{SERVICE}/StreamingInputCall"
FULL_DUPLEX = f"/{SERVICE}/FullDuplexCall"
UNIMPLEMENTED_METHOD = f"/{SERVICE}/UnimplementedCall"
UNIMPLEMENTED_SERVICE = "/grpc.testing.UnimplementedService/UnimplementedCall"

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"


def encode(header: dict[str, Any] | None = None, payload_size: int = 0) -> bytes:
    """A message: the header and ``payload_size`` zero bytes."""
    head = json.dumps(header or {}).encode()
    return struct.pack(">I", len(head)) + head + bytes(payload_size)


def decode(data: bytes) -> tuple[dict[str, Any], int]:
    """(header, payload size) of a message; the empty message is ``({}, 0)``."""
    if not data:
        return {}, 0
    (size,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4 : 4 + size])
    return header, len(data) - 4 - size


def _echo_metadata(md: Any) -> tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]]:
    items = tuple(md or ())
    initial = tuple((k, v) for k, v in items if k == ECHO_INITIAL)
    trailing = tuple((k, v) for k, v in items if k == ECHO_TRAILING)
    return initial, trailing


def _status(header: dict[str, Any]) -> tuple[grpc.StatusCode, str] | None:
    status = header.get("response_status")
    if not status or not status.get("code"):
        return None
    code = next(c for c in grpc.StatusCode if c.value[0] == status["code"])
    return code, str(status.get("message", ""))


# -- sync ----------------------------------------------------------------------------


class _SyncService:
    def _begin(self, context: grpc.ServicerContext) -> None:
        initial, trailing = _echo_metadata(context.invocation_metadata())
        if initial:
            context.send_initial_metadata(initial)
        if trailing:
            context.set_trailing_metadata(trailing)

    def empty(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return b""

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin(context)
        header, _ = decode(request)
        if header.get("response_compressed"):
            context.set_compression(grpc.Compression.Gzip)
        status = _status(header)
        if status is not None:
            context.abort(*status)
        return encode({}, int(header.get("response_size", 0)))

    def streaming_output(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        header, _ = decode(request)
        for size in header.get("response_sizes", ()):
            yield encode({}, int(size))

    def streaming_input(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = sum(decode(r)[1] for r in requests)
        return encode({"aggregated_payload_size": total})

    def full_duplex(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        self._begin(context)
        for request in requests:
            header, _ = decode(request)
            status = _status(header)
            if status is not None:
                context.abort(*status)
            for size in header.get("response_sizes", ()):
                yield encode({}, int(size))
            if header.get("sleep"):  # timeout_on_sleeping_server: outlive the deadline
                ended = threading.Event()
                context.add_callback(ended.set)  # runs when grpc ends the call
                ended.wait(30)


def _handlers(svc: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "EmptyCall": grpc.unary_unary_rpc_method_handler(svc.empty),
            "UnaryCall": grpc.unary_unary_rpc_method_handler(svc.unary),
            "StreamingOutputCall": grpc.unary_stream_rpc_method_handler(svc.streaming_output),
            "StreamingInputCall": grpc.stream_unary_rpc_method_handler(svc.streaming_input),
            "FullDuplexCall": grpc.stream_stream_rpc_method_handler(svc.full_duplex),
        },
    )


def sync_handlers() -> grpc.GenericRpcHandler:
    """The TestService for a sync server."""
    return _handlers(_SyncService())


# -- asyncio ---------------------------------------------------------------------------


class _AioService:
    async def _begin(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        initial, trailing = _echo_metadata(context.invocation_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        if trailing:
            context.set_trailing_metadata(trailing)

    async def empty(self, request: bytes, context: Any) -> bytes:
        return b""

    async def unary(self, request: bytes, context: Any) -> bytes:
        await self._begin(context)
        header, _ = decode(request)
        if header.get("response_compressed"):
            context.set_compression(grpc.Compression.Gzip)
        status = _status(header)
        if status is not None:
            await context.abort(*status)
        return encode({}, int(header.get("response_size", 0)))

    async def streaming_output(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        header, _ = decode(request)
        for size in header.get("response_sizes", ()):
            yield encode({}, int(size))

    async def streaming_input(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        total = 0
        async for r in requests:
            total += decode(r)[1]
        return encode({"aggregated_payload_size": total})

    async def full_duplex(
        self, requests: AsyncIterator[bytes], context: Any
    ) -> AsyncIterator[bytes]:
        await self._begin(context)
        async for request in requests:
            header, _ = decode(request)
            status = _status(header)
            if status is not None:
                await context.abort(*status)
            for size in header.get("response_sizes", ()):
                yield encode({}, int(size))
            if header.get("sleep"):  # cancelled by grpc at the deadline
                await asyncio.sleep(3600)


def aio_handlers() -> grpc.GenericRpcHandler:
    """The TestService for a grpc.aio server."""
    return _handlers(_AioService())


class AioServerThread:
    """A grpc.aio server on an event loop of its own thread (shared by sync and aio
    clients, whatever loop a test runs on)."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server: Any = None
        self.port = 0

    def start(self) -> AioServerThread:
        self._thread.start()
        self.server, self.port = asyncio.run_coroutine_threadsafe(self._make(), self._loop).result(
            30
        )
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


def plain_sync_server() -> tuple[grpc.Server, int]:
    """A bare grpcio server (the control)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((sync_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port
