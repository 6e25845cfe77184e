"""Repository(cache_size=N) on a real nats-server: commands decide on the state the
repository wrote without reading it back, the append's sequence check still catches
other writers, a no-op or failing decision on a stale state is confirmed on the
stored one, the cache is LRU-bounded, and one process's commands on one aggregate
are serialized."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import nats
import pytest

from examples.shop.gen.shop.v1 import common_pb2, events_pb2
from meshkit.errors import ConfigError
from meshkit.saga.eventstore import EventStore, EventStoreConfig, Repository, Version

pytestmark = pytest.mark.integration

AGG = "account"


class Account:
    """A test aggregate: opened or not, a running total, and the log of what happened."""

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self.opened = False
        self.total = 0
        self.log: list[Any] = []

    def apply_opened(self, e: events_pb2.OrderCreated) -> None:
        self.opened = True
        self.log.append("opened")

    def apply_paid(self, e: events_pb2.PaymentCompleted) -> None:
        self.total += e.amount.amount_minor
        self.log.append(e.amount.amount_minor)

    def apply_note(self, e: events_pb2.OrderCancelled) -> None:
        self.log.append(f"note:{e.reason}")


def paid(n: int) -> events_pb2.PaymentCompleted:
    return events_pb2.PaymentCompleted(order_id="x", amount=common_pb2.Money(amount_minor=n))


def opened() -> events_pb2.OrderCreated:
    return events_pb2.OrderCreated(customer_id="c")


def note(reason: str) -> events_pb2.OrderCancelled:
    return events_pb2.OrderCancelled(reason=reason)


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def count_loads(repo: Repository[Any]) -> list[str]:
    """Record the aggregate id of every ``repo.load`` from now on."""
    calls: list[str] = []
    original = repo.load

    async def load(aggregate_id: str, **kw: Any) -> Any:
        calls.append(aggregate_id)
        return await original(aggregate_id, **kw)

    repo.load = load  # type: ignore[method-assign]
    return calls


@pytest.fixture
async def store(nc: Any) -> EventStore:
    s = EventStore(nc, EventStoreConfig(stream="ESCACHE", prefix="escache"))
    await s.ensure()
    return s


async def _stored(store: EventStore, agg: str) -> list[Any]:
    return await store.read(AGG, agg)


async def test_second_execute_decides_on_the_cached_state_without_a_read(
    store: EventStore,
) -> None:
    repo = Repository(store, AGG, Account, cache_size=8)
    loads = count_loads(repo)
    agg = new_id()
    first = await repo.execute(agg, lambda a: [opened(), paid(5)])
    assert loads == [agg]  # nothing cached yet: the first command reads
    assert repo.cache_hits == 0
    assert first.version.number == 2
    seen: list[tuple[bool, int]] = []

    def decide(a: Account) -> list[Any]:
        seen.append((a.opened, a.total))
        return [paid(7)]

    second = await repo.execute(agg, decide)
    assert loads == [agg]  # no second read
    assert repo.cache_hits == 1
    assert seen == [(True, 5)]  # decided on the state the first command wrote
    assert second.version.number == 3
    assert second.state.total == 12 and second.state.log == ["opened", 5, 7]
    events = await _stored(store, agg)
    assert [e.version for e in events] == [1, 2, 3]
    assert second.version == Version(3, events[-1].seq)
    # A fresh repository replays to the same state.
    fresh = await Repository(store, AGG, Account).load(agg)
    assert fresh.version == second.version and fresh.state.log == ["opened", 5, 7]


@pytest.mark.parametrize("other", ["repository", "raw_append"])
async def test_another_writer_in_between_is_caught_and_the_command_reruns(
    nats_server_module: Any, store: EventStore, other: str
) -> None:
    agg = new_id()
    repo = Repository(store, AGG, Account, cache_size=8)
    await repo.execute(agg, lambda a: [opened()])
    await repo.execute(agg, lambda a: [paid(1)])
    conn = await nats.connect(nats_server_module.url)
    try:
        other_store = EventStore(conn, store.config)
        if other == "repository":
            await Repository(other_store, AGG, Account).execute(agg, lambda a: [paid(10)])
        else:
            await other_store.append(AGG, agg, [paid(10)], expected=None)
    finally:
        await conn.close()
    loads = count_loads(repo)
    decided_on: list[int] = []

    def decide(a: Account) -> list[Any]:
        decided_on.append(a.total)
        return [paid(100)]

    result = await repo.execute(agg, decide, retries=3)
    # First on the cached (stale) total 1, refused; then on the stored total 11.
    assert decided_on == [1, 11]
    assert loads == [agg]
    assert result.version.number == 4
    assert result.state.total == 111 and result.state.log == ["opened", 1, 10, 100]
    events = await _stored(store, agg)
    assert [e.version for e in events] == [1, 2, 3, 4]
    assert len({e.event_id for e in events}) == 4
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert result.version.seq == events[-1].seq
    # The reloaded state went back into the cache: the next command needs no read.
    hits = repo.cache_hits
    after = await repo.execute(agg, lambda a: [paid(1000)])
    assert loads == [agg] and repo.cache_hits == hits + 1
    assert after.version.number == 5 and after.state.total == 1111


@pytest.mark.parametrize("stale_decision", ["no_op", "raises"])
async def test_a_no_op_or_failing_decision_on_a_stale_cache_is_rerun_on_the_stored_state(
    store: EventStore, stale_decision: str
) -> None:
    agg = new_id()
    repo = Repository(store, AGG, Account, cache_size=8)
    await repo.execute(agg, lambda a: [note("draft")])  # cached: not opened
    # Another writer opens the account.
    await EventStore(store.nc, store.config).append(AGG, agg, [opened()], expected=None)
    loads = count_loads(repo)
    hits = repo.cache_hits
    decided_on: list[bool] = []

    def pay_if_opened(a: Account) -> list[Any]:
        decided_on.append(a.opened)
        if not a.opened:
            if stale_decision == "raises":
                raise ValueError("account not opened")
            return []
        return [paid(9)]

    result = await repo.execute(agg, pay_if_opened)
    assert decided_on == [False, True]  # cached state, then the stored one
    assert loads == [agg]
    assert repo.cache_hits == hits  # the cached decision was not used
    assert result.version.number == 3
    assert result.state.opened and result.state.total == 9
    events = await _stored(store, agg)
    assert [e.event_type for e in events] == [
        "shop.v1.OrderCancelled",
        "shop.v1.OrderCreated",
        "shop.v1.PaymentCompleted",
    ]
    assert [e.version for e in events] == [1, 2, 3]


async def test_a_decision_that_fails_on_the_stored_state_too_raises(store: EventStore) -> None:
    agg = new_id()
    repo = Repository(store, AGG, Account, cache_size=8)
    await repo.execute(agg, lambda a: [note("draft")])
    calls = 0

    def refuse(a: Account) -> list[Any]:
        nonlocal calls
        calls += 1
        raise ValueError("never")

    with pytest.raises(ValueError, match="never"):
        await repo.execute(agg, refuse)
    assert calls == 2  # once on the cache, once on the stored state
    assert [e.version for e in await _stored(store, agg)] == [1]


async def test_the_cache_evicts_the_least_recently_written_aggregate(store: EventStore) -> None:
    repo = Repository(store, AGG, Account, cache_size=2)
    a, b, c = new_id(), new_id(), new_id()
    await repo.execute(a, lambda s: [paid(1)])
    await repo.execute(b, lambda s: [paid(1)])
    await repo.execute(a, lambda s: [paid(1)])  # a is now more recent than b
    await repo.execute(c, lambda s: [paid(1)])  # over the bound: b goes
    loads = count_loads(repo)
    ra = await repo.execute(a, lambda s: [paid(1)])
    rc = await repo.execute(c, lambda s: [paid(1)])
    assert loads == []  # a and c were still cached
    rb = await repo.execute(b, lambda s: [paid(1)])
    assert loads == [b]  # b was evicted: read back
    assert (ra.version.number, rb.version.number, rc.version.number) == (3, 2, 2)
    assert (ra.state.total, rb.state.total, rc.state.total) == (3, 2, 2)
    # b's write evicted a (c was written after a): a is read, c is not.
    await repo.execute(c, lambda s: [paid(1)])
    assert loads == [b]
    await repo.execute(a, lambda s: [paid(1)])
    assert loads == [b, a]
    assert len(repo._cache) == 2


async def test_a_negative_cache_size_is_a_config_error(store: EventStore) -> None:
    with pytest.raises(ConfigError) as err:
        Repository(store, AGG, Account, cache_size=-1)
    assert err.value.path == "repository.cache_size"
    assert "repository.cache_size" in str(err.value) and "-1" in str(err.value)


async def test_concurrent_commands_on_one_aggregate_are_serialized(store: EventStore) -> None:
    agg = new_id()
    n = 20
    repo = Repository(store, AGG, Account, cache_size=8)
    loads = count_loads(repo)
    # retries=0: any AggregateConflict among them would surface here.
    results = await asyncio.gather(
        *(repo.execute(agg, lambda a: [paid(1)], retries=0) for _ in range(n))
    )
    assert sorted(r.version.number for r in results) == list(range(1, n + 1))
    assert loads == [agg]  # only the first command read; the rest decided on the cache
    assert repo.cache_hits == n - 1
    events = await _stored(store, agg)
    assert [e.version for e in events] == list(range(1, n + 1))
    final = await Repository(store, AGG, Account).load(agg)
    assert final.version.number == n and final.state.total == n


async def test_an_earlier_result_is_not_changed_by_a_later_command(store: EventStore) -> None:
    agg = new_id()
    repo = Repository(store, AGG, Account, cache_size=8)
    first = await repo.execute(agg, lambda a: [paid(1)])
    assert (first.version.number, first.state.total) == (1, 1)
    second = await repo.execute(agg, lambda a: [paid(2)])
    assert (second.version.number, second.state.total) == (2, 3)
    # Expected (as with cache_size=0): the first result still says version 1, total 1.
    assert (first.version.number, first.state.total, first.state.log) == (1, 1, [1])
