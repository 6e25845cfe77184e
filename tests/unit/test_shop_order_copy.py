"""The shop's Order copies cheaply for the repository's cache, and a copy is independent."""

from __future__ import annotations

import copy

import pytest

from examples.shop.domain import Order
from examples.shop.gen.shop.v1 import common_pb2, orders_pb2
from examples.shop.gen.shop.v1 import events_pb2 as ev

pytestmark = pytest.mark.unit


def test_a_copied_order_changes_without_changing_the_original() -> None:
    order = Order("o1")
    order.apply_created(
        ev.OrderCreated(
            order_id="o1",
            customer_id="c1",
            items=[common_pb2.LineItem(sku="book", quantity=2)],
            total=common_pb2.Money(currency="EUR", amount_minor=200),
            shipping_address=common_pb2.Address(country="DE"),
        )
    )
    twin = copy.deepcopy(order)
    assert twin.to_proto() == order.to_proto()
    twin.apply_cancelled(ev.OrderCancelled(order_id="o1", reason="r"))
    twin.total.amount_minor = 1
    twin.address.country = "FR"
    twin.items.append(common_pb2.LineItem(sku="pen", quantity=1))
    assert order.status == orders_pb2.ORDER_STATUS_CREATED and order.cancel_reason == ""
    assert order.total.amount_minor == 200 and order.address.country == "DE"
    assert [i.sku for i in order.items] == ["book"]
