"""EventStore.on_append, Projector.offer and relay(follow=False) on a real nats-server:
a relay in the writing process takes appends from the offers instead of reading them,
still finds other writers' events by polling, forwards each event exactly once, and
publishes different aggregates concurrently but each aggregate's events in order."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from nats.js import api

from examples.shop.gen.shop.v1 import common_pb2, events_pb2
from meshkit.saga.eventstore import (
    AGGREGATE_ID,
    AGGREGATE_VERSION,
    EventStore,
    EventStoreConfig,
    StoredEvent,
    Version,
    read_batches,
)
from meshkit.saga.projections import Projector, Source, relay
from meshkit.saga.readmodels import MemoryReadModelStore

pytestmark = pytest.mark.integration

AGG = "order"
_n = itertools.count()


def paid(n: int) -> events_pb2.PaymentCompleted:
    return events_pb2.PaymentCompleted(order_id="x", amount=common_pb2.Money(amount_minor=n))


def new_id() -> str:
    return uuid.uuid4().hex[:12]


async def until(cond: Callable[[], bool], within: float = 2.0) -> None:
    """Poll ``cond`` until it holds, failing after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.005)


def _config(**kw: Any) -> EventStoreConfig:
    n = next(_n)
    return EventStoreConfig(stream=f"ESRELAY{n}", prefix=f"esrelay{n}", **kw)


@pytest.fixture
async def store(nc: Any) -> EventStore:
    s = EventStore(nc, _config())
    await s.ensure()
    return s


