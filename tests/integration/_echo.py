"""A scriptable test service for meshkit's gRPC integration tests (no codegen).

Requests and responses are JSON in bytes. Each request scripts the server's behaviour
for that call, so one service covers every resilience scenario:

``key``          counter name; the server counts calls per key (``server.calls[key]``)
``fail``         ``[{"code": "UNAVAILABLE", "times": 2, "pushback_ms": 100}]``: the first
                 ``times`` calls with this key fail with ``code`` (and optional pushback)
``code``         always fail with this code
``delay``        seconds to sleep before answering (cancellable, bounded by the deadline)
``delays``       per-attempt delays, ``[0.5, 0.0]``: call n sleeps ``delays[n-1]``
``count``        stream this many response messages (server-streaming and bidi)
``fail_after``   after ``count`` messages, fail with this code
``next``         ``{"target": "...", "aio": false}``: call the same method on another server
                 (through a meshkit channel) and nest its answer as ``downstream``

Each answer carries ``n`` (the server's count for the key), ``deadline`` (seconds the
server saw left, or null), ``prev`` (``grpc-previous-rpc-attempts``), ``port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio

import meshkit.deadline

SERVICE = "meshkit.test.Echo"
OTHER_SERVICE = "meshkit.test.Other"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI = f"/{SERVICE}/Bidi"
OTHER_UNARY = f"/{OTHER_SERVICE}/Unary"


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def loads(data: bytes) -> Any:
    return json.loads(data) if data else {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Script:
    """The server-side state shared by the sync and aio servers: counters and events."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.cancelled: dict[str, int] = defaultdict(int)
        self.in_flight = 0
        self.max_in_flight = 0

    def total(self, key: str) -> int:
        with self.lock:
            return self.calls[key]

    def begin(self, req: dict[str, Any], md: Iterable[Any]) -> tuple[int, dict[str, Any]]:
        key = str(req.get("key", "default"))
        with self.lock:
            self.calls[key] += 1
            n = self.calls[key]
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        prev = None
        for k, v in md or ():
            if k in ("grpc-previous-rpc-attempts", "x-meshkit-previous-attempts"):
                prev = int(v)
        info = {
            "n": n,
            "key": key,
            "prev": prev,
            "deadline": meshkit.deadline.remaining(),
            "port": self.port,
        }
        return n, info

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1

    @staticmethod
    def failure(req: dict[str, Any], n: int) -> tuple[str, int | None] | None:
        if req.get("code"):
            return str(req["code"]), req.get("pushback_ms")
        seen = 0
        for step in req.get("fail", ()):
            seen += int(step.get("times", 1))
            if n <= seen:
                return str(step["code"]), step.get("pushback_ms")
        return None

    @staticmethod
    def delay(req: dict[str, Any], n: int) -> float:
        delays = req.get("delays")
        if delays:
            return float(delays[n - 1]) if n - 1 < len(delays) else 0.0
        return float(req.get("delay", 0.0))


def _trailers(pushback_ms: int | None) -> tuple[tuple[str, str], ...]:
    return () if pushback_ms is None else (("grpc-retry-pushback-ms", str(pushback_ms)),)


# ---------------------------------------------------------------------------- sync


