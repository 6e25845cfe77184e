"""Batched direct gets on one connection share one wildcard reply subscription:
many concurrent reads get their own events and add no subscription per read."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any

import nats
import pytest

from examples.shop.gen.shop.v1 import common_pb2, events_pb2
from meshkit.saga.eventstore import EventStore, EventStoreConfig, Repository, Version

pytestmark = pytest.mark.integration

AGG = "tally"
_n = itertools.count()


class Tally:
    def __init__(self, tally_id: str) -> None:
        self.tally_id = tally_id
        self.amounts: list[int] = []

    def apply_paid(self, e: events_pb2.PaymentCompleted) -> None:
        self.amounts.append(e.amount.amount_minor)


def paid(n: int) -> events_pb2.PaymentCompleted:
    return events_pb2.PaymentCompleted(order_id="x", amount=common_pb2.Money(amount_minor=n))


async def _filled(conn: Any, aggregates: int) -> tuple[EventStore, dict[str, list[str]]]:
    """A store (3 events per direct get) with aggregate i holding i + 1 events."""
    n = next(_n)
    store = EventStore(
        conn, EventStoreConfig(stream=f"ESDIRECT{n}", prefix=f"esdirect{n}", read_batch=3)
    )
    await store.ensure()
    ids: dict[str, list[str]] = {}
    for i in range(aggregates):
        agg = f"{i:02d}{uuid.uuid4().hex[:8]}"
        ids[agg] = []
        version = Version()
        for k in range(i + 1):
            r = await store.append(AGG, agg, [paid(i * 100 + k)], expected=version)
            version = r.version
            ids[agg] += [e.event_id for e in r.events]
    return store, ids


def _count_subscribes(conn: Any) -> list[str]:
    subjects: list[str] = []
    original = conn.subscribe

    async def subscribe(subject: str, *args: Any, **kw: Any) -> Any:
        subjects.append(subject)
        return await original(subject, *args, **kw)

    conn.subscribe = subscribe
    return subjects


async def test_concurrent_reads_share_one_reply_subscription(nats_server_module: Any) -> None:
    conn = await nats.connect(nats_server_module.url)
    try:
        store, ids = await _filled(conn, 12)
        repo = Repository(store, AGG, Tally)
        subs_before = len(conn._subs)
        subscribed = _count_subscribes(conn)

        async def wave() -> None:
            aggs = list(ids)
            reads = await asyncio.gather(
                *(store.read(AGG, a) for a in aggs), *(store.read(AGG, a) for a in reversed(aggs))
            )
            loads = await asyncio.gather(*(repo.load(a) for a in aggs))
            for agg, events in zip(aggs + aggs[::-1], reads, strict=True):
                assert [e.event_id for e in events] == ids[agg]
                assert [e.version for e in events] == list(range(1, len(ids[agg]) + 1))
                assert {e.aggregate_id for e in events} == {agg}
            for i, loaded in enumerate(loads):
                assert loaded.state.amounts == [i * 100 + k for k in range(i + 1)]
                assert loaded.version.number == i + 1

        await wave()
        # At most the one shared subscription (under the connection's own inbox
        # prefix), made by the first read unless an append already made it.
        assert len(subscribed) <= 1
        assert all(s.startswith(conn._inbox_prefix.decode()) for s in subscribed)
        assert all(s.endswith(".*") for s in subscribed)
        assert len(conn._subs) - subs_before == len(subscribed)
        subs_after_first_wave = len(conn._subs)
        await wave()
        firsts = await asyncio.gather(*(store.read(AGG, a, to_version=1) for a in ids))
        assert [[e.event_id for e in f] for f in firsts] == [v[:1] for v in ids.values()]
        assert len(subscribed) <= 1
        assert len(conn._subs) == subs_after_first_wave
    finally:
        await conn.close()


async def test_each_connection_gets_its_own_reply_subscription(nats_server_module: Any) -> None:
    a = await nats.connect(nats_server_module.url)
    b = await nats.connect(nats_server_module.url)
    try:
        store_a, ids = await _filled(a, 4)
        store_b = EventStore(b, store_a.config)
        subs_a, subs_b = len(a._subs), len(b._subs)
        subscribed_a, subscribed_b = _count_subscribes(a), _count_subscribes(b)
        got_a, got_b = await asyncio.gather(
            asyncio.gather(*(store_a.read(AGG, x) for x in ids)),
            asyncio.gather(*(store_b.read(AGG, x) for x in ids)),
        )
        for agg, ea, eb in zip(ids, got_a, got_b, strict=True):
            assert [e.event_id for e in ea] == [e.event_id for e in eb] == ids[agg]
        # b had not read nor written before: its reads made its own one subscription.
        assert len(subscribed_a) <= 1 and len(subscribed_b) == 1
        assert len(a._subs) - subs_a <= 1 and len(b._subs) - subs_b == 1
        assert subscribed_b[0].startswith(b._inbox_prefix.decode())
    finally:
        await a.close()
        await b.close()
