"""The shop's reservation and shipment steps answer their first decision for an order,
whatever happened since, and change nothing on a repeat: that is what lets them run
with no inbox record (``idempotent=True``). The gRPC API keeps its own answers."""

from __future__ import annotations

import sqlite3

import pytest

from examples.shop import inventory, shipping
from examples.shop.gen.shop.v1 import common_pb2, shipping_pb2

pytestmark = pytest.mark.unit

ITEMS = [common_pb2.LineItem(sku="sku-1", quantity=2)]
SEOUL = common_pb2.Address(country="KR", city="Seoul")


def _inventory(available: int) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(inventory.SCHEMA)
    conn.execute("INSERT INTO stock VALUES ('sku-1', ?, 0)", (available,))
    return conn


def _stock(conn: sqlite3.Connection) -> tuple[int, int]:
    row = conn.execute("SELECT available, reserved FROM stock").fetchone()
    return int(row[0]), int(row[1])


def test_a_reservation_made_stays_the_answer_after_its_release() -> None:
    conn = _inventory(5)
    first = inventory.first_reservation(conn, "o1", ITEMS)
    assert first[0] and first[1] == ""
    assert _stock(conn) == (3, 2)
    assert inventory.release(conn, "o1") == first[0]
    assert inventory.first_reservation(conn, "o1", ITEMS) == first
    assert _stock(conn) == (5, 0)  # released once, not reserved again
    # The API still refuses a released reservation.
    assert inventory.reserve(conn, "o1", ITEMS) == (None, inventory.CANCELLED_FIRST)


def test_a_refusal_for_stock_stays_the_answer_once_stock_is_back() -> None:
    conn = _inventory(1)
    first = inventory.first_reservation(conn, "o1", ITEMS)
    assert first == (None, "out of stock: sku-1 (wanted 2, 1 available)")
    conn.execute("UPDATE stock SET available = 10")
    assert inventory.first_reservation(conn, "o1", ITEMS) == first
    assert _stock(conn) == (10, 0)
    # The API decides afresh: a caller may retry once stock is back.
    reservation_id, reason = inventory.reserve(conn, "o1", ITEMS)
    assert reservation_id and reason == ""
    assert inventory.first_reservation(conn, "o1", ITEMS) == first


def test_a_release_before_the_reservation_refuses_it_every_time() -> None:
    conn = _inventory(5)
    assert inventory.release(conn, "o1") is None  # the tombstone
    first = inventory.first_reservation(conn, "o1", ITEMS)
    assert first == (None, inventory.CANCELLED_FIRST)
    assert inventory.first_reservation(conn, "o1", ITEMS) == first
    assert _stock(conn) == (5, 0)


def test_a_committed_reservation_answers_as_made_and_takes_stock_once() -> None:
    conn = _inventory(5)
    first = inventory.first_reservation(conn, "o1", ITEMS)
    inventory.commit(conn, "o1")
    assert inventory.first_reservation(conn, "o1", ITEMS) == first
    assert _stock(conn) == (3, 0)


def _shipping() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(shipping.SCHEMA)
    return conn


def _shipment(address: common_pb2.Address = SEOUL) -> shipping_pb2.Shipment:
    return shipping_pb2.Shipment(order_id="o1", address=address)


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM shipments").fetchone()[0])


def test_a_scheduled_shipment_stays_the_answer_after_its_cancellation() -> None:
    conn = _shipping()
    first, reason = shipping.first_schedule(conn, _shipment())
    assert first is not None and reason == ""
    shipping.cancel(conn, "o1")
    again, reason = shipping.first_schedule(conn, _shipment())
    assert again is not None and reason == ""
    assert again.shipment_id == first.shipment_id
    assert again.status == shipping_pb2.SHIPMENT_STATUS_CANCELLED
    assert _count(conn) == 1
    # The API still refuses a cancelled order.
    assert shipping.schedule(conn, _shipment()) == (None, "order was cancelled")


def test_a_cancellation_first_or_a_refused_address_answers_the_same_every_time() -> None:
    cancelled = _shipping()
    shipping.cancel(cancelled, "o1")
    assert shipping.first_schedule(cancelled, _shipment()) == (None, "order was cancelled")
    assert shipping.first_schedule(cancelled, _shipment()) == (None, "order was cancelled")
    assert _count(cancelled) == 1

    refused = _shipping()
    nowhere = common_pb2.Address(country="")
    first = shipping.first_schedule(refused, _shipment(nowhere))
    assert first == (None, "cannot ship to country ''")
    shipping.cancel(refused, "o1")
    assert shipping.first_schedule(refused, _shipment(nowhere)) == first
