"""The event store against a real nats-server: conflicts, atomic batches, time travel,
upcasting, snapshots (property: snapshot plus tail equals full replay)."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from typing import Any

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.shop.gen.shop.v1 import common_pb2, events_pb2
from meshkit.errors import ConcurrencyError
from meshkit.saga.eventstore import (
    AggregateConflict,
    EventStore,
    EventStoreConfig,
    EventStoreError,
    Repository,
    StateCodec,
    Upcasters,
    Version,
)
from meshkit.saga.snapshots import SnapshotStore
from tests.integration._es_retries import (
    a_retried_execute_applies_its_events_once,
    retries_return_the_first_append,
)

pytestmark = pytest.mark.integration


class Tally:
    """A test aggregate whose state records every event in order."""

    def __init__(self, tally_id: str) -> None:
        self.tally_id = tally_id
        self.log: list[list[Any]] = []
        self.total = 0

    def apply_created(self, e: events_pb2.OrderCreated) -> None:
        self.log.append(["created", e.customer_id])

    def apply_reserved(self, e: events_pb2.StockReserved) -> None:
        self.log.append(["reserved", [i.sku for i in e.items]])

    def apply_paid(self, e: events_pb2.PaymentCompleted) -> None:
        self.total += e.amount.amount_minor
        self.log.append(["paid", e.amount.amount_minor])

    def apply_cancelled(self, e: events_pb2.OrderCancelled) -> None:
        self.log.append(["cancelled", e.reason])


TALLY_CODEC: StateCodec[Tally] = StateCodec(
    dump=lambda t: json.dumps({"log": t.log, "total": t.total}).encode(),
    load=lambda i, raw: _tally_from(i, json.loads(raw)),
)


def _tally_from(tally_id: str, d: dict[str, Any]) -> Tally:
    t = Tally(tally_id)
    t.log = d["log"]
    t.total = d["total"]
    return t


def paid(n: int) -> events_pb2.PaymentCompleted:
    return events_pb2.PaymentCompleted(order_id="x", amount=common_pb2.Money(amount_minor=n))


@pytest.fixture
async def store(nc: Any) -> EventStore:
    s = EventStore(nc, EventStoreConfig(stream="ESTEST", prefix="estest"))
    await s.ensure()
    return s


def new_id() -> str:
    return uuid.uuid4().hex[:12]


async def test_append_and_read_versions_and_sequences(store: EventStore) -> None:
    agg = new_id()
    r1 = await store.append(
        "tally", agg, [events_pb2.OrderCreated(customer_id="c")], expected=Version()
    )
    r2 = await store.append("tally", agg, [paid(1), paid(2)], expected=r1.version)
    assert r1.version.number == 1 and r2.version.number == 3
    assert r2.atomic is True
    events = await store.read("tally", agg)
    assert [e.version for e in events] == [1, 2, 3]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert events[-1].seq == r2.version.seq
    # Each event on its aggregate's subject, led by its type's token.
    assert [e.subject for e in events] == [
        f"estest.shop:v1:OrderCreated.tally.{agg}",
        f"estest.shop:v1:PaymentCompleted.tally.{agg}",
        f"estest.shop:v1:PaymentCompleted.tally.{agg}",
    ]
    assert await store.version("tally", agg) == r2.version


async def test_stale_writer_gets_conflict_naming_aggregate_and_versions(store: EventStore) -> None:
    agg = new_id()
    first = await store.append("tally", agg, [paid(1)], expected=Version())
    await store.append("tally", agg, [paid(2), paid(3)], expected=first.version)
    with pytest.raises(AggregateConflict) as err:
        await store.append("tally", agg, [paid(4)], expected=first.version)
    assert isinstance(err.value, ConcurrencyError) and err.value.code == "ABORTED"
    assert (err.value.expected, err.value.actual) == (1, 3)
    assert agg in str(err.value) and "expected version 1" in str(err.value)
    with pytest.raises(AggregateConflict) as err2:
        await store.append("tally", agg, [paid(4)], expected=2)  # a bare count
    assert (err2.value.expected, err2.value.actual) == (2, 3)
    assert len(await store.read("tally", agg)) == 3


async def test_conflicting_atomic_batch_stores_nothing(store: EventStore) -> None:
    agg = new_id()
    v1 = (await store.append("tally", agg, [paid(1)], expected=Version())).version
    await store.append("tally", agg, [paid(2)], expected=v1)
    with pytest.raises(AggregateConflict):
        await store.append("tally", agg, [paid(10), paid(11), paid(12)], expected=v1)
    assert [e.version for e in await store.read("tally", agg)] == [1, 2]


class _Killed(Exception):
    """The writer's process ends here."""