class SyncEcho:
    """Sync handlers over a :class:`Script`."""

    def __init__(self, script: Script) -> None:
        self.s = script
        self._next_channels: dict[str, Any] = {}
        self.policy: Any = None

    def _wait(self, seconds: float, context: grpc.ServicerContext) -> None:
        end = time.monotonic() + seconds
        while context.is_active() and time.monotonic() < end:
            time.sleep(min(0.01, max(0.0, end - time.monotonic())))

    def _downstream(self, req: dict[str, Any]) -> Any:
        nxt = req["next"]
        target = nxt["target"]
        ch = self._next_channels.get(target)
        if ch is None:
            import meshkit.grpc

            ch = grpc.intercept_channel(
                grpc.insecure_channel(target),
                *meshkit.grpc.client_interceptors(self.policy, target=target),
            )
            self._next_channels[target] = ch
        call = ch.unary_unary(UNARY, request_serializer=dumps, response_deserializer=loads)
        return call(nxt.get("request", {}))

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = loads(request)
        n, info = self.s.begin(req, context.invocation_metadata())
        try:
            d = self.s.delay(req, n)
            if d:
                self._wait(d, context)
                if not context.is_active():
                    with self.s.lock:
                        self.s.cancelled[info["key"]] += 1
                    return b""
            fail = self.s.failure(req, n)
            if fail:
                context.set_trailing_metadata(_trailers(fail[1]))
                context.abort(getattr(grpc.StatusCode, fail[0]), f"scripted {fail[0]}")
            if req.get("next"):
                info["downstream"] = self._downstream(req)
            if "reply" in req:
                info["reply"] = req["reply"]
            return dumps(info)
        finally:
            self.s.end()

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        req = loads(request)
        n, info = self.s.begin(req, context.invocation_metadata())
        try:
            if fail := self.s.failure(req, n):
                context.set_trailing_metadata(_trailers(fail[1]))
                context.abort(getattr(grpc.StatusCode, fail[0]), f"scripted {fail[0]}")
            if d := self.s.delay(req, n):  # before the first message
                self._wait(d, context)
            for i in range(int(req.get("count", 1))):
                yield dumps({**info, "i": i, "deadline": meshkit.deadline.remaining()})
            if req.get("fail_after"):
                context.abort(getattr(grpc.StatusCode, req["fail_after"]), "scripted mid-stream")
        finally:
            self.s.end()

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        items = [loads(r) for r in requests]
        req = items[0] if items else {}
        n, info = self.s.begin(req, context.invocation_metadata())
        try:
            if fail := self.s.failure(req, n):
                context.set_trailing_metadata(_trailers(fail[1]))
                context.abort(getattr(grpc.StatusCode, fail[0]), f"scripted {fail[0]}")
            info["received"] = len(items)
            return dumps(info)
        finally:
            self.s.end()

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        first = True
        n = 0
        for raw in requests:
            req = loads(raw)
            if first:
                n, _info = self.s.begin(req, context.invocation_metadata())
                self.s.end()
                first = False
                if fail := self.s.failure(req, n):
                    context.set_trailing_metadata(_trailers(fail[1]))
                    context.abort(getattr(grpc.StatusCode, fail[0]), f"scripted {fail[0]}")
            yield dumps({"n": n, "echo": req, "deadline": meshkit.deadline.remaining()})

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        echo = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            },
        )
        other = grpc.method_handlers_generic_handler(
            OTHER_SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(self.unary)}
        )
        return [echo, other]


class SyncServer:
    """A grpc.server on a free loopback port running :class:`SyncEcho`."""

    def __init__(self, interceptors: list[Any] | None = None, workers: int = 16) -> None:
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers), interceptors=interceptors or ()
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"
        self.script = Script(self.port)
        self.echo = SyncEcho(self.script)
        self.server.add_generic_rpc_handlers(self.echo.handlers())

    def start(self) -> SyncServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0)


# ----------------------------------------------------------------------------- aio


class AioEcho:
    """Asyncio handlers over a :class:`Script`."""

    def __init__(self, script: Script) -> None:
        self.s = script
        self._next_channels: dict[str, Any] = {}
        self.policy: Any = None

    async def _downstream(self, req: dict[str, Any]) -> Any:
        import meshkit.grpc.aio

        target = req["next"]["target"]
        ch = self._next_channels.get(target)
        if ch is None:
            ch = grpc.aio.insecure_channel(
                target,
                interceptors=meshkit.grpc.aio.client_interceptors(self.policy, target=target),
            )
            self._next_channels[target] = ch
        call = ch.unary_unary(UNARY, request_serializer=dumps, response_deserializer=loads)
        return await call(req["next"].get("request", {}))

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        req = loads(request)
        n, info = self.s.begin(req, context.invocation_metadata() or ())
        try:
            d = self.s.delay(req, n)
            if d:
                try:
                    await asyncio.sleep(d)
                except asyncio.CancelledError:
                    with self.s.lock:
                        self.s.cancelled[info["key"]] += 1
                    raise
            fail = self.s.failure(req, n)
            if fail:
                context.set_trailing_metadata(_trailers(fail[1]))
                await context.abort(getattr(grpc.StatusCode, fail[0]), f"scripted {fail[0]}")
            if req.get("next"):
                info["downstream"] = await self._downstream(req)
            if "reply" in req:
                info["reply"] = req["reply"]
            return dumps(info)
        finally:
            self.s.end()

    async def server_stream(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        req = loads(request)
        n, info = self.s.begin(req, context.invocation_metadata() or ())
        try:
            if fail := self.s.failure(req, n):
                context.set_trailing_metadata(_trailers(fail[1]))
                await context.abort(getattr(grpc.StatusCode, fail[0]), f"scripted {fail[0]}")
            if d := self.s.delay(req, n):  # before the first message
                await asyncio.sleep(d)
            for i in range(int(req.get("count", 1))):
                yield dumps({**info, "i": i, "deadline": meshkit.deadline.remaining()})
            if req.get("fail_after"):
                await context.abort(getattr(grpc.StatusCode, req["fail_after"]), "mid-stream")
        finally:
            self.s.end()

    async def client_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        items = [loads(r) async for r in requests]
        req = items[0] if items else {}
        n, info = self.s.begin(req, context.invocation_metadata() or ())
        try:
            if fail := self.s.failure(req, n):
                context.set_trailing_metadata(_trailers(fail[1]))
                await context.abort(getattr(grpc.StatusCode, fail[0]), f"scripted {fail[0]}")
            info["received"] = len(items)
            return dumps(info)
        finally:
            self.s.end()

    async def bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        first = True
        n = 0
        async for raw in requests:
            req = loads(raw)
            if first:
                n, _info = self.s.begin(req, context.invocation_metadata() or ())
                self.s.end()
                first = False
                if fail := self.s.failure(req, n):
                    context.set_trailing_metadata(_trailers(fail[1]))
                    await context.abort(getattr(grpc.StatusCode, fail[0]), f"scripted {fail[0]}")
            yield dumps({"n": n, "echo": req, "deadline": meshkit.deadline.remaining()})

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        echo = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            },
        )
        other = grpc.method_handlers_generic_handler(
            OTHER_SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(self.unary)}
        )
        return [echo, other]


