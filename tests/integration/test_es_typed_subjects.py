"""The event store with the event type in every subject, against a real nats-server:
the per-aggregate check across types, reads and ids, the saga deadline header,
EventStoreSource (the server copies chosen types into a saga stream) and the
append's PRODUCER span."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.js import api

from examples.shop.gen.shop.v1 import common_pb2
from examples.shop.gen.shop.v1 import events_pb2 as ev
from meshkit.saga import EventBus, EventStoreSource, StreamSpec, _telemetry
from meshkit.saga.envelope import MSG_ID, Envelope, now_ms, type_name
from meshkit.saga.eventstore import (
    AGGREGATE_ID,
    AGGREGATE_TYPE,
    AGGREGATE_VERSION,
    AggregateConflict,
    EventStore,
    EventStoreConfig,
    EventStoreError,
    Repository,
    Version,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

_n = itertools.count()
CREATED = type_name(ev.OrderCreated)
PAID = type_name(ev.PaymentCompleted)
RESERVED = type_name(ev.StockReserved)


def _config(**kw: Any) -> EventStoreConfig:
    tag = f"{next(_n)}x{uuid.uuid4().hex[:6]}"
    return EventStoreConfig(stream=f"ESTYPED{tag}", prefix=f"estyped{tag}", **kw)


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def created(customer: str = "c") -> ev.OrderCreated:
    return ev.OrderCreated(order_id="x", customer_id=customer)


def paid(n: int = 1) -> ev.PaymentCompleted:
    return ev.PaymentCompleted(order_id="x", amount=common_pb2.Money(amount_minor=n))


def reserved(sku: str = "book") -> ev.StockReserved:
    return ev.StockReserved(order_id="x", items=[common_pb2.LineItem(sku=sku, quantity=1)])


async def until(check: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    """Poll ``check`` until it returns something true, failing after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        result = await check()
        if result:
            return result
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture(params=[True, False], ids=["atomic", "chained"])
async def store(request: pytest.FixtureRequest, nc: Any) -> EventStore:
    s = EventStore(nc, _config(storage="memory", atomic=request.param))
    await s.ensure()
    return s


@pytest.fixture
async def rivals(nats_server_module: Any) -> AsyncIterator[Callable[[EventStore], Awaitable[Any]]]:
    """``await rivals(store)``: the same store on a connection of its own."""
    conns: list[Any] = []

    async def make(store: EventStore) -> EventStore:
        conn = await nats.connect(nats_server_module.url)
        conns.append(conn)
        return EventStore(conn, store.config)

    yield make
    for conn in conns:
        await conn.close()


