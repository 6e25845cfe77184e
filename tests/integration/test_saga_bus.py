"""The event bus against a real nats-server: streams, dedupe, pull consumers, restarts, drain."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from examples.shop.gen.shop.v1 import events_pb2 as ev
from meshkit.nats import NatsServer
from meshkit.saga import ConsumerSpec, Envelope, EventBus, StreamSpec

pytestmark = pytest.mark.integration

FAST = ConsumerSpec(
    ack_wait=5.0, nak_backoff=(0.05,), idle_heartbeat=0.2, pull_expires=5.0, max_in_flight=32
)


def _stream(storage: str = "file") -> StreamSpec:
    tag = uuid.uuid4().hex[:8]
    return StreamSpec(name=f"T{tag}", prefix=f"t{tag}", storage=storage)  # type: ignore[arg-type]


@pytest.fixture
async def bus(nats_server_module: NatsServer) -> AsyncIterator[EventBus]:
    b = await EventBus.connect(nats_server_module.url, name="test", source="test")
    yield b
    await b.close()


async def _wait(pred: Any, within: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + within
    while not pred():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_ensure_stream_is_idempotent_and_updates(bus: EventBus) -> None:
    spec = _stream()
    await bus.ensure_stream(spec)
    await bus.ensure_stream(spec)
    info = await bus.js.stream_info(spec.name)
    assert info.config.subjects == [f"{spec.prefix}.>"]
    assert info.config.duplicate_window == 120.0
    changed = StreamSpec(name=spec.name, prefix=spec.prefix, duplicate_window=30.0)
    await bus.ensure_stream(changed)
    assert (await bus.js.stream_info(spec.name)).config.duplicate_window == 30.0


async def test_publishing_one_event_id_twice_stores_it_once(bus: EventBus) -> None:
    spec = _stream()
    await bus.ensure_stream(spec)
    event = ev.OrderCreated(order_id="o1")
    env = Envelope.new(event, saga_type="order")
    first = await bus.publish(spec, event, env)
    again = await bus.publish(spec, event, env)
    assert again.duplicate is True and again.seq == first.seq
    other = await bus.emit(spec, ev.OrderCreated(order_id="o2"))
    assert other.saga_id == other.event_id
    assert (await bus.js.stream_info(spec.name)).state.messages == 2


async def test_consumer_delivers_with_headers_and_acks(bus: EventBus) -> None:
    spec = _stream()
    await bus.ensure_stream(spec)
    got: list[Any] = []

    async def handle(msg: Any) -> None:
        got.append((Envelope.from_headers(msg.headers), ev.OrderCreated.FromString(msg.data)))
        await msg.ack()

    consumer = await bus.consumer(
        spec, "c1", handle, filter_subjects=[spec.subject_for(ev.OrderCreated)], spec=FAST
    ).start()
    sent = [
        await bus.emit(spec, ev.OrderCreated(order_id=f"o{i}"), saga_type="order")
        for i in range(20)
    ]
    await bus.emit(spec, ev.OrderCompleted(order_id="not for us"))
    await _wait(lambda: len(got) == 20)
    assert {e.event_id for e, _ in got} == {s.event_id for s in sent}
    assert all(e.saga_type == "order" and e.source == "test" for e, _ in got)
    assert {m.order_id for _, m in got} == {f"o{i}" for i in range(20)}
    await _wait(lambda: consumer.stats.handled == 20)
    for _ in range(100):
        info = await bus.js.consumer_info(spec.name, "c1")
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.02)
    assert info.num_ack_pending == 0 and info.num_pending == 0
    await consumer.stop()


async def test_handler_error_naks_and_the_message_comes_back(bus: EventBus) -> None:
    spec = _stream()
    await bus.ensure_stream(spec)
    deliveries: list[int] = []

    async def flaky(msg: Any) -> None:
        deliveries.append(msg.metadata.num_delivered)
        if len(deliveries) < 3:
            raise RuntimeError("transient")
        await msg.ack()

    consumer = await bus.consumer(spec, "flaky", flaky, spec=FAST).start()
    await bus.emit(spec, ev.OrderCreated(order_id="o"))
    await _wait(lambda: consumer.stats.handled == 1)
    assert deliveries == [1, 2, 3]
    assert consumer.stats.errors == 2
    await consumer.stop()


async def test_stop_drains_in_flight_work(bus: EventBus) -> None:
    spec = _stream()
    await bus.ensure_stream(spec)
    started = asyncio.Event()
    finished: list[str] = []

    async def slow(msg: Any) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(msg.headers["Nats-Msg-Id"])
        await msg.ack()

    consumer = await bus.consumer(spec, "slow", slow, spec=FAST).start()
    env = await bus.emit(spec, ev.OrderCreated(order_id="o"))
    await asyncio.wait_for(started.wait(), 10)
    await consumer.stop()
    assert finished == [env.event_id]  # stop() waited for the handler
    for _ in range(100):  # the server applies acks asynchronously
        info = await bus.js.consumer_info(spec.name, "slow")
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.02)
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


@pytest.mark.parametrize("graceful", [True, False], ids=["sigterm", "sigkill"])
async def test_consumer_keeps_consuming_across_a_server_restart(graceful: bool) -> None:
    spec = _stream()
    async with NatsServer() as server:
        bus = await EventBus.connect(server.url, name="restart", publish_retry=20.0)
        got: set[str] = set()

        async def handle(msg: Any) -> None:
            got.add(ev.OrderCreated.FromString(msg.data).order_id)
            await msg.ack()

        await bus.ensure_stream(spec)
        consumer = await bus.consumer(spec, "survivor", handle, spec=FAST).start()
        for i in range(5):
            await bus.emit(spec, ev.OrderCreated(order_id=f"before-{i}"))
        await _wait(lambda: len(got) == 5)
        await asyncio.to_thread(server.restart, graceful=graceful)
        # publish retries until the client has reconnected
        for i in range(5):
            await bus.emit(spec, ev.OrderCreated(order_id=f"after-{i}"))
        await _wait(lambda: len(got) == 10, within=30)
        assert got == {f"before-{i}" for i in range(5)} | {f"after-{i}" for i in range(5)}
        # and it keeps going after an idle stretch longer than the heartbeat watchdog
        await asyncio.sleep(1.0)
        await bus.emit(spec, ev.OrderCreated(order_id="later"))
        await _wait(lambda: "later" in got, within=15)
        assert consumer.stats.recoveries >= 1  # it re-issued its pulls after the reconnect
        await bus.close()


async def test_key_value_bucket_is_created_once(bus: EventBus) -> None:
    name = f"kv_{uuid.uuid4().hex[:8]}"
    kv = await bus.key_value(name)
    await kv.put("a", b"1")
    again = await bus.key_value(name)
    assert (await again.get("a")).value == b"1"


async def test_a_memory_stream_lost_in_a_restart_is_declared_again() -> None:
    spec = _stream(storage="memory")
    async with NatsServer() as server:
        bus = await EventBus.connect(server.url, name="memory", publish_retry=20.0)
        got: set[str] = set()

        async def handle(msg: Any) -> None:
            got.add(ev.OrderCreated.FromString(msg.data).order_id)
            await msg.ack()

        await bus.ensure_stream(spec)
        consumer = await bus.consumer(spec, "phoenix", handle, spec=FAST).start()
        await bus.emit(spec, ev.OrderCreated(order_id="before"))
        await _wait(lambda: got == {"before"})
        await asyncio.to_thread(server.restart)  # memory storage: stream and consumer are gone
        await _wait(lambda: consumer.stats.recoveries >= 1, within=15)
        for _ in range(300):  # until the consumer has declared the stream again
            try:
                await bus.js.stream_info(spec.name)
                break
            except Exception:
                await asyncio.sleep(0.05)
        await bus.emit(spec, ev.OrderCreated(order_id="after"))
        await _wait(lambda: "after" in got, within=15)
        await bus.close()


async def test_a_failed_batch_comes_back_and_each_message_is_handled_once(
    bus: EventBus,
) -> None:
    """A batch handler that raises gets every message of that batch again.

    (How many messages the first batch holds depends on how the server's writes
    reach the socket; that a batch takes everything that arrived together is
    shown deterministically by the gated tests below.)"""
    spec = _stream()
    await bus.ensure_stream(spec)
    for i in range(20):
        await bus.emit(spec, ev.OrderCreated(order_id=f"o{i}"))
    batches: list[list[str]] = []
    failed: list[list[str]] = []

    async def handle(msgs: list[Any]) -> None:
        ids = [ev.OrderCreated.FromString(m.data).order_id for m in msgs]
        if not failed:  # the first batch fails as a whole: each message comes back
            failed.append(ids)
            raise RuntimeError("boom")
        batches.append(ids)
        for m in msgs:
            await m.ack()

    consumer = await bus.consumer(spec, "batched", spec=FAST, batch_handler=handle).start()
    await _wait(lambda: sum(map(len, batches)) >= 20)
    await consumer.stop()
    got = [o for b in batches for o in b]
    assert sorted(got) == sorted(f"o{i}" for i in range(20))  # each once, none lost
    assert len(got) == 20
    assert failed[0] and all(got.count(o) == 1 for o in failed[0])
    assert consumer.stats.errors == 1 and "boom" in consumer.stats.last_error


async def _gated_batches(
    bus: EventBus, overlap: float
) -> tuple[Any, list[list[str]], asyncio.Event, list[int]]:
    """A batch consumer whose first batch waits for a gate; the batches it ran and the
    most batches it ever ran at once."""
    spec = _stream()
    await bus.ensure_stream(spec)
    batches: list[list[str]] = []
    gate = asyncio.Event()
    running = [0, 0]  # now, most

    async def handle(msgs: list[Any]) -> None:
        running[0] += 1
        running[1] = max(running)
        try:
            ids = [ev.OrderCreated.FromString(m.data).order_id for m in msgs]
            batches.append(ids)
            if ids[0] == "first":
                await gate.wait()
            for m in msgs:
                await m.ack()
        finally:
            running[0] -= 1

    settings = dataclasses.replace(FAST, batch_overlap=overlap)
    consumer = await bus.consumer(spec, "gated", spec=settings, batch_handler=handle).start()
    await bus.emit(spec, ev.OrderCreated(order_id="first"))
    await _wait(lambda: len(batches) == 1)
    for i in range(10):
        await bus.emit(spec, ev.OrderCreated(order_id=f"o{i}"))
    await _wait(lambda: consumer.stats.delivered == 11)
    return consumer, batches, gate, running


async def test_a_batch_starts_when_the_one_before_it_ends_with_all_that_arrived_meanwhile(
    bus: EventBus,
) -> None:
    consumer, batches, gate, running = await _gated_batches(bus, overlap=30.0)
    await asyncio.sleep(0.2)  # the ten are here (delivered); none may start yet
    assert len(batches) == 1
    gate.set()
    await _wait(lambda: sum(map(len, batches)) == 11)
    await consumer.stop()
    assert batches == [["first"], [f"o{i}" for i in range(10)]]  # one batch, in order
    assert running[1] == 1 and consumer.stats.handled == 11


async def test_a_batch_running_past_batch_overlap_lets_the_next_start_beside_it(
    bus: EventBus,
) -> None:
    consumer, batches, gate, running = await _gated_batches(bus, overlap=0.05)
    # The first batch is still held: the others ran beside it.
    await _wait(lambda: sum(map(len, batches)) == 11)
    assert not gate.is_set() and running[1] == 2
    assert sorted(o for b in batches[1:] for o in b) == sorted(f"o{i}" for i in range(10))
    gate.set()
    await _wait(lambda: consumer.stats.handled == 11)
    await consumer.stop()


def test_a_consumer_takes_a_handler_or_a_batch_handler(bus: EventBus) -> None:
    async def one(msg: Any) -> None: ...

    async def many(msgs: list[Any]) -> None: ...

    with pytest.raises(ValueError, match="either a handler or a batch_handler"):
        bus.consumer(_stream(), "both", one, batch_handler=many)
    with pytest.raises(ValueError, match="either a handler or a batch_handler"):
        bus.consumer(_stream(), "neither")
