"""meshkit._compat's fast paths and their public fallbacks give the same results.

Every test runs twice: ``fast`` (the private path, skipped when the installed version
is outside its gate or MESHKIT_COMPAT=off) and ``public`` (the fast paths switched off
in :data:`FAST_PATHS` and the objects made again). Real servers on loopback: a
grpc.aio server, nats-server with JetStream.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc.aio import AioRpcError
from nats.aio.client import Client as NatsClient

from meshkit import Policy
from meshkit._compat import grpcio as grpcio_compat
from meshkit._compat import nats as nats_compat
from meshkit.gateway.upstream._unary import unary_invoker
from meshkit.saga import _client
from meshkit.saga.eventstore import EventStoreError
from meshkit.saga.eventstore._wire import _server_version
from tests.integration._echo import Mesh, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _mode(request: pytest.FixtureRequest, module: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    mode: str = request.param
    if mode == "fast":
        off = [name for name, on in module.FAST_PATHS.items() if not on]
        if off:
            pytest.skip(f"fast paths off here: {module.describe()}")
    else:
        for name in module.FAST_PATHS:
            monkeypatch.setitem(module.FAST_PATHS, name, False)
    return mode


@pytest.fixture(params=["fast", "public"])
def grpc_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    return _mode(request, grpcio_compat, monkeypatch)


@pytest.fixture(params=["fast", "public"])
def nats_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    mode = _mode(request, nats_compat, monkeypatch)
    # The bus client class is made at import: make it again for this mode.
    cls = nats_compat.client_class(_client.encode_headers, _client.parse_header_lines)
    monkeypatch.setattr(_client, "Client", cls)
    assert (cls is NatsClient) == (mode == "public")
    return mode


# -- the gateway's unary invoker ----------------------------------------------------------


class _Upstream:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.metadata: list[tuple[str, Any]] = []

    async def call(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.metadata = list(context.invocation_metadata() or ())
        if request == b"fail":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "not now",
                trailing_metadata=(("x-why", "because"),),
            )
        if request == b"slow":
            self.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        await context.send_initial_metadata((("x-initial", "1"),))
        context.set_trailing_metadata((("x-trailing", "2"),))
        return b"pong:" + request


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[_Upstream, grpc.aio.Channel]]:
    up = _Upstream()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "compat.Echo", {"Call": grpc.unary_unary_rpc_method_handler(up.call)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield up, channel
    finally:
        await channel.close(None)
        await server.stop(None)


def _pairs(md: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in md]


async def test_the_gateway_unary_invoker_behaves_the_same(
    grpc_mode: str, upstream: tuple[_Upstream, grpc.aio.Channel]
) -> None:
    up, channel = upstream
    mc = channel.unary_unary(
        "/compat.Echo/Call",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )

    async def never(*args: Any) -> Any:
        raise AssertionError("the direct path fell back")

    direct = grpcio_compat.aio_unary_invoker(mc, never)
    assert (direct is not None) == (grpc_mode == "fast")
    invoke = unary_invoker(mc)

    # OK: the response, the initial and the trailing metadata; request metadata sent.
    resp, initial, trailing = await invoke(b"ping", (("x-request", "r"),), 5.0)
    assert resp == b"pong:ping"
    assert ("x-initial", "1") in _pairs(initial)
    assert ("x-trailing", "2") in _pairs(trailing)
    assert ("x-request", "r") in up.metadata

    # A non-OK status: AioRpcError with the code, the details and the trailing metadata.
    with pytest.raises(AioRpcError) as err:
        await invoke(b"fail", (), 5.0)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "not now"
    assert ("x-why", "because") in _pairs(err.value.trailing_metadata())

    # A deadline: DEADLINE_EXCEEDED.
    with pytest.raises(AioRpcError) as err:
        await invoke(b"slow", (), 0.2)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    up.started.clear()
    up.cancelled.clear()

    # Local cancellation cancels the RPC: the server's handler is cancelled.
    async def slow() -> Any:
        return await invoke(b"slow", (), 10.0)

    task = asyncio.create_task(slow())
    await asyncio.wait_for(up.started.wait(), 5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(up.cancelled.wait(), 5.0)


# -- hedging on the sync client -------------------------------------------------------


async def test_sync_hedging_picks_the_same_winner(grpc_mode: str) -> None:
    policy = Policy.from_dict(
        {
            "defaults": {"timeout": "5s"},
            "rules": [
                {
                    "match": "meshkit.test.Echo",
                    "hedging": {
                        "max_attempts": 3,
                        "delay": "100ms",
                        "non_fatal_codes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )
    mesh = Mesh("sync")
    try:
        srv = await mesh.server()
        client = mesh.client(policy, srv.target)
        start = time.monotonic()
        out = await client.unary({"key": "h", "delays": [1.5, 0.0]}, timeout=5.0)
        assert out["n"] == 2 and out["prev"] == 1  # the second attempt answered
        assert time.monotonic() - start < 1.4
        assert srv.script.total("h") == 2
        if grpc_mode == "fast":
            # The loser is cancelled (the server sees CANCELLED).
            assert await eventually(lambda: srv.script.cancelled["h"] == 1, timeout=2.5)
        else:
            # The public continuation cannot be cancelled: the loser runs to its end.
            await asyncio.sleep(1.6)
            assert srv.script.cancelled["h"] == 0
    finally:
        await mesh.close()


# -- the saga bus client ------------------------------------------------------------------

SENT = {
    "Nats-Msg-Id": "",  # set per test
    "Meshkit-Event-Type": "shop.v1.OrderCreated",
    " Padded ": " v ",
    "Folded": "a\r\nb",
    "Unicode": "caf\u00e9",
    "Empty": "",
}


def _received(msg_id: str) -> dict[str, str]:
    return {
        "Nats-Msg-Id": msg_id,
        "Meshkit-Event-Type": "shop.v1.OrderCreated",
        "Padded": "v",
        "Folded": "a  b",
        "Unicode": "caf\u00e9",
        "Empty": "",
    }


async def test_a_jetstream_publish_round_trips_headers(
    nats_mode: str, nats_server_module: Any, nc: NatsClient
) -> None:
    tag = uuid.uuid4().hex[:8]
    stream, subject = f"COMPAT{tag}", f"compat{tag}.ev"
    bus_nc = await _client.connect(nats_server_module.url)
    try:
        assert type(bus_nc) is _client.Client
        js = bus_nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject])
        # A plain nats-py connection watches the same subject: what it parses is the
        # reference.
        plain = await nc.subscribe(subject)
        consumer = await js.subscribe(subject, ordered_consumer=True)
        msg_id = f"id-{tag}"
        ack = await _client.replies(bus_nc).jetstream_publish(
            subject, b"payload", {**SENT, "Nats-Msg-Id": msg_id}, 5.0
        )
        assert ack.stream == stream and ack.seq == 1 and not ack.duplicate
        seen_plain = await plain.next_msg(timeout=5.0)
        delivered = await consumer.next_msg(timeout=5.0)
        assert seen_plain.data == delivered.data == b"payload"
        assert seen_plain.headers == _received(msg_id)
        assert delivered.headers == _received(msg_id)
        # The same message id again: deduplicated, as nats-py reports it.
        again = await _client.replies(bus_nc).jetstream_publish(
            subject, b"payload", {**SENT, "Nats-Msg-Id": msg_id}, 5.0
        )
        assert again.seq == 1 and again.duplicate
        await js.delete_stream(stream)
    finally:
        await bus_nc.close()


async def test_a_connection_s_replies_go_with_it(nats_server_module: Any) -> None:
    conn = await _client.connect(nats_server_module.url)
    r = _client.replies(conn)
    assert _client.replies(conn) is r
    await r.ready()
    # Nothing stuck on the client but the direct-dispatch map of its fast path (which
    # holds the Replies the connection already keeps, and no reference back).
    stuck = [k for k in vars(conn) if "meshkit" in k]
    assert stuck == (["_meshkit_direct"] if nats_compat.FAST_PATHS["direct_dispatch"] else [])
    ref = weakref.ref(conn)
    await conn.close()
    del conn, r
    for _ in range(20):
        gc.collect()
        if ref() is None:
            break
        await asyncio.sleep(0.05)
    assert ref() is None  # its Replies did not keep the closed connection alive


# -- the event store's server version check -----------------------------------------------


async def test_the_event_store_reads_the_server_version_publicly(nc: NatsClient) -> None:
    reported = nc.connected_server_version
    assert _server_version(nc) == (reported.major, reported.minor) >= (2, 11)
    with pytest.raises(EventStoreError, match="nats-server version is unknown"):
        _server_version(NatsClient())  # never connected: no INFO yet


async def test_deliveries_and_stream_acks_skip_the_subscription_queue_on_the_fast_path(
    nats_mode: str, nats_server_module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from examples.shop.gen.shop.v1 import events_pb2 as ev
    from meshkit.saga import ConsumerSpec, EventBus, StreamSpec
    from meshkit.saga.consumer import PullConsumer

    queued: list[str] = []  # what reached nats-py's callbacks (its queue and task)
    consumer_cb, replies_cb = PullConsumer._on_msg, _client.Replies._on_msg

    async def consumer_on_msg(self: Any, msg: Any) -> None:
        queued.append(f"delivery {msg.subject}")
        await consumer_cb(self, msg)

    async def replies_on_msg(self: Any, msg: Any) -> None:
        queued.append(f"ack {msg.subject}")
        await replies_cb(self, msg)

    monkeypatch.setattr(PullConsumer, "_on_msg", consumer_on_msg)
    monkeypatch.setattr(_client.Replies, "_on_msg", replies_on_msg)
    bus = await EventBus.connect(nats_server_module.url, name="compat-direct", source="test")
    try:
        tag = uuid.uuid4().hex[:8]
        spec = StreamSpec(name=f"DIRECT{tag}", prefix=f"direct{tag}")
        await bus.ensure_stream(spec)
        for i in range(5):
            await bus.emit(spec, ev.OrderCreated(order_id=f"o{i}"))
        got: list[str] = []

        async def handle(msgs: list[Any]) -> None:
            got.extend(ev.OrderCreated.FromString(m.data).order_id for m in msgs)
            for m in msgs:
                await m.ack()

        settings = ConsumerSpec(ack_wait=5.0, idle_heartbeat=0.2, pull_expires=5.0)
        consumer = await bus.consumer(spec, "direct", spec=settings, batch_handler=handle).start()
        await eventually(lambda: len(got) == 5)
        await consumer.stop()
        assert sorted(got) == [f"o{i}" for i in range(5)]
        if nats_mode == "fast":
            assert queued == []  # every delivery and every stream ack went direct
            # A stopped consumer is no longer dispatched to (nor kept by the client).
            left = list((bus.nc._meshkit_direct or {}).values())
            assert left == [_client.replies(bus.nc)._dispatch]  # the stream acks' only
        else:
            assert sum(q.startswith("delivery") for q in queued) >= 5
            assert sum(q.startswith("ack") for q in queued) == 5
    finally:
        await bus.close()