async def _race(*writes: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run the writes at once; each outcome is its result or its AggregateConflict."""
    gate = asyncio.Event()

    async def one(write: Callable[[], Awaitable[Any]]) -> Any:
        await gate.wait()
        try:
            return await write()
        except AggregateConflict as exc:
            return exc

    tasks = [asyncio.create_task(one(w)) for w in writes]
    await asyncio.sleep(0)
    gate.set()
    return list(await asyncio.gather(*tasks))


# -- the per-aggregate check across event types ----------------------------------


async def test_a_stale_writer_of_another_type_gets_a_conflict(store: EventStore) -> None:
    agg = new_id()
    v1 = (await store.append("order", agg, [created()], expected=Version())).version
    await store.append("order", agg, [paid(1)], expected=v1)  # another type, another subject
    with pytest.raises(AggregateConflict) as err:
        await store.append("order", agg, [reserved()], expected=v1)  # a third type
    assert err.value.aggregate == store.aggregate_name("order", agg)
    assert (err.value.expected, err.value.actual) == (1, 2)
    assert f"aggregate {store.aggregate_name('order', agg)}: expected version 1" in str(err.value)
    # and a create on an aggregate that has events of another type is refused too
    with pytest.raises(AggregateConflict) as err2:
        await store.append("order", agg, [paid(2)], expected=Version())
    assert (err2.value.expected, err2.value.actual) == (0, 2)
    assert [e.event_type for e in await store.read("order", agg)] == [CREATED, PAID]


async def test_racing_writers_of_different_types_on_one_aggregate_exactly_one_wins(
    store: EventStore, rivals: Callable[[EventStore], Awaitable[EventStore]]
) -> None:
    agg = new_id()
    a, b, c = [await rivals(store) for _ in range(3)]
    await store.append("order", agg, [created()], expected=Version())
    kinds = [(a, paid), (b, reserved), (c, created)]
    for round_no in range(4):
        base = await store.version("order", agg)
        assert base.number == round_no + 1
        outcomes = await _race(
            *(
                lambda s=s, make=make, base=base: s.append("order", agg, [make()], expected=base)
                for s, make in kinds
            )
        )
        won = [o for o in outcomes if not isinstance(o, AggregateConflict)]
        lost = [o for o in outcomes if isinstance(o, AggregateConflict)]
        assert len(won) == 1 and len(lost) == 2, (round_no, outcomes)
        for conflict in lost:
            assert conflict.aggregate == store.aggregate_name("order", agg)
            assert (conflict.expected, conflict.actual) == (base.number, base.number + 1)
        assert won[0].version.number == base.number + 1
    events = await store.read("order", agg)
    assert [e.version for e in events] == [1, 2, 3, 4, 5]
    assert events[0].event_type == CREATED


async def test_racing_writers_on_two_aggregates_both_win(
    store: EventStore, rivals: Callable[[EventStore], Awaitable[EventStore]]
) -> None:
    one, two = new_id(), new_id()
    other = await rivals(store)
    v_one = (await store.append("order", one, [created()], expected=Version())).version
    v_two = (await store.append("order", two, [created()], expected=Version())).version
    for _ in range(3):
        outcomes = await _race(
            lambda v=v_one: store.append("order", one, [paid()], expected=v),
            lambda v=v_two: other.append("order", two, [reserved()], expected=v),
        )
        assert not any(isinstance(o, AggregateConflict) for o in outcomes), outcomes
        v_one, v_two = outcomes[0].version, outcomes[1].version
    assert [e.version for e in await store.read("order", one)] == [1, 2, 3, 4]
    assert [e.event_type for e in await store.read("order", two)] == [CREATED] + [RESERVED] * 3


async def test_racing_mixed_type_batches_on_one_aggregate_store_exactly_one_batch(
    store: EventStore, rivals: Callable[[EventStore], Awaitable[EventStore]]
) -> None:
    agg = new_id()
    other = await rivals(store)
    base = (await store.append("order", agg, [created("first")], expected=Version())).version
    outcomes = await _race(
        lambda: store.append("order", agg, [paid(1), reserved("a"), paid(2)], expected=base),
        lambda: other.append("order", agg, [reserved("b"), paid(3), created("z")], expected=base),
    )
    won = [o for o in outcomes if not isinstance(o, AggregateConflict)]
    lost = [o for o in outcomes if isinstance(o, AggregateConflict)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert won[0].atomic is store.config.atomic
    assert lost[0].expected == 1
    if store.config.atomic:
        assert lost[0].actual == 4  # the winner's batch was committed whole
    else:
        assert 2 <= lost[0].actual <= 4  # found while the winner's chain was being stored
    assert lost[0].aggregate == store.aggregate_name("order", agg)
    events = await store.read("order", agg)
    assert [e.version for e in events] == [1, 2, 3, 4]
    # exactly the winner's events after the first: none of the loser's
    assert [e.event_id for e in events[1:]] == [e.event_id for e in won[0].events]
    if store.config.atomic:
        assert [e.seq for e in events[1:]] == list(range(events[1].seq, events[1].seq + 3))
    # a stale mixed batch later is refused whole
    with pytest.raises(AggregateConflict) as err:
        await store.append("order", agg, [paid(9), created("late")], expected=base)
    assert (err.value.expected, err.value.actual) == (1, 4)
    assert len(await store.read("order", agg)) == 4


async def test_mixed_type_batches_on_two_aggregates_both_win(
    store: EventStore, rivals: Callable[[EventStore], Awaitable[EventStore]]
) -> None:
    one, two = new_id(), new_id()
    other = await rivals(store)
    outcomes = await _race(
        lambda: store.append("order", one, [created(), paid(1), reserved()], expected=Version()),
        lambda: other.append("order", two, [created(), reserved(), paid(2)], expected=Version()),
    )
    assert [o.version.number for o in outcomes] == [3, 3], outcomes
    assert [e.event_type for e in await store.read("order", one)] == [CREATED, PAID, RESERVED]
    assert [e.event_type for e in await store.read("order", two)] == [CREATED, RESERVED, PAID]


# -- reads and ids --------------------------------------------------------------


async def test_version_and_read_see_every_type_of_the_aggregate(store: EventStore) -> None:
    agg, neighbour = new_id(), new_id()
    r1 = await store.append("order", agg, [created("c1")], expected=Version())
    await store.append("order", neighbour, [paid(99)], expected=Version())
    r2 = await store.append("order", agg, [paid(5), reserved("pen")], expected=r1.version)
    r3 = await store.append("order", agg, [ev.OrderCompleted(order_id="x")], expected=r2.version)
    assert await store.version("order", agg) == r3.version == Version(4, r3.events[0].seq)
    events = await store.read("order", agg)
    assert [(e.version, e.event_type) for e in events] == [
        (1, CREATED),
        (2, PAID),
        (3, RESERVED),
        (4, "shop.v1.OrderCompleted"),
    ]
    assert [e.subject for e in events] == [
        store.event_subject("order", agg, e.event_type) for e in events
    ]
    assert all(e.aggregate_id == agg and e.aggregate_type == "order" for e in events)
    assert events[1].decode(ev.PaymentCompleted) == paid(5)
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    # from a version on, and up to one
    tail = await store.read("order", agg, after=r1.version)
    assert [e.version for e in tail] == [2, 3, 4]
    head = await store.read("order", agg, to_version=2)
    assert [e.event_type for e in head] == [CREATED, PAID]
    # the neighbour's event is not part of it
    assert [e.version for e in await store.read("order", neighbour)] == [1]
    assert (await store.version("order", neighbour)).number == 1
    assert await store.version("order", new_id()) == Version()


async def test_aggregate_ids_lists_the_ids_of_one_aggregate_type(nc: Any) -> None:
    store = EventStore(nc, _config(storage="memory"))
    await store.ensure()
    assert await store.aggregate_ids("order") == []
    for agg in ("o-b", "o-a", "o-c"):
        v = (await store.append("order", agg, [created()], expected=Version())).version
        await store.append("order", agg, [paid(), reserved()], expected=v)
    await store.append("orderline", "l-1", [created()], expected=Version())
    await store.append("payment", "p-1", [paid()], expected=Version())
    await store.append("payment", "o-z", [paid()], expected=Version())
    assert await store.aggregate_ids("order") == ["o-a", "o-b", "o-c"]
    assert await store.aggregate_ids("payment") == ["o-z", "p-1"]
    assert await store.aggregate_ids("orderline") == ["l-1"]
    assert await store.aggregate_ids("shipment") == []


# -- the saga deadline ------------------------------------------------------------


class Order:
    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        self.seen: list[str] = []

    def apply_created(self, e: ev.OrderCreated) -> None:
        self.seen.append("created")

    def apply_paid(self, e: ev.PaymentCompleted) -> None:
        self.seen.append("paid")


async def test_saga_deadline_is_stored_with_appended_events(nc: Any) -> None:
    store = EventStore(nc, _config(storage="memory"))
    await store.ensure()
    agg, deadline = new_id(), now_ms() + 60_000
    r = await store.append(
        "order", agg, [created(), paid()], expected=Version(), saga_deadline_ms=deadline
    )
    assert [e.envelope.saga_deadline_ms for e in r.events] == [deadline, deadline]
    await store.append("order", agg, [reserved()], expected=r.version)  # without one
    stored = await store.read("order", agg)
    assert [e.envelope.saga_deadline_ms for e in stored] == [deadline, deadline, None]
    raw = await store.js.get_msg(store.stream, stored[0].seq)
    assert raw.headers is not None and Envelope.from_headers(raw.headers).saga_deadline_ms == (
        deadline
    )


async def test_repository_execute_and_save_store_the_saga_deadline(nc: Any) -> None:
    store = EventStore(nc, _config(storage="memory"))
    await store.ensure()
    orders = Repository(store, "order", Order)
    agg, first, second = new_id(), now_ms() + 30_000, now_ms() + 90_000
    loaded = await orders.execute(
        agg, lambda o: [created()], expect_new=True, saga_id="s-1", saga_deadline_ms=first
    )
    assert loaded.state.seen == ["created"]
    loaded = await orders.execute(agg, lambda o: [paid()], saga_deadline_ms=second)
    await orders.save(loaded, [paid(2)])
    stored = await store.read("order", agg)
    assert [(e.event_type, e.envelope.saga_deadline_ms) for e in stored] == [
        (CREATED, first),
        (PAID, second),
        (PAID, None),
    ]
    assert stored[0].envelope.saga_id == "s-1"


# -- EventStoreSource: the server copies a store's events into a saga stream --------


@pytest.fixture
async def bus(nats_server_module: Any) -> AsyncIterator[EventBus]:
    b = await EventBus.connect(nats_server_module.url, name="es-typed")
    yield b
    await b.close()


def _spec(cfg: EventStoreConfig, *types: Any, name: str = "") -> StreamSpec:
    tag = name or f"BUS{next(_n)}x{uuid.uuid4().hex[:6]}"
    return StreamSpec(
        name=tag,
        prefix=tag.lower() + ".events",
        storage="memory",
        sources=(EventStoreSource(cfg, types),),
    )


async def _messages(bus: EventBus, stream: str) -> list[Any]:
    info = await bus.js.stream_info(stream)
    if not info.state.messages:
        return []
    return [
        await bus.js.get_msg(stream, seq)
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


async def _wait_for(bus: EventBus, stream: str, n: int) -> list[Any]:
    async def enough() -> list[Any] | None:
        info = await bus.js.stream_info(stream)
        return await _messages(bus, stream) if info.state.messages >= n else None

    got: list[Any] = await until(enough)
    return got


async def test_with_no_types_listed_every_type_lands_on_its_own_subject(bus: EventBus) -> None:
    """The one transform for every type turns a type's token back into its name."""
    cfg = _config(storage="memory")
    spec = _spec(cfg)
    await bus.ensure_stream(spec)
    store = EventStore(bus.nc, cfg, source="order")
    agg = new_id()
    await store.append("order", agg, [created(), paid()], expected=Version())
    env = Envelope.new("Flat", source="other")
    await bus.js.publish(
        store.event_subject("order", agg, "Flat"),
        b"",
        headers={**env.to_headers(), AGGREGATE_TYPE: "order", AGGREGATE_ID: agg},
    )
    copied = await _wait_for(bus, spec.name, 3)
    assert [m.subject for m in copied] == [
        spec.subject_for(CREATED),
        spec.subject_for(PAID),
        spec.subject_for("Flat"),
    ]


async def test_listed_types_are_copied_with_their_headers_in_order(bus: EventBus) -> None:
    cfg = _config(storage="memory")
    spec = _spec(cfg, ev.OrderCreated)
    with pytest.raises(nats.js.errors.NotFoundError):
        await bus.js.stream_info(cfg.stream)
    await bus.ensure_stream(spec)
    # the store's stream was created first, on the store's subjects
    info = await bus.js.stream_info(cfg.stream)
    assert info.config.subjects == [f"{cfg.subject_prefix}.>"]
    (source,) = (await bus.js.stream_info(spec.name)).config.sources or []
    assert source.name == cfg.stream

    store = EventStore(bus.nc, cfg, source="order")
    one, two = new_id(), new_id()
    r1 = await store.append("order", one, [created("c1")], expected=Version(), saga_id="saga-1")
    r2 = await store.append("order", one, [paid(7)], expected=r1.version, saga_id="saga-1")
    r3 = await store.append("order", two, [created("c2")], expected=Version(), saga_id="saga-2")
    # the sentinel: after the unlisted PaymentCompleted in the store, so once it is
    # copied the server has already passed over that one
    r4 = await store.append(
        "order", one, [created("c3"), paid(8), created("c4")], expected=r2.version, saga_id="saga-1"
    )
    copied = await _wait_for(bus, spec.name, 4)
    wanted = [r1.events[0], r3.events[0], r4.events[0], r4.events[2]]
    assert len(copied) == 4
    assert [m.subject for m in copied] == [spec.subject_for(ev.OrderCreated)] * 4
    for msg, stored in zip(copied, wanted, strict=True):
        h = msg.headers or {}
        env = Envelope.from_headers(h)
        assert h[MSG_ID] == stored.event_id == env.event_id
        assert env.event_type == CREATED
        assert env.saga_id == stored.envelope.saga_id
        assert env.source == "order"
        assert h[AGGREGATE_TYPE] == "order"
        assert (h[AGGREGATE_ID], int(h[AGGREGATE_VERSION])) == (
            stored.aggregate_id,
            stored.version,
        )
        assert msg.data == stored.data
    # one aggregate's events in their order: versions 1, 3, 5 of ``one``
    assert [
        int((m.headers or {})[AGGREGATE_VERSION])
        for m in copied
        if (m.headers or {})[AGGREGATE_ID] == one
    ] == [1, 3, 5]
    assert [ev.OrderCreated.FromString(m.data).customer_id for m in copied] == [
        "c1",
        "c2",
        "c3",
        "c4",
    ]
    # the unlisted type never arrived
    assert not any(PAID in m.subject for m in copied)
    assert (await bus.js.stream_info(spec.name)).state.messages == 4


async def test_no_types_copies_every_type(bus: EventBus) -> None:
    cfg = _config(storage="memory")
    tag = f"BUSALL{next(_n)}x{uuid.uuid4().hex[:6]}"
    spec = StreamSpec.from_dict(
        {
            "name": tag,
            "prefix": f"{tag.lower()}.ev",
            "storage": "memory",
            "sources": [{"stream": cfg.stream, "prefix": cfg.prefix}],
        }
    )
    await bus.ensure_stream(spec)
    store = EventStore(bus.nc, cfg)
    agg = new_id()
    r = await store.append("order", agg, [created(), paid(), reserved()], expected=Version())
    copied = await _wait_for(bus, spec.name, 3)
    assert [m.subject for m in copied] == [spec.subject_for(t) for t in (CREATED, PAID, RESERVED)]
    assert [(m.headers or {})[MSG_ID] for m in copied] == [e.event_id for e in r.events]


class _Counting:
    """Counts the bus's stream creates and updates."""

    def __init__(self, bus: EventBus, monkeypatch: pytest.MonkeyPatch) -> None:
        self.adds = 0
        self.updates: list[api.StreamConfig] = []
        add, update = bus.js.add_stream, bus.js.update_stream

        async def counted_add(config: Any = None, **kw: Any) -> Any:
            self.adds += 1
            return await add(config, **kw)

        async def counted_update(config: Any = None, **kw: Any) -> Any:
            self.updates.append(config)
            return await update(config, **kw)

        monkeypatch.setattr(bus.js, "add_stream", counted_add)
        monkeypatch.setattr(bus.js, "update_stream", counted_update)


def _transforms(info: Any) -> list[tuple[str, list[tuple[str, str]]]]:
    return [
        (s.name, [(t.src, t.dest) for t in s.subject_transforms or []])
        for s in info.config.sources or []
    ]


async def test_ensure_stream_twice_is_a_no_op_and_new_types_update_the_sources(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(storage="memory")
    counting = _Counting(bus, monkeypatch)
    spec = _spec(cfg, ev.OrderCreated)
    await bus.ensure_stream(spec)
    assert (counting.adds, counting.updates) == (1, [])
    before = await bus.js.stream_info(spec.name)
    assert _transforms(before) == [
        (
            cfg.stream,
            [(f"{cfg.subject_prefix}.shop:v1:OrderCreated.*.*", spec.subject_for(CREATED))],
        )
    ]
    store_before = await bus.js.stream_info(cfg.stream)

    await bus.ensure_stream(spec)
    await bus.ensure_stream(spec)
    assert (counting.adds, counting.updates) == (1, [])
    again = await bus.js.stream_info(spec.name)
    assert again.config == before.config
    assert (await bus.js.stream_info(cfg.stream)).config == store_before.config

    store = EventStore(bus.nc, cfg)
    agg = new_id()
    v = (await store.append("order", agg, [created("a")], expected=Version())).version
    await _wait_for(bus, spec.name, 1)

    wider = _spec(cfg, ev.OrderCreated, ev.PaymentCompleted, name=spec.name)
    await bus.ensure_stream(wider)
    assert counting.adds == 1 and len(counting.updates) == 1
    after = await bus.js.stream_info(spec.name)
    assert _transforms(after) == [
        (
            cfg.stream,
            [
                (f"{cfg.subject_prefix}.shop:v1:OrderCreated.*.*", spec.subject_for(CREATED)),
                (f"{cfg.subject_prefix}.shop:v1:PaymentCompleted.*.*", spec.subject_for(PAID)),
            ],
        )
    ]
    await bus.ensure_stream(wider)
    assert len(counting.updates) == 1  # the same again: no update

    r = await store.append("order", agg, [paid(3)], expected=v)

    async def paid_copied() -> bool:
        return any(
            (m.headers or {}).get(MSG_ID) == r.events[0].event_id
            for m in await _messages(bus, spec.name)
        )

    await until(paid_copied)
    copied = await _messages(bus, spec.name)
    mine = [m for m in copied if (m.headers or {}).get(MSG_ID) == r.events[0].event_id]
    assert [m.subject for m in mine] == [spec.subject_for(PAID)]


async def test_changing_the_types_copies_nothing_twice_and_nothing_is_skipped(
    bus: EventBus,
) -> None:
    """nats-server re-copies a changed source from the origin's first message; the
    bus resumes it after the last copied one instead. A duplicate window far shorter
    than the test means dedupe cannot hide a second copy."""
    cfg = _config(storage="memory")
    narrow = dataclasses.replace(_spec(cfg, ev.OrderCreated), duplicate_window=0.1)
    await bus.ensure_stream(narrow)
    store = EventStore(bus.nc, cfg)
    firsts = []
    for _ in range(3):
        agg = new_id()
        r = await store.append("order", agg, [created("a"), paid(1)], expected=Version())
        firsts.append(r)
    await _wait_for(bus, narrow.name, 3)  # the three OrderCreated, no PaymentCompleted
    await asyncio.sleep(0.5)  # well past the duplicate window and the server's purge of it

    wider = dataclasses.replace(
        _spec(cfg, ev.OrderCreated, ev.PaymentCompleted, name=narrow.name),
        duplicate_window=0.1,
    )
    await bus.ensure_stream(wider)
    info = await bus.js.stream_info(narrow.name)
    assert [s.opt_start_seq for s in info.config.sources or []] == [firsts[-1].version.seq]
    later = await store.append("order", new_id(), [created("b"), paid(2)], expected=Version())
    await _wait_for(bus, narrow.name, 6)
    await asyncio.sleep(0.2)  # time for a re-copy to show, if there were one
    copied = await _messages(bus, narrow.name)
    ids = [(m.headers or {}).get(MSG_ID) for m in copied]
    # Each earlier OrderCreated once. The copy goes on from where it stood: the one
    # PaymentCompleted stored after the last copied event is copied, earlier ones not;
    # then both events appended after the change.
    assert ids == [
        *(r.events[0].event_id for r in firsts),
        firsts[-1].events[1].event_id,
        *(e.event_id for e in later.events),
    ]
    assert [m.subject for m in copied[-2:]] == [
        narrow.subject_for(CREATED),
        narrow.subject_for(PAID),
    ]


# -- tracing --------------------------------------------------------------------


@pytest.fixture
def sdk_spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An OpenTelemetry SDK for this test only: the API's global provider and the
    saga tracer are both swapped (and put back), whatever another test installed."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    monkeypatch.setattr(_telemetry, "_tracer", provider.get_tracer("meshkit.saga"))
    assert _telemetry.tracing()
    yield provider, exporter
    provider.shutdown()


def _traceparent(span: Any) -> str:
    ctx = span.get_span_context() if hasattr(span, "get_span_context") else span.context
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


async def test_an_append_is_one_producer_span_whose_context_the_events_carry(
    nc: Any, sdk_spans: Any
) -> None:
    from opentelemetry.trace import SpanKind

    provider, exporter = sdk_spans
    store = EventStore(nc, _config(storage="memory"))
    await store.ensure()
    agg = new_id()
    with provider.get_tracer("test").start_as_current_span("command") as command:
        r1 = await store.append("order", agg, [created()], expected=Version(), saga_id="s-9")
    (span,) = [s for s in exporter.get_finished_spans() if s.name != "command"]
    assert span.kind is SpanKind.PRODUCER
    assert span.name.startswith("send ") and span.name.endswith(".shop:v1:OrderCreated.order.{id}")
    assert span.parent is not None and span.parent.span_id == command.get_span_context().span_id
    assert span.context.trace_id == command.get_span_context().trace_id
    attrs = dict(span.attributes or {})
    assert attrs["messaging.system"] == "nats"
    assert attrs["messaging.destination.name"] == r1.events[0].subject
    assert attrs["messaging.destination.template"].endswith(".shop:v1:OrderCreated.order.{id}")
    assert attrs["messaging.message.id"] == r1.events[0].event_id
    assert attrs["messaging.message.conversation_id"] == "s-9"
    assert "messaging.batch.message_count" not in attrs
    (stored,) = await store.read("order", agg)
    assert stored.envelope.traceparent == _traceparent(span)

    # several events of several types: still one span, counting them
    exporter.clear()
    r2 = await store.append("order", agg, [paid(), reserved(), paid()], expected=r1.version)
    (batch,) = exporter.get_finished_spans()
    assert batch.kind is SpanKind.PRODUCER and batch.parent is None
    assert batch.name.endswith(".*.order.{id}")
    assert dict(batch.attributes or {})["messaging.batch.message_count"] == 3
    stored_batch = (await store.read("order", agg))[1:]
    assert [e.event_id for e in stored_batch] == [e.event_id for e in r2.events]
    assert {e.envelope.traceparent for e in stored_batch} == {_traceparent(batch)}


async def test_the_append_span_is_named_by_its_low_cardinality_template(
    nc: Any, sdk_spans: Any
) -> None:
    _, exporter = sdk_spans
    store = EventStore(nc, _config(storage="memory"))
    await store.ensure()
    agg = new_id()
    head = store.config.subject_prefix
    r = await store.append("order", agg, [created()], expected=Version())
    await store.append("order", agg, [paid(), reserved()], expected=r.version)
    single, mixed = exporter.get_finished_spans()
    assert dict(single.attributes or {})["messaging.destination.template"] == (
        f"{head}.shop:v1:OrderCreated.order.{{id}}"
    )
    assert single.name == f"send {head}.shop:v1:OrderCreated.order.{{id}}"
    assert mixed.name == f"send {head}.*.order.{{id}}"


async def test_without_an_sdk_the_events_carry_the_callers_trace(
    nc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(_telemetry, "_installed", False)  # forget a provider seen before
    assert not _telemetry.tracing()
    store = EventStore(nc, _config(storage="memory"))
    await store.ensure()
    agg = new_id()
    caller = NonRecordingSpan(
        SpanContext(
            trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
            span_id=0x00F067AA0BA902B7,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    )
    with trace.use_span(caller):
        r = await store.append("order", agg, [created(), paid()], expected=Version())
    await store.append("order", agg, [reserved()], expected=r.version)  # no span around it
    want = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert [e.envelope.traceparent for e in r.events] == [want, want]
    assert [e.envelope.traceparent for e in await store.read("order", agg)] == [want, want, ""]


# -- earlier layouts ----------------------------------------------------------------


async def _stream_of_an_earlier_version(nc: Any, cfg: EventStoreConfig) -> None:
    """The store's stream as meshkit made it before the layout was recorded."""
    await nc.jetstream().add_stream(
        name=cfg.stream,
        subjects=[f"{cfg.subject_prefix}.>"],
        storage=api.StorageType.MEMORY,
        allow_direct=True,
    )


async def _old_layout_events(
    nc: Any, cfg: EventStoreConfig, agg: str, types: list[str], layout: str
) -> list[tuple[str, dict[str, str], bytes]]:
    """Events of one aggregate as the store wrote them before: on
    ``<prefix>.order.<id>`` (``untyped``) or ``<prefix>.order.<id>.<event type>``
    (``aggregate first``)."""
    out = []
    for i, etype in enumerate(types):
        env = Envelope.new(etype, saga_id=agg, source="old")
        headers = {
            **env.to_headers(),
            "Meshkit-Event-Id": env.event_id,  # written then along with Nats-Msg-Id
            AGGREGATE_TYPE: "order",
            AGGREGATE_ID: agg,
            AGGREGATE_VERSION: str(i + 1),
        }
        body = (created() if i == 0 else paid(i)).SerializeToString()
        subject = f"{cfg.subject_prefix}.order.{agg}"
        if layout == "aggregate first":
            subject += f".{etype}"
        await nc.jetstream().publish(subject, body, headers=headers)
        out.append((env.event_id, headers, body))
    return out


async def test_a_store_with_events_in_earlier_layouts_is_refused_with_the_way_out(
    nc: Any,
) -> None:
    cfg = _config(storage="memory")
    await _stream_of_an_earlier_version(nc, cfg)
    a, b, c = new_id(), new_id(), new_id()
    await _old_layout_events(nc, cfg, a, [CREATED, PAID, PAID], "untyped")
    await _old_layout_events(nc, cfg, b, [CREATED, PAID], "aggregate first")
    # A one-token type: the old subject has as many tokens as a typed one.
    await _old_layout_events(nc, cfg, c, ["Flat"], "aggregate first")
    with pytest.raises(EventStoreError) as err:
        await EventStore(nc, cfg).ensure()
    text = str(err.value)
    # Both cheap lookups found some: the one-token type's subject is not read.
    assert f"stream {cfg.stream} holds events of this store in an earlier layout" in text
    assert "(5 on 3 subjects found, e.g." in text
    assert f"{cfg.subject_prefix}.order." in text and "upgrade_layout()" in text
    info = await nc.jetstream().stream_info(cfg.stream)
    assert f"meshkit.eventstore.{cfg.subject_prefix}" not in (info.config.metadata or {})


async def test_old_events_of_a_one_token_type_alone_are_told_apart_by_their_headers(
    nc: Any,
) -> None:
    """``<prefix>.order.<id>.Flat`` has as many tokens as a typed subject: the
    headers say it is the aggregate-first layout."""
    cfg = _config(storage="memory")
    await _stream_of_an_earlier_version(nc, cfg)
    agg = new_id()
    await _old_layout_events(nc, cfg, agg, ["Flat"], "aggregate first")
    with pytest.raises(EventStoreError) as err:
        await EventStore(nc, cfg).ensure()
    assert f"(1 on 1 subjects found, e.g. {cfg.subject_prefix}.order.{agg}.Flat:" in str(err.value)


async def test_an_unrecorded_stream_of_typed_events_is_taken_and_recorded(nc: Any) -> None:
    """A stream someone else made, holding only typed events (a one-token type among
    them), is this store's layout: ensure records it instead of refusing."""
    cfg = _config(storage="memory")
    await _stream_of_an_earlier_version(nc, cfg)
    store = EventStore(nc, cfg)
    agg = new_id()
    await store.append("order", agg, [created()], expected=Version())
    env = Envelope.new("Flat", source="other")
    await nc.jetstream().publish(
        store.event_subject("order", agg, "Flat"),
        b"",
        headers={**env.to_headers(), AGGREGATE_TYPE: "order", AGGREGATE_ID: agg},
    )
    await store.ensure()
    info = await nc.jetstream().stream_info(cfg.stream)
    assert (info.config.metadata or {})[f"meshkit.eventstore.{cfg.subject_prefix}"] == (
        "type-first"
    )
    assert [e.event_type for e in await store.read("order", agg)] == [CREATED, "Flat"]


async def test_upgrade_layout_moves_each_aggregate_in_order_and_a_rerun_adds_nothing(
    nc: Any,
) -> None:
    cfg = _config(storage="memory")
    await _stream_of_an_earlier_version(nc, cfg)
    store = EventStore(nc, cfg)
    a, b, c = new_id(), new_id(), new_id()
    old_a = await _old_layout_events(nc, cfg, a, [CREATED, PAID, PAID], "untyped")
    old_b = await _old_layout_events(nc, cfg, b, [CREATED, PAID], "aggregate first")
    old_c = await _old_layout_events(nc, cfg, c, ["Flat", PAID], "aggregate first")
    # A first run that stopped after moving a's first event.
    _, headers, body = old_a[0]
    moved = {k: v for k, v in headers.items() if not k.startswith("Nats-")}
    await nc.jetstream().publish(store.event_subject("order", a, CREATED), body, headers=moved)
    assert await store.upgrade_layout() == 6  # a's 2nd and 3rd, b's and c's
    assert await store.upgrade_layout() == 0  # recorded: nothing to do
    await EventStore(nc, cfg).ensure()  # no longer refused
    for agg, old in ((a, old_a), (b, old_b), (c, old_c)):
        read = await store.read("order", agg)
        assert [e.event_id for e in read] == [i for i, _, _ in old]  # a's first once
        assert [e.version for e in read] == list(range(1, len(old) + 1))
        assert [e.subject for e in read] == [
            store.event_subject("order", agg, e.event_type) for e in read
        ]
    # Nothing is left on the old subjects.
    subjects = await store._subjects(f"{cfg.subject_prefix}.>")
    assert sorted(subjects) == sorted(
        store.event_subject("order", agg, t)
        for agg, types in ((a, [CREATED, PAID]), (b, [CREATED, PAID]), (c, ["Flat", PAID]))
        for t in types
    )
    assert subjects[store.event_subject("order", a, PAID)] == 2
    info = await nc.jetstream().stream_info(cfg.stream)
    assert (info.config.metadata or {})[f"meshkit.eventstore.{cfg.subject_prefix}"] == (
        "type-first"
    )
    # A moved aggregate takes appends at its moved version.
    r = await store.append("order", b, [paid(9)], expected=await store.version("order", b))
    assert r.version.number == 3
    assert await store.aggregate_ids("order") == sorted([a, b, c])


async def test_version_works_on_a_pedantic_connection(nats_server_module: Any) -> None:
    """A direct get of the last event by a wildcard filter puts the filter in the
    request's body: a pedantic server closes a connection that publishes on a
    subject with a wildcard."""
    from meshkit.saga import _client

    pedantic = await _client.connect(nats_server_module.url, pedantic=True)
    try:
        store = EventStore(pedantic, _config(storage="memory"))
        await store.ensure()
        agg = new_id()
        assert await store.version("order", agg) == Version()
        r = await store.append("order", agg, [created(), paid()], expected=Version())
        assert await store.version("order", agg) == r.version
        assert pedantic.is_connected
        assert [e.version for e in await store.read("order", agg)] == [1, 2]
    finally:
        await pedantic.close()