async def test_a_writer_dying_mid_batch_stores_none_of_it(
    nats_server_module: Any, store: EventStore
) -> None:
    # The writer's connection drops after two of three messages, before the commit: the
    # staged messages are never stored, and the aggregate stays at its version.
    agg = new_id()
    v1 = (await store.append("tally", agg, [paid(1)], expected=Version())).version
    conn = await nats.connect(nats_server_module.url, allow_reconnect=False)
    dying = EventStore(conn, store.config)
    sent = 0
    publish = conn.publish

    async def publish_then_die(subject: str, payload: bytes = b"", **kw: Any) -> None:
        nonlocal sent
        await publish(subject, payload, **kw)
        sent += 1
        await conn.flush()
        raise _Killed  # the process dies before the commit message

    conn.publish = publish_then_die  # type: ignore[method-assign]
    with pytest.raises(_Killed):
        await dying.append("tally", agg, [paid(10), paid(11), paid(12)], expected=v1)
    await conn.close()
    assert sent == 1  # the batch was open (message 1) and had message 2 when it died
    assert [e.version for e in await store.read("tally", agg)] == [1]
    after = await store.append("tally", agg, [paid(2)], expected=v1)
    assert after.version.number == 2
    assert [e.version for e in await store.read("tally", agg)] == [1, 2]


async def test_racing_writers_on_separate_connections_exactly_one_wins(
    nats_server_module: Any, store: EventStore
) -> None:
    agg = new_id()
    writers = 6
    conns = [await nats.connect(nats_server_module.url) for _ in range(writers)]
    stores = [EventStore(c, store.config) for c in conns]
    try:
        for round_no in range(5):
            base = await stores[0].version("tally", agg)
            gate = asyncio.Event()

            async def write(i: int, base: Version = base, gate: asyncio.Event = gate) -> str:
                await gate.wait()
                try:
                    await stores[i].append("tally", agg, [paid(i), paid(100 + i)], expected=base)
                    return "won"
                except AggregateConflict as exc:
                    return f"lost {exc.expected}->{exc.actual}"

            tasks = [asyncio.create_task(write(i)) for i in range(writers)]
            await asyncio.sleep(0)
            gate.set()
            outcomes = await asyncio.gather(*tasks)
            assert outcomes.count("won") == 1, (round_no, outcomes)
            lost = f"lost {base.number}->{base.number + 2}"
            assert outcomes.count(lost) == writers - 1, outcomes
        events = await store.read("tally", agg)
        assert [e.version for e in events] == list(range(1, 11))
    finally:
        for c in conns:
            await c.close()


def test_racing_threads_with_their_own_loops_exactly_one_wins(nats_server_module: Any) -> None:
    agg = new_id()
    cfg = EventStoreConfig(stream="ESTEST", prefix="estest")
    barrier = threading.Barrier(4)
    results: list[str] = []
    lock = threading.Lock()

    async def one(i: int) -> str:
        conn = await nats.connect(nats_server_module.url)
        try:
            s = EventStore(conn, cfg)
            await s.ensure()
            await asyncio.to_thread(barrier.wait)
            try:
                await s.append("tally", agg, [paid(i)], expected=Version())
                return "won"
            except AggregateConflict:
                return "lost"
        finally:
            await conn.close()

    def run(i: int) -> None:
        out = asyncio.run(one(i))
        with lock:
            results.append(out)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["lost", "lost", "lost", "won"]


