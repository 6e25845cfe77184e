"""One scenario shared by the one-node and the R3 event store tests: every retry of an
append whose events are already stored returns exactly what the first try stored,
whatever ``expected`` the retry passes, and stores nothing."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from examples.shop.gen.shop.v1 import common_pb2, events_pb2
from meshkit.saga.eventstore import AppendResult, EventStore, Repository, Version


def paid(n: int) -> events_pb2.PaymentCompleted:
    return events_pb2.PaymentCompleted(order_id="x", amount=common_pb2.Money(amount_minor=n))


class Account:
    """A balance: the sum of its PaymentCompleted amounts."""

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self.balance = 0

    def apply_paid(self, e: events_pb2.PaymentCompleted) -> None:
        self.balance += e.amount.amount_minor


def _shape(r: AppendResult) -> tuple[Version, list[tuple[str, int, int, bytes]]]:
    return r.version, [(e.event_id, e.version, e.seq, e.data) for e in r.events]


async def _stored(store: EventStore, agg: str) -> list[tuple[str, int, int]]:
    return [(e.event_id, e.version, e.seq) for e in await store.read("acct", agg)]


async def retries_return_the_first_append(store: EventStore, size: int) -> None:
    """Appends of ``size`` events, then retries of each in every mode."""
    agg = uuid.uuid4().hex[:12]
    # Some history, so versions and sequences differ from zero and from each other.
    await store.append("acct", agg, [paid(100)], expected=Version())
    base = await store.version("acct", agg)

    def batch(tag: str) -> tuple[list[Message], list[str]]:
        return [paid(i + 1) for i in range(size)], [f"{agg}-{tag}-{i}" for i in range(size)]

    async def check(tag: str, first_expected: Any, retries: Sequence[Any]) -> None:
        events, ids = batch(tag)
        first = await store.append("acct", agg, events, expected=first_expected, event_ids=ids)
        assert not first.duplicate
        after_first = await _stored(store, agg)
        # Another writer moves the aggregate on before the retries come.
        await store.append("acct", agg, [paid(7)], expected=None)
        stored = await _stored(store, agg)
        for expected in (*retries, first.version, None):
            again = await store.append("acct", agg, events, expected=expected, event_ids=ids)
            assert _shape(again) == _shape(first), (tag, expected)
            assert again.duplicate, (tag, expected)
            assert await _stored(store, agg) == stored, (tag, expected)
        assert [e for e in stored if e[0] in ids] == [e for e in after_first if e[0] in ids]

    # Each mode for the first try, each retried with the version it was decided on
    # (a Version, a count), the version after it, and no check.
    v = base
    await check("version", v, [v, v.number])
    v = await store.version("acct", agg)
    await check("count", v.number, [v.number, v])
    await check("none", None, [])


async def a_retried_execute_applies_its_events_once(store: EventStore, cache_size: int) -> None:
    """``Repository.execute`` retried with the same event ids: the same state and version."""
    repo = Repository(store, "acct", Account, cache_size=cache_size)
    agg = uuid.uuid4().hex[:12]
    await repo.execute(agg, lambda a: [paid(5)])
    first = await repo.execute(
        agg, lambda a: [paid(10), paid(20)], event_ids=lambda i: f"{agg}-dep-{i}"
    )
    again = await repo.execute(
        agg, lambda a: [paid(10), paid(20)], event_ids=lambda i: f"{agg}-dep-{i}"
    )
    assert (again.version, again.state.balance) == (first.version, first.state.balance)
    assert first.state.balance == 35
    # A fresh repository (no cache) retrying after another write: the state the
    # first try returned, not the events applied twice.
    await Repository(store, "acct", Account).execute(agg, lambda a: [paid(1)])
    other = Repository(store, "acct", Account)
    late = await other.execute(
        agg, lambda a: [paid(10), paid(20)], event_ids=lambda i: f"{agg}-dep-{i}"
    )
    assert (late.version, late.state.balance) == (first.version, 35)
    assert (await other.load(agg)).state.balance == 36
