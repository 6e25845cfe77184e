"""Decisions never rest on a stale read: a replica behind the stream leader may answer
direct gets, so a command that decides to write nothing (or refuses) confirms the
state with the leader first, and the shop's order participant never acknowledges an
event for an order it cannot find. The lagging replica is simulated on one node (a
read that misses the newest events) so the tests are deterministic; the leader reads
themselves also run on an R3 stream."""

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
from meshkit.saga.eventstore import EventStore, EventStoreConfig, Repository, Version
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
    """Make the store's direct reads answer like a replica ``missing`` events behind."""
    real = store.read

    async def behind(*args: Any, **kwargs: Any) -> Any:
        return (await real(*args, **kwargs))[:-missing] or []

    monkeypatch.setattr(store, "read", behind)


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
    r3_store: EventStore, nats_cluster: Any
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