async def test_unchecked_appends_from_racing_writers_still_get_distinct_versions(
    nats_server_module: Any, store: EventStore
) -> None:
    agg = new_id()
    conns = [await nats.connect(nats_server_module.url) for _ in range(4)]
    try:
        stores = [EventStore(c, store.config) for c in conns]
        await asyncio.gather(
            *(
                s.append("tally", agg, [paid(i), paid(i)] if i % 2 else [paid(i)], expected=None)
                for _ in range(5)
                for i, s in enumerate(stores)
            )
        )
    finally:
        for c in conns:
            await c.close()
    events = await store.read("tally", agg)
    assert [e.version for e in events] == list(range(1, 31))


async def test_non_atomic_fallback_still_rejects_stale_writers(nc: Any) -> None:
    s = EventStore(nc, EventStoreConfig(stream="ESPLAIN", prefix="esplain", atomic=False))
    await s.ensure()
    agg = new_id()
    r = await s.append("tally", agg, [paid(1), paid(2), paid(3)], expected=Version())
    assert r.atomic is False and r.version.number == 3
    with pytest.raises(AggregateConflict):
        await s.append("tally", agg, [paid(4), paid(5)], expected=Version(1, r.events[0].seq))
    assert [e.version for e in await s.read("tally", agg)] == [1, 2, 3]


async def test_time_travel_by_version_and_time(store: EventStore) -> None:
    repo = Repository(store, "tally", Tally)
    agg = new_id()
    v = Version()
    for i, ts in enumerate([1_000, 2_000, 3_000, 4_000], 1):
        # Explicit timestamps make "as of" exact without sleeping.
        v = (await store.append("tally", agg, [paid(i)], expected=v, timestamp_ms=ts)).version
    at2 = await repo.load(agg, version=2)
    assert at2.version.number == 2 and at2.state.total == 1 + 2
    at_time = await repo.load(agg, as_of_ms=3_500)
    assert at_time.version.number == 3 and at_time.state.total == 6
    before = await repo.load(agg, as_of_ms=999)
    assert before.version == Version() and before.state.log == []
    now = await repo.load(agg)
    assert now.state.total == 10


async def test_upcaster_turns_old_schema_into_new(nc: Any) -> None:
    old = EventStore(nc, EventStoreConfig(stream="ESTEST", prefix="estest"))
    agg = new_id()
    # Schema 1 of OrderCancelled put the reason in order_id (a bug); schema 2 fixed it.
    await old.append("tally", agg, [events_pb2.OrderCancelled(order_id="too late")], expected=0)
    new = EventStore(
        nc,
        EventStoreConfig(
            stream="ESTEST", prefix="estest", schema_versions={"shop.v1.OrderCancelled": 2}
        ),
    )
    await new.append("tally", agg, [events_pb2.OrderCancelled(reason="fixed")], expected=1)
    up = Upcasters()

    @up.upcaster("shop.v1.OrderCancelled", 1)
    def move_reason(data: bytes) -> bytes:
        e = events_pb2.OrderCancelled.FromString(data)
        return events_pb2.OrderCancelled(order_id="", reason=e.order_id).SerializeToString()

    loaded = await Repository(new, "tally", Tally, upcasters=up).load(agg)
    assert loaded.state.log == [["cancelled", "too late"], ["cancelled", "fixed"]]
    plain = await Repository(new, "tally", Tally).load(agg)
    assert plain.state.log == [["cancelled", ""], ["cancelled", "fixed"]]


async def test_snapshots_bound_the_replay(nc: Any, store: EventStore) -> None:
    snaps = SnapshotStore(nc, bucket="estest_snaps")
    repo = Repository(store, "tally", Tally, snapshots=snaps, snapshot_every=10, codec=TALLY_CODEC)
    agg = new_id()
    loaded = await repo.load(agg)
    for i in range(23):
        loaded = await repo.save(loaded, [paid(i)])
    fresh = await repo.load(agg)
    assert fresh.snapshot_version == 20 and fresh.replayed == 3
    assert fresh.state.total == sum(range(23)) and fresh.version.number == 23
    full = await repo.load(agg, use_snapshots=False)
    assert full.replayed == 23 and full.state.log == fresh.state.log
    # Time travel uses an older snapshot from the bucket's history.
    past = await repo.load(agg, version=15)
    assert past.snapshot_version == 10 and past.replayed == 5 and past.state.total == sum(range(15))
    # A snapshot written by another codec schema is ignored, not trusted.
    repo2 = Repository(
        store,
        "tally",
        Tally,
        snapshots=snaps,
        snapshot_every=10,
        codec=StateCodec(dump=TALLY_CODEC.dump, load=TALLY_CODEC.load, schema=2),
    )
    again = await repo2.load(agg)
    assert (
        again.snapshot_version is None
        and again.replayed == 23
        and again.state.total == full.state.total
    )


