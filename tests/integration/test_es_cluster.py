"""The event store on replicated (R3) streams of a 3-node cluster: racing writers,
concurrent unconditional appends, retried appends, and appends across a SIGKILL of
the stream leader."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from examples.shop.gen.shop.v1 import events_pb2
from meshkit.saga import _client
from meshkit.saga.eventstore import AggregateConflict, EventStore, EventStoreConfig, Version
from tests.integration._es_retries import (
    a_retried_execute_applies_its_events_once,
    retries_return_the_first_append,
)

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


def _event(n: int) -> events_pb2.OrderCreated:
    return events_pb2.OrderCreated(order_id=f"o-{n}", customer_id=f"c-{n}")


@pytest.fixture
async def store(nats_cluster: Any) -> AsyncIterator[EventStore]:
    """An event store on a fresh R3 stream of the module's cluster."""
    nc = await _client.connect(nats_cluster.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    name = f"ES_R3_{uuid.uuid4().hex[:8]}"
    es = EventStore(nc, EventStoreConfig(stream=name, prefix=name.lower(), replicas=3))
    await es.ensure()
    info = await es.js.stream_info(name)
    assert info.config.num_replicas == 3
    yield es
    try:
        await es.js.delete_stream(name)
    finally:
        await nc.close()


async def test_racing_writers_at_one_version_give_one_success_and_a_conflict(
    store: EventStore,
) -> None:
    for round_ in range(10):
        agg = f"race-{round_}"
        first = await store.append("tally", agg, [_event(0)], expected=Version())
        results = await asyncio.gather(
            store.append("tally", agg, [_event(1)], expected=first.version),
            store.append("tally", agg, [_event(2)], expected=first.version),
            return_exceptions=True,
        )
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1, results
        assert len(lost) == 1 and isinstance(lost[0], AggregateConflict), results
        assert (await store.version("tally", agg)).number == 2


@pytest.mark.parametrize("size", [1, 3])
async def test_every_retry_of_a_stored_append_returns_what_the_first_try_stored(
    store: EventStore, size: int
) -> None:
    await retries_return_the_first_append(store, size)
    await a_retried_execute_applies_its_events_once(store, cache_size=0)


async def test_concurrent_unconditional_appends_all_succeed_with_contiguous_versions(
    store: EventStore,
) -> None:
    results = await asyncio.gather(
        *(store.append("tally", "many", [_event(i)], expected=None) for i in range(20))
    )
    assert sorted(r.version.number for r in results) == list(range(1, 21))
    stored = await store.read("tally", "many")
    assert [e.version for e in stored] == list(range(1, 21))
    assert sorted(e.event_id for e in stored) == sorted(r.events[0].event_id for r in results)


async def test_appends_ride_out_a_sigkill_of_the_stream_leader(
    store: EventStore, nats_cluster: Any
) -> None:
    """Appends every 20 ms while the stream leader is killed and restarted: every
    acknowledged event is stored once and in order, and no caller sees an error."""
    info = await store.js.stream_info(store.stream)
    assert info.cluster is not None and info.cluster.leader
    leader = nats_cluster.index_of(info.cluster.leader)
    loop = asyncio.get_running_loop()
    acked: list[str] = []
    errors: list[BaseException] = []
    slowest = 0.0
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal slowest
        n = 0
        while not stop.is_set():
            began = loop.time()
            try:
                result = await store.append("tally", "chaos", [_event(n)], expected=None)
                acked.append(result.events[0].event_id)
            except Exception as exc:  # the test's point: there must be none
                errors.append(exc)
            slowest = max(slowest, loop.time() - began)
            n += 1
            await asyncio.sleep(0.02)

    task = asyncio.create_task(writer())
    try:
        await asyncio.sleep(1.0)
        before = len(acked)
        killed_at = loop.time()
        await asyncio.to_thread(nats_cluster.kill, leader)
        # Until appends flow again (a new leader), bounded well inside the retry window.
        while len(acked) < before + 10 and loop.time() - killed_at < 20:
            await asyncio.sleep(0.05)
        stall = loop.time() - killed_at
        await asyncio.to_thread(nats_cluster.restart, leader)
        restarted = len(acked)
        while len(acked) < restarted + 25 and loop.time() - killed_at < 30:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        if not nats_cluster.nodes[leader].running:
            await asyncio.to_thread(nats_cluster.restart, leader)
    print(
        f"\nleader {nats_cluster.names[leader]} killed: {len(acked)} appends, "
        f"appends flowing again after {stall:.2f}s, slowest append {slowest:.2f}s"
    )
    assert not errors, errors[:3]
    assert len(acked) >= before + 35
    stored = await store.read("tally", "chaos")
    assert [e.event_id for e in stored] == acked  # each once, in the order acknowledged
    assert [e.version for e in stored] == list(range(1, len(stored) + 1))
    new = (await store.js.stream_info(store.stream)).cluster
    assert new is not None and new.leader in nats_cluster.names