class Sink:
    """A relay's publish that records what it was handed."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []

    async def publish(self, ev: StoredEvent) -> None:
        self.events.append(ev)

    def ids(self) -> list[str]:
        return [e.event_id for e in self.events]


def spy_reads(projector: Projector) -> list[int]:
    """The sequence numbers of every event the projector got by reading the stream."""
    read: list[int] = []
    original = projector._read_batch

    async def _read_batch(source: Source, checkpoint: int, events: list[StoredEvent]) -> Any:
        before = len(events)
        result = await original(source, checkpoint, events)
        read.extend(e.seq for e in events[before:])
        return result

    projector._read_batch = _read_batch  # type: ignore[method-assign]
    return read


def _relay(nc: Any, store: EventStore, publish: Any, **kw: Any) -> Projector:
    return relay(
        nc,
        f"relay_{store.stream.lower()}",
        [Source(store.stream, store.subjects)],
        MemoryReadModelStore(),
        publish,
        **kw,
    )


# -- on_append ------------------------------------------------------------------


async def test_on_append_hands_over_exactly_the_stored_events_and_its_remover_stops_it(
    store: EventStore,
) -> None:
    calls: list[tuple[StoredEvent, ...]] = []
    remove = store.on_append(lambda events: calls.append(tuple(events)))
    agg = new_id()
    r1 = await store.append(AGG, agg, [paid(1)], expected=Version())
    r2 = await store.append(AGG, agg, [paid(2), paid(3)], expected=r1.version)
    assert calls == [r1.events, r2.events]  # synchronously, before append returned
    stored = await store.read(AGG, agg)
    handed = [e for events in calls for e in events]
    assert [(e.seq, e.version, e.event_id, e.event_type, e.subject, e.stream) for e in handed] == [
        (e.seq, e.version, e.event_id, e.event_type, e.subject, e.stream) for e in stored
    ]
    assert [e.data for e in handed] == [e.data for e in stored]
    # What a relay would publish is the same whether it got the event offered or read it.
    assert [e.envelope.to_headers() for e in handed] == [e.envelope.to_headers() for e in stored]

    remove()
    remove()  # a second call is harmless
    await store.append(AGG, agg, [paid(4)], expected=r2.version)
    assert len(calls) == 2
    assert [e.version for e in await store.read(AGG, agg)] == [1, 2, 3, 4]


async def test_a_failing_listener_does_not_fail_the_append_nor_the_next_listener(
    store: EventStore,
) -> None:
    def broken(events: Any) -> None:
        raise RuntimeError("listener bug")

    after: list[int] = []
    store.on_append(broken)
    store.on_append(lambda events: after.extend(e.version for e in events))
    agg = new_id()
    result = await store.append(AGG, agg, [paid(1), paid(2)], expected=Version())
    assert result.version.number == 2
    assert after == [1, 2]
    assert [e.version for e in await store.read(AGG, agg)] == [1, 2]


async def test_listeners_are_per_store_instance(store: EventStore) -> None:
    mine: list[int] = []
    store.on_append(lambda events: mine.extend(e.seq for e in events))
    other = EventStore(store.nc, store.config)
    agg = new_id()
    r = await other.append(AGG, agg, [paid(1)], expected=Version())
    assert mine == []
    await store.append(AGG, agg, [paid(2)], expected=r.version)
    assert mine == [r.version.seq + 1]


# -- offers ---------------------------------------------------------------------


async def test_relay_without_follow_forwards_offered_appends_without_reading_them(
    nc: Any, store: EventStore
) -> None:
    sink = Sink()
    projector = _relay(nc, store, sink.publish, follow=False)
    projector.poll_interval = 30.0  # no poll during the test: only offers can explain it
    read = spy_reads(projector)
    remove = store.on_append(projector.offer)
    await projector.start()
    try:
        assert projector._subs == []  # follow=False: no wake-up subscription
        await until(lambda: projector.stats.passes >= 1)
        aggs = [new_id() for _ in range(3)]
        versions = {a: Version() for a in aggs}
        appended: dict[str, list[str]] = defaultdict(list)
        total = 0
        for round_no in range(3):
            for i, agg in enumerate(aggs):
                n = 1 + (round_no + i) % 2  # single events and atomic batches of two
                r = await store.append(
                    AGG, agg, [paid(round_no * 10 + k) for k in range(n)], expected=versions[agg]
                )
                versions[agg] = r.version
                appended[agg] += [e.event_id for e in r.events]
                total += n
                await until(lambda total=total: projector.stats.applied == total)
    finally:
        remove()
        await projector.stop()
    assert read == []  # every event came from the offers
    assert len(sink.ids()) == total == len(set(sink.ids()))
    for agg in aggs:
        assert [e.event_id for e in sink.events if e.aggregate_id == agg] == appended[agg]
        mine = [e.version for e in sink.events if e.aggregate_id == agg]
        assert mine == list(range(1, len(mine) + 1))
    last_seq = max(v.seq for v in versions.values())
    assert projector.store.checkpoints(projector.name) == {
        f"{store.stream}:{store.subjects}": last_seq
    }
    assert await projector.catch_up() == 0  # nothing left over to forward again
    assert len(sink.events) == total


async def test_a_foreign_writers_event_is_polled_and_offers_after_the_gap_still_work(
    nc: Any, store: EventStore
) -> None:
    sink = Sink()
    projector = _relay(nc, store, sink.publish, follow=False)
    projector.poll_interval = 0.05
    read = spy_reads(projector)
    remove = store.on_append(projector.offer)
    foreign = EventStore(nc, store.config)  # another writer: its appends are not offered
    await projector.start()
    try:
        agg = new_id()
        r1 = await store.append(AGG, agg, [paid(1)], expected=Version())
        await until(lambda: len(sink.events) == 1)
        r2 = await foreign.append(AGG, agg, [paid(2)], expected=r1.version)
        await until(lambda: len(sink.events) == 2)  # found by the poll
        assert r2.version.seq in read
        # From now on no poll can explain a forward: wait until the loop waits 30 s.
        passes = projector.stats.passes
        projector.poll_interval = 30.0
        await until(lambda: projector.stats.passes > passes)
        reads_before = list(read)
        r3 = await store.append(AGG, agg, [paid(3), paid(4)], expected=r2.version)
        await until(lambda: len(sink.events) == 4)
        assert read == reads_before  # the two after the gap came from the offers
        r4 = await foreign.append(AGG, agg, [paid(5)], expected=r3.version)
        r5 = await store.append(AGG, agg, [paid(6)], expected=r4.version)
        # The offer of r5 wakes the relay; the gap (r4) is read, r5 is not read twice.
        await until(lambda: len(sink.events) == 6)
    finally:
        remove()
        await projector.stop()
    expected = [e.event_id for r in (r1, r2, r3, r4, r5) for e in r.events]
    assert sink.ids() == expected
    assert [e.version for e in sink.events] == [1, 2, 3, 4, 5, 6]
    assert await projector.catch_up() == 0
    assert sink.ids() == expected


async def test_concurrent_appends_are_each_forwarded_once_in_aggregate_order(
    nc: Any, store: EventStore
) -> None:
    sink = Sink()
    projector = _relay(nc, store, sink.publish, follow=False)
    projector.poll_interval = 0.05  # out-of-order offers fall back to a read
    remove = store.on_append(projector.offer)
    await projector.start()
    aggs = [new_id() for _ in range(4)]
    appended: dict[str, list[str]] = defaultdict(list)
    versions = {a: Version() for a in aggs}

    async def write(agg: str, round_no: int) -> None:
        r = await store.append(AGG, agg, [paid(round_no)], expected=versions[agg])
        versions[agg] = r.version
        appended[agg] += [e.event_id for e in r.events]

    try:
        for round_no in range(5):
            await asyncio.gather(*(write(a, round_no) for a in aggs))
        await until(lambda: len(sink.events) >= 20)
        assert await projector.catch_up() == 0
    finally:
        remove()
        await projector.stop()
    assert len(sink.events) == 20 == len(set(sink.ids()))
    for agg in aggs:
        assert [e.event_id for e in sink.events if e.aggregate_id == agg] == appended[agg]


async def test_offers_of_a_non_atomic_append_interleaved_with_another_writer(nc: Any) -> None:
    config = _config(atomic=False)
    store = EventStore(nc, config)
    await store.ensure()
    foreign = EventStore(nc, config)
    a, b = new_id(), new_id()
    request = store._request
    interleaved: list[Any] = []

    async def request_then_interleave(subject: str, payload: bytes, headers: Any) -> bytes:
        ack = await request(subject, payload, headers)
        if not interleaved:  # after the first of a's two events, another writer writes b
            interleaved.append(await foreign.append(AGG, b, [paid(99)], expected=Version()))
        return ack

    store._request = request_then_interleave  # type: ignore[method-assign]
    sink = Sink()
    projector = _relay(nc, store, sink.publish, follow=False)
    projector.poll_interval = 30.0
    remove = store.on_append(projector.offer)
    await projector.start()
    try:
        await until(lambda: projector.stats.passes >= 1)
        ra = await store.append(AGG, a, [paid(1), paid(2)], expected=Version())
        assert not ra.atomic
        stored_a = await store.read(AGG, a)
        reported = [e.seq for e in ra.events]
        actual = [e.seq for e in stored_a]
        await until(lambda: projector.stats.applied >= 2)
        await projector.catch_up()
    finally:
        remove()
        await projector.stop()
    b_event = interleaved[0].events[0]
    assert b_event.seq == 2 and actual == [1, 3]  # b's event landed between a's two
    forwarded = [(e.aggregate_id, e.version, e.seq) for e in sink.events]
    # Expected: every stored event forwarded once, in stream order.
    assert forwarded == [(a, 1, 1), (b, 1, 2), (a, 2, 3)], f"forwarded {forwarded}"
    assert reported == actual, f"append reported seqs {reported}, stored at {actual}"


# -- forwarding order -----------------------------------------------------------


async def test_relay_publishes_aggregates_concurrently_each_in_order(
    nc: Any, store: EventStore
) -> None:
    js = nc.jetstream()
    out = f"{store.stream}OUT"
    await js.add_stream(
        api.StreamConfig(name=out, subjects=[f"{out.lower()}.>"], allow_direct=True)
    )
    aggs = [new_id() for _ in range(4)]
    appended: dict[str, list[str]] = defaultdict(list)
    for i in range(4):
        for agg in aggs:
            events = [paid(i)] if i % 2 else [paid(i), paid(i + 100)]
            r = await store.append(AGG, agg, events, expected=None)
            appended[agg] += [e.event_id for e in r.events]

    started: set[str] = set()
    all_started = asyncio.Event()
    in_flight: dict[str, int] = defaultdict(int)
    overlap_in_aggregate: list[str] = []
    peak = 0
    barrier_timeouts = 0

    async def publish(ev: StoredEvent) -> None:
        nonlocal peak, barrier_timeouts
        agg = ev.aggregate_id
        in_flight[agg] += 1
        if in_flight[agg] > 1:
            overlap_in_aggregate.append(agg)
        peak = max(peak, sum(in_flight.values()))
        try:
            started.add(agg)
            if started == set(aggs):
                all_started.set()
            # A relay that published one aggregate after another would not get past
            # here: every aggregate's first event waits for all of them to begin.
            try:
                await asyncio.wait_for(all_started.wait(), 2)
            except TimeoutError:
                barrier_timeouts += 1
                all_started.set()  # fail once, not once per event
            await js.publish(f"{out.lower()}.{agg}", ev.data, headers=ev.envelope.to_headers())
        finally:
            in_flight[agg] -= 1

    projector = _relay(nc, store, publish)
    applied = await projector.catch_up()
    assert applied == 24
    assert barrier_timeouts == 0 and all_started.is_set()
    assert peak == len(aggs)  # one event of each aggregate in flight at once
    assert overlap_in_aggregate == []  # never two of one aggregate
    msgs = [
        m for chunk in [c async for c in read_batches(nc, out, ">", 1, 100, 5.0)] for m in chunk
    ]
    assert len(msgs) == 24
    by_agg: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for m in msgs:
        h = m.headers or {}
        by_agg[h[AGGREGATE_ID]].append((int(h[AGGREGATE_VERSION]), h["Nats-Msg-Id"]))
    assert set(by_agg) == set(aggs)
    for agg in aggs:
        assert [v for v, _ in by_agg[agg]] == list(range(1, 7))
        assert [i for _, i in by_agg[agg]] == appended[agg]