class AioServer:
    """A grpc.aio server on a free loopback port running :class:`AioEcho`."""

    def __init__(self, interceptors: list[Any] | None = None) -> None:
        self.server = grpc.aio.server(interceptors=interceptors or ())
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"
        self.script = Script(self.port)
        self.echo = AioEcho(self.script)
        self.server.add_generic_rpc_handlers(self.echo.handlers())

    async def start(self) -> AioServer:
        await self.server.start()
        return self

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.stop(0)


# ------------------------------------------------------------------ typed fallback service
# Fallbacks need real message types: the client interceptor finds the response type in
# the default descriptor pool by method name. This registers a tiny service there,
# built from well-known types: meshkit.test.Typed/Get(StringValue) -> Struct.

TYPED_SERVICE = "meshkit.test.Typed"
TYPED_GET = f"/{TYPED_SERVICE}/Get"


def _register_typed_service() -> None:
    from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2, wrappers_pb2

    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(TYPED_SERVICE)
        return
    except KeyError:
        pass
    _ = (struct_pb2.Struct, wrappers_pb2.StringValue)  # their files must be in the pool
    fdp = descriptor_pb2.FileDescriptorProto(
        name="meshkit/test/typed.proto",
        package="meshkit.test",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto", "google/protobuf/wrappers.proto"],
    )
    svc = fdp.service.add(name="Typed")
    svc.method.add(
        name="Get",
        input_type=".google.protobuf.StringValue",
        output_type=".google.protobuf.Struct",
    )
    pool.Add(fdp)


_register_typed_service()


def typed_handlers(script: Script) -> grpc.GenericRpcHandler:
    """Sync handler for meshkit.test.Typed/Get: the StringValue holds a JSON script."""
    from google.protobuf import struct_pb2, wrappers_pb2

    def get(request: wrappers_pb2.StringValue, context: grpc.ServicerContext) -> Any:
        req = json.loads(request.value or "{}")
        n, _info = script.begin(req, context.invocation_metadata())
        script.end()
        if fail := script.failure(req, n):
            context.abort(getattr(grpc.StatusCode, fail[0]), f"scripted {fail[0]}")
        out = struct_pb2.Struct()
        out.update({"n": n, "port": script.port, "source": "server"})
        return out

    return grpc.method_handlers_generic_handler(
        TYPED_SERVICE,
        {
            "Get": grpc.unary_unary_rpc_method_handler(
                get,
                request_deserializer=wrappers_pb2.StringValue.FromString,
                response_serializer=struct_pb2.Struct.SerializeToString,
            )
        },
    )