async def test_execute_retries_on_conflict(nats_server_module: Any, store: EventStore) -> None:
    agg = new_id()
    conns = [await nats.connect(nats_server_module.url) for _ in range(4)]
    try:
        repos = [Repository(EventStore(c, store.config), "tally", Tally) for c in conns]
        await asyncio.gather(
            *(r.execute(agg, lambda t, i=i: [paid(1)], retries=20) for i, r in enumerate(repos))
        )
        final = await repos[0].load(agg)
        assert final.version.number == 4 and final.state.total == 4
    finally:
        for c in conns:
            await c.close()


EVENTS = st.one_of(
    st.builds(lambda s: events_pb2.OrderCreated(customer_id=s), st.text("abc", max_size=3)),
    st.builds(
        lambda skus: events_pb2.StockReserved(items=[common_pb2.LineItem(sku=s) for s in skus]),
        st.lists(st.sampled_from(["a", "b", "c"]), max_size=3),
    ),
    st.builds(paid, st.integers(0, 1000)),
    st.builds(lambda r: events_pb2.OrderCancelled(reason=r), st.text("xyz", max_size=2)),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    chunks=st.lists(st.lists(EVENTS, min_size=1, max_size=4), min_size=1, max_size=12),
    every=st.integers(1, 7),
)
def test_snapshot_plus_tail_equals_full_replay(
    nats_server_module: Any, chunks: list[list[Any]], every: int
) -> None:
    async def run() -> None:
        conn = await nats.connect(nats_server_module.url)
        try:
            s = EventStore(conn, EventStoreConfig(stream="ESTEST", prefix="estest"))
            snaps = SnapshotStore(conn, bucket="estest_snaps")
            repo = Repository(
                s, "tally", Tally, snapshots=snaps, snapshot_every=every, codec=TALLY_CODEC
            )
            agg = new_id()
            loaded = await repo.load(agg)
            for chunk in chunks:
                loaded = await repo.save(loaded, chunk)
            n = sum(len(c) for c in chunks)
            with_snap = await repo.load(agg)
            full = await repo.load(agg, use_snapshots=False)
            assert full.replayed == n
            assert with_snap.state.log == full.state.log == loaded.state.log
            assert with_snap.state.total == full.state.total
            assert with_snap.version == full.version
            if n >= every:
                assert with_snap.snapshot_version is not None
                # Saves snapshot at the first crossing of a multiple of `every`,
                # so at most every-1 plus one chunk's events are replayed.
                assert with_snap.replayed < every + 4
            # Any past version equals the replay of that prefix.
            mid = max(1, n // 2)
            past = await repo.load(agg, version=mid)
            prefix = await repo.load(agg, version=mid, use_snapshots=False)
            assert past.state.log == prefix.state.log == full.state.log[:mid]
        finally:
            await conn.close()

    asyncio.run(run())


async def test_retried_append_with_the_same_event_ids_is_idempotent(store: EventStore) -> None:
    agg = new_id()
    v0 = Version()
    first = await store.append("tally", agg, [paid(1)], expected=v0, event_ids=["evt-a1"])
    # The caller never saw the ack and retries the same append.
    again = await store.append("tally", agg, [paid(1)], expected=v0, event_ids=["evt-a1"])
    assert again.version == first.version
    batch = await store.append(
        "tally", agg, [paid(2), paid(3)], expected=first.version, event_ids=["evt-b1", "evt-b2"]
    )
    batch_again = await store.append(
        "tally", agg, [paid(2), paid(3)], expected=first.version, event_ids=["evt-b1", "evt-b2"]
    )
    assert batch_again.version == batch.version
    assert [e.event_id for e in await store.read("tally", agg)] == ["evt-a1", "evt-b1", "evt-b2"]


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "one-by-one"])
@pytest.mark.parametrize("size", [1, 3])
async def test_every_retry_of_a_stored_append_returns_what_the_first_try_stored(
    nc: Any, atomic: bool, size: int
) -> None:
    # Retried with the version it was decided on (a Version or a count), the version
    # after it, or no check, and after another writer moved the aggregate on: always
    # the first try's events and version, marked duplicate, nothing stored again.
    s = EventStore(nc, EventStoreConfig(stream="ESRETRY", prefix="esretry", atomic=atomic))
    await s.ensure()
    await retries_return_the_first_append(s, size)


