"""A hosted event store (an event store kept in the saga stream) against a real
nats-server: participants consume its events where they were appended, each stored
once; a tracker follows them; a dead letter's replay goes to the saga subject of its
type and never into the aggregate."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from examples.shop.gen.shop.v1 import events_pb2 as ev
from meshkit.nats import NatsServer
from meshkit.saga import (
    ConsumerSpec,
    Context,
    EventBus,
    HostedStore,
    MemoryInbox,
    Participant,
    PermanentError,
    SagaDefinition,
    SagaTracker,
    StreamSpec,
    list_dead_letters,
    replay_dead_letters,
)
from meshkit.saga.envelope import Envelope, type_name
from meshkit.saga.eventstore import EventStore, EventStoreConfig, Version

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FAST = ConsumerSpec(
    ack_wait=5.0, max_deliver=3, nak_backoff=(0.05,), idle_heartbeat=0.2, pull_expires=5.0
)
CREATED = type_name(ev.OrderCreated)
SAGA = SagaDefinition.of("order", start=[ev.OrderCreated], completed=[ev.OrderCompleted])


@pytest.fixture
async def bus(nats_server_module: NatsServer) -> AsyncIterator[EventBus]:
    b = await EventBus.connect(nats_server_module.url, name="hosted", source="test")
    yield b
    await b.close()


def _spec() -> tuple[StreamSpec, EventStoreConfig]:
    tag = uuid.uuid4().hex[:8]
    store = EventStoreConfig(stream=f"H{tag}", prefix=f"h{tag}_orders", storage="memory")
    spec = StreamSpec(
        name=f"H{tag}",
        prefix=f"h{tag}.events",
        storage="memory",
        hosted_stores=(HostedStore(store, (ev.OrderCreated, ev.OrderCompleted)),),
    )
    return spec, store


async def _wait(pred: Any, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not pred():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.02)


async def _messages(bus: EventBus, stream: str) -> list[Any]:
    info = await bus.js.stream_info(stream)
    return [
        await bus.js.get_msg(stream, seq)
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


async def test_participants_consume_appended_events_stored_once(bus: EventBus) -> None:
    spec, cfg = _spec()
    await bus.ensure_stream(spec)
    info = await bus.js.stream_info(spec.name)
    assert info.config.subjects == [f"{spec.prefix}.>", f"{cfg.subject_prefix}.>"]
    assert info.config.allow_direct and not info.config.sources

    seen: list[tuple[str, str, str]] = []
    inventory = Participant("inventory", spec, consumer=FAST)

    @inventory.on(ev.OrderCreated, emits=[ev.StockReserved])
    async def reserve(event: ev.OrderCreated, ctx: Context) -> ev.StockReserved:
        seen.append((event.order_id, ctx.envelope.saga_id, ctx.envelope.source))
        return ev.StockReserved(order_id=event.order_id)

    order = Participant("order", spec, consumer=FAST)
    completed: list[str] = []

    @order.on(ev.StockReserved)
    async def done(event: ev.StockReserved, ctx: Context) -> None:
        completed.append(event.order_id)

    assert inventory.subjects() == [
        f"{spec.prefix}.{CREATED}",
        f"{cfg.subject_prefix}.shop:v1:OrderCreated.*.*",
    ]
    tracker = await SagaTracker(bus, spec, SAGA).start()
    inv = await inventory.start(bus, inbox=MemoryInbox())
    ord_ = await order.start(bus, inbox=MemoryInbox())
    store = EventStore(bus.nc, cfg, source="orders")
    try:
        appended = await store.append(
            "order",
            "o1",
            [ev.OrderCreated(order_id="o1")],
            expected=Version(),
            saga_id="saga-1",
            saga_type="order",
        )
        await _wait(lambda: completed == ["o1"])
        assert seen == [("o1", "saga-1", "orders")]
        # The tracker follows the store's subjects too: the saga it began is there.
        assert tracker.store is not None
        assert await tracker.wait_caught_up(within=10)
        status = await tracker.store.get("saga-1")
        assert status is not None and status.saga_type == "order"
        assert [s.event_type for s in status.steps] == [CREATED, type_name(ev.StockReserved)]
        # OrderCreated once, where the store put it; StockReserved on its saga subject.
        msgs = await _messages(bus, spec.name)
        assert [m.subject for m in msgs] == [
            appended.events[0].subject,
            spec.subject_for(ev.StockReserved),
        ]
        assert appended.events[0].subject == f"{cfg.subject_prefix}.shop:v1:OrderCreated.order.o1"
        assert "Nats-Stream-Source" not in (msgs[0].headers or {})
        loaded = await store.read("order", "o1")
        assert [e.version for e in loaded] == [1]
    finally:
        await inv.stop()
        await ord_.stop()
        await tracker.stop()


async def test_a_dead_letter_replays_on_its_saga_subject_not_into_the_aggregate(
    bus: EventBus,
) -> None:
    spec, cfg = _spec()
    await bus.ensure_stream(spec)
    handled: list[str] = []
    broken = True
    inventory = Participant("inventory", spec, consumer=FAST)

    @inventory.on(ev.OrderCreated)
    async def reserve(event: ev.OrderCreated, ctx: Context) -> None:
        if broken:
            raise PermanentError("stock service misconfigured")
        handled.append(ctx.event_id)

    running = await inventory.start(bus, inbox=MemoryInbox())
    store = EventStore(bus.nc, cfg, source="orders")
    try:
        result = await store.append(
            "order", "o2", [ev.OrderCreated(order_id="o2")], expected=Version(), saga_id="s2"
        )
        stored = result.events[0]
        await _wait(lambda: running.stats.dead_lettered == 1)
        (letter,) = await list_dead_letters(bus, stream=spec.name)
        assert letter.letter.subject == stored.subject
        assert letter.letter.replay_subject == spec.subject_for(ev.OrderCreated)
        assert letter.event_id == stored.event_id and letter.event_type == CREATED

        broken = False
        await replay_dead_letters(bus, seqs=[letter.seq])
        await _wait(lambda: handled == [stored.event_id])
        # The aggregate still has its one event; the replay is on the saga subject,
        # without the original append's expected-sequence condition.
        assert [e.version for e in await store.read("order", "o2")] == [1]
        replayed = (await _messages(bus, spec.name))[-1]
        assert replayed.subject == spec.subject_for(ev.OrderCreated)
        headers = replayed.headers or {}
        assert not [k for k in headers if k.startswith("Nats-Expected")]
        assert Envelope.from_headers(headers).event_id == stored.event_id
    finally:
        await running.stop()