def typed_handlers_aio(script: Script) -> grpc.GenericRpcHandler:
    """The asyncio twin of :func:`typed_handlers`."""
    from google.protobuf import struct_pb2, wrappers_pb2

    async def get(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext) -> Any:
        req = json.loads(request.value or "{}")
        n, _info = script.begin(req, context.invocation_metadata() or ())
        script.end()
        if fail := script.failure(req, n):
            await context.abort(getattr(grpc.StatusCode, fail[0]), f"scripted {fail[0]}")
        out = struct_pb2.Struct()
        out.update({"n": n, "port": script.port, "source": "server"})
        return out

    return grpc.method_handlers_generic_handler(
        TYPED_SERVICE,
        {
            "Get": grpc.unary_unary_rpc_method_handler(
                get,
                request_deserializer=wrappers_pb2.StringValue.FromString,
                response_serializer=struct_pb2.Struct.SerializeToString,
            )
        },
    )


# ------------------------------------------------------------------------------ harness
# One suite, two flavours (go-grpc-middleware style): every test is async and talks to
# a Mesh, which runs sync servers/clients on threads or aio ones on the loop.


class Client:
    """Calls the echo service through a meshkit channel, sync or aio, from async tests."""

    def __init__(self, mesh: Mesh, channel: Any) -> None:
        self.mesh = mesh
        self.channel = channel

    async def _run(self, fn: Any) -> Any:
        if self.mesh.kind == "aio":
            return await fn()
        import contextvars
        import functools

        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.mesh.pool, functools.partial(ctx.run, fn))

    async def unary(
        self,
        req: dict[str, Any],
        *,
        method: str = UNARY,
        timeout: float | None = None,
        metadata: Any = None,
    ) -> Any:
        call = self.channel.unary_unary(
            method, request_serializer=dumps, response_deserializer=loads
        )
        return await self._run(lambda: call(req, timeout=timeout, metadata=metadata))

    async def typed(self, req: dict[str, Any], *, timeout: float | None = None) -> Any:
        from google.protobuf import struct_pb2, wrappers_pb2

        call = self.channel.unary_unary(
            TYPED_GET,
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=struct_pb2.Struct.FromString,
        )
        msg = wrappers_pb2.StringValue(value=json.dumps(req, sort_keys=True))
        return await self._run(lambda: call(msg, timeout=timeout))

    async def server_stream(
        self, req: dict[str, Any], *, timeout: float | None = None
    ) -> list[Any]:
        call = self.channel.unary_stream(
            SERVER_STREAM, request_serializer=dumps, response_deserializer=loads
        )
        return await self._collect(lambda: call(req, timeout=timeout))

    async def abandon_server_stream(
        self, req: dict[str, Any], read: int, *, cancel: bool, timeout: float | None = None
    ) -> int:
        """Open a server stream, read ``read`` messages, then cancel it or just drop it."""
        call = self.channel.unary_stream(
            SERVER_STREAM, request_serializer=dumps, response_deserializer=loads
        )
        if self.mesh.kind == "aio":
            stream = call(req, timeout=timeout)
            got = 0
            if read:
                async for _ in stream:
                    got += 1
                    if got == read:
                        break
            if cancel:
                stream.cancel()
            del stream
            return got

        def run() -> int:
            stream = call(req, timeout=timeout)
            got = 0
            for _ in range(read):
                next(stream)
                got += 1
            if cancel:
                stream.cancel()
            del stream
            return got

        return int(await self._run(run))

    async def open_server_stream(self, req: dict[str, Any]) -> tuple[Any, asyncio.Future[Any]]:
        """Start a server stream and a reader of it; returns the call and the reading."""
        call = self.channel.unary_stream(
            SERVER_STREAM, request_serializer=dumps, response_deserializer=loads
        )
        stream = call(req, timeout=10)
        if self.mesh.kind == "aio":

            async def read() -> list[Any]:
                return [m async for m in stream]

            return stream, asyncio.ensure_future(read())
        loop = asyncio.get_running_loop()
        return stream, loop.run_in_executor(self.mesh.pool, lambda: list(stream))

    async def _collect(self, make: Any) -> list[Any]:
        """Collect a response stream; on error raise it with ``.received`` set."""
        got: list[Any] = []
        if self.mesh.kind == "aio":
            try:
                async for item in make():
                    got.append(item)
            except grpc.RpcError as err:
                err.received = got  # type: ignore[attr-defined]
                raise
            return got

        def consume() -> list[Any]:
            try:
                for item in make():
                    got.append(item)
            except grpc.RpcError as err:
                err.received = got  # type: ignore[attr-defined]
                raise
            return got

        return list(await self._run(consume))

    async def client_stream(self, reqs: list[dict[str, Any]], *, raw: bool = False) -> Any:
        """``raw``: send pre-serialized bytes, so the replay buffer can measure them."""
        if raw:
            call = self.channel.stream_unary(CLIENT_STREAM, response_deserializer=loads)
            body = [dumps(r) for r in reqs]
            return await self._run(lambda: call(iter(body)))
        call = self.channel.stream_unary(
            CLIENT_STREAM, request_serializer=dumps, response_deserializer=loads
        )
        return await self._run(lambda: call(iter(reqs)))

    def start_unary(self, req: dict[str, Any], *, timeout: float | None = None) -> Any:
        """Start a unary call without waiting: ``.future()`` on sync, the call on aio."""
        call = self.channel.unary_unary(
            UNARY, request_serializer=dumps, response_deserializer=loads
        )
        if self.mesh.kind == "aio":
            return call(req, timeout=timeout)
        return call.future(req, timeout=timeout)

    async def code_of(self, started: Any) -> grpc.StatusCode:
        """The status of a call from :meth:`start_unary`, once it is over."""
        if self.mesh.kind == "aio":
            code: grpc.StatusCode = await started.code()
            return code
        return await self._run(started.code)  # type: ignore[no-any-return]

    async def client_stream_fed(self, reqs: list[dict[str, Any]]) -> Any:
        """A client stream whose requests are written after the call object came back:
        ``call.write()`` on grpc.aio, a ``.future()`` fed through a queue on sync."""
        call = self.channel.stream_unary(
            CLIENT_STREAM, request_serializer=dumps, response_deserializer=loads
        )
        if self.mesh.kind == "aio":
            acall = call(timeout=10)
            for r in reqs:
                await acall.write(r)
            await acall.done_writing()
            return await acall

        import queue

        feed: queue.Queue[Any] = queue.Queue()
        fut = call.future(iter(lambda: feed.get(timeout=10), None), timeout=10)
        for r in reqs:  # .future() returned before any request was sent
            feed.put(r)
        feed.put(None)
        return await self._run(lambda: fut.result(timeout=10))

    async def bidi(self, reqs: list[dict[str, Any]]) -> list[Any]:
        call = self.channel.stream_stream(
            BIDI, request_serializer=dumps, response_deserializer=loads
        )
        return await self._collect(lambda: call(iter(reqs)))