@pytest.mark.parametrize("cache_size", [0, 8])
async def test_a_retried_execute_returns_the_state_its_first_try_returned(
    store: EventStore, cache_size: int
) -> None:
    await a_retried_execute_applies_its_events_once(store, cache_size)


async def test_a_one_by_one_append_cut_short_is_completed_by_its_retry(nc: Any) -> None:
    # Without atomic batches a crash half way leaves a prefix stored: the retry
    # stores the rest after it and answers with the whole run, each event once.
    s = EventStore(nc, EventStoreConfig(stream="ESPLAIN", prefix="esplain", atomic=False))
    await s.ensure()
    for expected_of in ("version", "none"):
        agg = new_id()
        ids = [f"{agg}-{i}" for i in range(3)]
        cut = await s.append("tally", agg, [paid(1)], expected=Version(), event_ids=ids[:1])
        expected = Version() if expected_of == "version" else None
        whole = await s.append(
            "tally", agg, [paid(1), paid(2), paid(3)], expected=expected, event_ids=ids
        )
        assert not whole.duplicate
        assert whole.events[0].seq == cut.events[0].seq
        stored = await s.read("tally", agg)
        assert [(e.event_id, e.version) for e in stored] == [(i, n + 1) for n, i in enumerate(ids)]
        assert [(e.event_id, e.version, e.seq) for e in whole.events] == [
            (e.event_id, e.version, e.seq) for e in stored
        ]


async def test_a_reused_event_id_of_another_aggregate_is_an_error_not_a_result(
    store: EventStore,
) -> None:
    a, b = new_id(), new_id()
    await store.append("tally", a, [paid(1)], expected=Version(), event_ids=["shared-id-1"])
    b_first = await store.append("tally", b, [paid(2)], expected=Version())
    with pytest.raises(EventStoreError, match="event ids reused"):
        await store.append(
            "tally", b, [paid(3)], expected=b_first.version, event_ids=["shared-id-1"]
        )
    assert [e.version for e in await store.read("tally", b)] == [1]


async def test_an_oversize_event_is_refused_before_anything_is_sent(store: EventStore) -> None:
    # Under max_payload by itself, over it with its headers: nats-py would send it and
    # the server would drop the connection. Refused first, naming event, size, limit.
    agg = new_id()
    limit = store.nc.max_payload
    big = events_pb2.OrderCreated(order_id="x", customer_id="y" * (limit - 100))
    assert len(big.SerializeToString()) < limit
    small = events_pb2.OrderCreated(order_id="s")
    for events in ([small, big, small], [big]):
        with pytest.raises(EventStoreError, match=r"event \d of \d .*max_payload"):
            await store.append("tally", agg, events, expected=None)
    assert await store.read("tally", agg) == []
    assert store.nc.is_connected
    r = await store.append("tally", agg, [small, small], expected=Version())
    assert r.version.number == 2


