"""Decisions never rest on a stale read: a replica behind the stream leader may answer
direct gets, so a command that decides to write nothing (or refuses) confirms the
state with the leader first, and the shop's order participant never acknowledges an
event for an order it cannot find; an append decides on the leader's version on a
cluster (on its one direct get on a single server). The lagging replica is simulated
on one node (a read that misses the newest events) so the tests are deterministic;
the leader reads themselves also run on an R3 stream."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from examples.shop import order as shop_order
from examples.shop.domain import AGGREGATE, Order
from examples.shop.gen.shop.v1 import common_pb2, events_pb2, orders_pb2
from meshkit.saga import _client
from meshkit.saga.envelope import Envelope
from meshkit.saga.eventstore import (
    AggregateConflict,
    EventStore,
    EventStoreConfig,
    Repository,
    Version,
)
from meshkit.saga.participant import Context

pytestmark = pytest.mark.integration


class Account:
    def __init__(self, account_id: str) -> None:
        self.opened = False
        self.total = 0

    def apply_opened(self, e: events_pb2.OrderCreated) -> None:
        self.opened = True

    def apply_paid(self, e: events_pb2.PaymentCompleted) -> None:
        self.total += e.amount.amount_minor


def paid(n: int) -> events_pb2.PaymentCompleted:
    return events_pb2.PaymentCompleted(order_id="x", amount=common_pb2.Money(amount_minor=n))


def lagging(store: EventStore, monkeypatch: pytest.MonkeyPatch, missing: int = 1) -> None:
    """Make the store's direct reads (events and versions) answer like a replica
    ``missing`` events behind."""
    real = store.read

    async def behind(*args: Any, **kwargs: Any) -> Any:
        return (await real(*args, **kwargs))[:-missing] or []

    async def version_behind(aggregate_type: str, aggregate_id: str) -> Version:
        seen = await behind(aggregate_type, aggregate_id)
        return seen[-1].version_at() if seen else Version()

    monkeypatch.setattr(store, "read", behind)
    monkeypatch.setattr(store, "version", version_behind)


def counting(store: EventStore, monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, int]:
    """Count the calls of the store's methods ``names``."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(store, name)

        async def counted(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            calls[_name] += 1
            return await _real(*args, **kw)

        monkeypatch.setattr(store, name, counted)
    return calls


@pytest.fixture
async def store(nc: Any) -> EventStore:
    s = EventStore(nc, EventStoreConfig(stream="ESSTALE", prefix="esstale"))
    await s.ensure()
    return s


async def test_a_no_op_decision_on_a_stale_read_is_taken_on_the_leaders_state(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    agg = uuid.uuid4().hex[:12]
    await store.append("acct", agg, [events_pb2.OrderCreated(order_id=agg)], expected=Version())
    lagging(store, monkeypatch)
    repo = Repository(store, "acct", Account)
    # The replica misses OrderCreated: "not opened" must not become "nothing to do".
    assert not (await repo.load(agg)).state.opened
    assert (await repo.load(agg, consistent=True)).state.opened
    done = await repo.execute(agg, lambda a: [paid(5)] if a.opened else [])
    assert done.state.total == 5 and done.version.number == 2
    # A refusal too is decided on the leader's state.

    def must_be_open(a: Account) -> list[Any]:
        if not a.opened:
            raise LookupError("not open")
        return [paid(1)]

    again = await repo.execute(agg, must_be_open)
    assert again.state.total == 6 and again.version.number == 3


async def test_an_append_on_a_cluster_decides_on_the_leaders_version(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    agg = uuid.uuid4().hex[:12]
    first = await store.append(
        "acct", agg, [events_pb2.OrderCreated(order_id=agg), paid(1)], expected=Version()
    )
    assert not store._on_cluster()  # one nats-server: the connection knows only it
    monkeypatch.setattr(store, "_on_cluster", lambda: True)  # as on a replicated stream
    lagging(store, monkeypatch)
    calls = counting(store, monkeypatch, "_store")
    assert (await store.version("acct", agg)).number == 1  # the replica is one behind
    # expected=<int>: the leader's version, not a spurious conflict with the replica's.
    r = await store.append("acct", agg, [paid(2)], expected=2)
    assert r.version.number == 3 and r.version.seq == first.version.seq + 1
    # expected=None: the first try is the one (no refusal, no retry), at the next version.
    r = await store.append("acct", agg, [paid(3)], expected=None)
    assert r.version.number == 4 and calls["_store"] == 2
    # A real conflict reports the leader's version.
    with pytest.raises(AggregateConflict) as conflict:
        await store.append("acct", agg, [paid(4)], expected=3)
    assert (conflict.value.expected, conflict.value.actual) == (3, 4)
    monkeypatch.undo()
    assert (await store.version("acct", agg)).number == 4


async def test_an_append_on_one_server_decides_on_one_direct_get(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No leader requests on a single nats-server: the direct get is current there.
    agg = uuid.uuid4().hex[:12]
    calls = counting(store, monkeypatch, "_leader_get", "_direct_last")
    await store.append("acct", agg, [events_pb2.OrderCreated(order_id=agg)], expected=0)
    await store.append("acct", agg, [paid(1)], expected=None)
    with pytest.raises(AggregateConflict):
        await store.append("acct", agg, [paid(2)], expected=1)
    assert calls == {"_leader_get": 0, "_direct_last": 3}
    # The lagging simulation fools exactly that path (what the cluster path avoids).
    lagging(store, monkeypatch)
    with pytest.raises(AggregateConflict) as conflict:
        await store.append("acct", agg, [paid(2)], expected=2)
    assert conflict.value.actual == 1


async def test_the_order_participant_never_acks_an_event_for_a_missing_order(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    orders = Repository(store, AGGREGATE, Order)
    monkeypatch.setattr(shop_order, "_ORDERS", [orders])

    def ctx_for(event_type: str) -> Context:
        env = Envelope(event_id=uuid.uuid4().hex, event_type=event_type, saga_id="s")
        return Context(env, "order", None, None)

    missing = uuid.uuid4().hex
    with pytest.raises(shop_order.OrderNotFound):
        await shop_order._decide(ctx_for("shop.v1.StockReleased"), missing, lambda o: o.cancel("x"))
    # An order the replica has not caught up with is found on the leader and cancelled.
    oid = uuid.uuid4().hex
    req = orders_pb2.CreateOrderRequest(
        customer_id="c", items=[common_pb2.LineItem(sku="book", quantity=1)]
    )
    await orders.execute(oid, lambda o: o.create(req))
    lagging(store, monkeypatch)
    await shop_order._decide(ctx_for("shop.v1.StockReleased"), oid, lambda o: o.cancel("released"))
    monkeypatch.undo()
    final = await Repository(store, AGGREGATE, Order).load(oid)
    assert final.state.status == orders_pb2.ORDER_STATUS_CANCELLED


@pytest.fixture
async def r3_store(nats_cluster: Any) -> AsyncIterator[EventStore]:
    nc = await _client.connect(nats_cluster.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    name = f"ES_STALE_{uuid.uuid4().hex[:8]}"
    es = EventStore(nc, EventStoreConfig(stream=name, prefix=name.lower(), replicas=3))
    await es.ensure()
    yield es
    try:
        await es.js.delete_stream(name)
    finally:
        await nc.close()


@pytest.mark.cluster
async def test_on_r3_every_node_sees_what_the_leader_acknowledged(
    r3_store: EventStore, nats_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Written through one connection, read consistently through one to each node.
    agg = uuid.uuid4().hex[:12]
    r = await r3_store.append(
        "acct", agg, [events_pb2.OrderCreated(order_id=agg), paid(1), paid(2)], expected=Version()
    )
    for i in range(3):
        nc = await _client.connect(nats_cluster.urls[i], max_reconnect_attempts=0)
        try:
            other = EventStore(nc, r3_store.config)
            assert await other.leader_version("acct", agg) == r.version
            tail = await other.read_from_leader(
                "acct", agg, after=Version(), through_seq=r.version.seq
            )
            assert [e.event_id for e in tail] == [e.event_id for e in r.events]
            loaded = await Repository(other, "acct", Account).load(agg, consistent=True)
            assert (loaded.state.total, loaded.version) == (3, r.version)
        finally:
            await nc.close()
    # Appends through any node decide on the leader's version (one request, as before).
    for i in range(3):
        nc = await _client.connect(nats_cluster.urls[i], max_reconnect_attempts=0)
        try:
            other = EventStore(nc, r3_store.config)
            assert other._on_cluster()
            calls = counting(other, monkeypatch, "_leader_get", "_direct_last")
            v = 3 + 2 * i
            done = await other.append("acct", agg, [paid(10)], expected=v)
            assert done.version.number == v + 1
            done = await other.append("acct", agg, [paid(10)], expected=None)
            assert done.version.number == v + 2
            assert calls == {"_leader_get": 2, "_direct_last": 0}
            monkeypatch.undo()
            with pytest.raises(AggregateConflict):
                await other.append("acct", agg, [paid(10)], expected=v + 1)
        finally:
            await nc.close()
