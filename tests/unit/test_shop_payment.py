"""The shop's charge is idempotent by construction: a repeat answers as the first run
did, whatever happened to the payment since, and charges once (no inbox record needed)."""

from __future__ import annotations

import sqlite3

import pytest

from examples.shop.gen.shop.v1 import common_pb2
from examples.shop.gen.shop.v1 import events_pb2 as ev
from examples.shop.payment import SCHEMA, charge, charge_outcome, refund

pytestmark = pytest.mark.unit

TOTAL = common_pb2.Money(currency="KRW", amount_minor=15000)


def _db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(SCHEMA)
    return conn


def _ledger(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    return [(str(k), int(a)) for k, a in conn.execute("SELECT kind, amount_minor FROM ledger")]


def _outcome(conn: sqlite3.Connection, customer: str = "c-1") -> object:
    return charge_outcome(charge(conn, "o1", customer, TOTAL, "order/o1"), customer)


def test_a_repeat_after_a_refund_answers_as_the_first_charge_did() -> None:
    conn = _db()
    first = _outcome(conn)
    assert isinstance(first, ev.PaymentCompleted)
    assert refund(conn, "o1") == first.payment_id
    again = _outcome(conn)
    assert again == first  # the same event, not PaymentFailed for a refunded payment
    assert _ledger(conn) == [("charge", 15000), ("refund", 15000)]  # charged once


def test_a_repeat_of_a_decline_or_of_a_cancellation_first_answers_the_same() -> None:
    declined = _db()
    first = _outcome(declined, "declined-bob")
    assert isinstance(first, ev.PaymentFailed) and first.reason == "card declined"
    assert _outcome(declined, "declined-bob") == first
    assert _ledger(declined) == []

    cancelled = _db()
    assert refund(cancelled, "o1") is None  # the cancellation came before any charge
    first = _outcome(cancelled)
    assert isinstance(first, ev.PaymentFailed)
    assert _outcome(cancelled) == first
    assert _ledger(cancelled) == []