async def test_a_batch_failing_mid_way_is_abandoned_at_once(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch cut off after it was opened is closed right away (the server abandons
    # it as incomplete), not left open until the server's batch timeout.
    abandoned: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_advisory(msg: Any) -> None:
        await abandoned.put(json.loads(msg.data))

    sub = await store.nc.subscribe(
        f"$JS.EVENT.ADVISORY.STREAM.BATCH_ABANDONED.{store.stream}", cb=on_advisory
    )
    await store.nc.flush()

    async def fail(subject: str, payload: bytes, headers: dict[str, str]) -> None:
        raise EventStoreError("connection lost (test)")

    monkeypatch.setattr(store, "_publish", fail)
    agg = new_id()
    with pytest.raises(EventStoreError, match="connection lost"):
        await store.append("tally", agg, [paid(1), paid(2), paid(3)], expected=None)
    advisory = await asyncio.wait_for(abandoned.get(), 5)
    assert advisory["reason"] == "incomplete"
    monkeypatch.undo()
    await sub.unsubscribe()
    assert await store.read("tally", agg) == []
    r = await store.append("tally", agg, [paid(1), paid(2)], expected=Version())
    assert [e.version for e in r.events] == [1, 2]


async def test_no_responders_on_a_direct_stream_is_retried_without_downgrading_it(
    nc: Any, store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While a restarting server's JetStream comes up (or a cluster elects a leader),
    # direct gets answer "no responders": the read is retried within the retry
    # window, and later reads stay direct.
    from meshkit.saga import eventstore
    from meshkit.saga.eventstore import reads

    agg = new_id()
    await store.append("tally", agg, [paid(1), paid(2)], expected=Version())
    real = reads._direct_batch
    calls = {"fail": 1, "direct": 0}

    async def flaky(*args: Any) -> Any:
        calls["direct"] += 1
        if calls["fail"]:
            calls["fail"] -= 1
            raise reads._NoDirect()
        return await real(*args)

    monkeypatch.setattr(reads, "_direct_batch", flaky)
    assert [e.version for e in await store.read("tally", agg)] == [1, 2]
    assert store.stream not in reads._NO_DIRECT.get(nc, set())
    assert calls["direct"] == 2
    monkeypatch.setenv("MESHKIT_NATS_RETRY_WINDOW", "0.3")
    calls["fail"] = 1000
    with pytest.raises(eventstore.EventStoreUnavailable, match="direct get has no responders"):
        await store.read("tally", agg)
    assert store.stream not in reads._NO_DIRECT.get(nc, set())


async def test_an_append_rides_out_unanswered_requests_then_says_what_failed(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first try is made outside cluster.retrying (the hot path): a transient
    # failure of it still goes on to the retries, within the same window.
    from meshkit.saga import eventstore

    real = store._request
    calls = {"fail": 2, "sent": 0}

    async def flaky(subject: str, payload: bytes, headers: dict[str, str]) -> bytes:
        calls["sent"] += 1
        if calls["fail"]:
            calls["fail"] -= 1
            raise eventstore.EventStoreUnavailable("no answer (test)")
        return await real(subject, payload, headers)

    monkeypatch.setattr(store, "_request", flaky)
    agg = new_id()
    r = await store.append("tally", agg, [paid(1)], expected=Version(), event_ids=[new_id()])
    assert r.version.number == 1 and calls["sent"] == 3
    monkeypatch.setenv("MESHKIT_NATS_RETRY_WINDOW", "0.3")
    calls["fail"] = 1000
    with pytest.raises(eventstore.EventStoreUnavailable) as info:
        await store.append("tally", agg, [paid(2)], expected=r.version)
    assert str(info.value).startswith(
        f"append to {store.aggregate_name('tally', agg)}: JetStream did not answer within 0.3s"
    )
    assert isinstance(info.value.__cause__, eventstore.EventStoreUnavailable)


async def test_a_stream_without_direct_gets_is_read_through_a_consumer(nc: Any) -> None:
    from nats.js import api

    from meshkit.saga import eventstore
    from meshkit.saga.eventstore import reads

    name = f"NODIRECT{new_id()}"
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name=name, subjects=[f"{name.lower()}.>"]))
    for i in range(3):
        await js.publish(f"{name.lower()}.a", str(i).encode())
    got = []
    reader = eventstore.read_batches(nc, name, f"{name.lower()}.>", 1, 2, 5.0)
    async for chunk in reader:
        got += [(m.seq, m.data) for m in chunk]
    assert got == [(1, b"0"), (2, b"1"), (3, b"2")]
    assert name in reads._NO_DIRECT[nc]