class Mesh:
    """Servers and clients of one flavour (``"sync"`` or ``"aio"``) for a test."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pool = futures.ThreadPoolExecutor(max_workers=32)
        self._servers: list[Any] = []
        self._channels: list[Any] = []

    async def server(self, policy: Any = None, *, isolate: Any = None, typed: bool = False) -> Any:
        import meshkit.grpc
        import meshkit.grpc.aio

        if self.kind == "aio":
            srv: Any = AioServer(meshkit.grpc.aio.server_interceptors(policy))
            if typed:
                srv.server.add_generic_rpc_handlers((typed_handlers_aio(srv.script),))
            srv.echo.policy = policy
            await srv.start()
        else:
            srv = SyncServer(meshkit.grpc.server_interceptors(policy, isolate=isolate))
            if typed:
                srv.server.add_generic_rpc_handlers((typed_handlers(srv.script),))
            srv.echo.policy = policy
            srv.start()
        self._servers.append(srv)
        return srv

    def client(self, policy: Any, target: str, **options: Any) -> Client:
        import meshkit.grpc
        import meshkit.grpc.aio

        if self.kind == "aio":
            ch: Any = grpc.aio.insecure_channel(
                target,
                interceptors=meshkit.grpc.aio.client_interceptors(policy, target=target, **options),
            )
        else:
            ch = grpc.intercept_channel(
                grpc.insecure_channel(target),
                *meshkit.grpc.client_interceptors(policy, target=target, **options),
            )
        self._channels.append(ch)
        return Client(self, ch)

    async def close(self) -> None:
        for ch in self._channels:
            if self.kind == "aio":
                await ch.close()
            else:
                ch.close()
        for srv in self._servers:
            if self.kind == "aio":
                await srv.stop()
            else:
                srv.stop()
            for ch in srv.echo._next_channels.values():
                res = ch.close()
                if asyncio.iscoroutine(res):
                    await res
        self.pool.shutdown(wait=False, cancel_futures=True)


async def eventually(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())
