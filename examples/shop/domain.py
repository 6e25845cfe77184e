"""The Order aggregate: its state is the fold of its events.

The one definition, used by the shop's order service (event-sourced in the saga
stream ``SHOP``, on ``shop_orders.>``) and by ``examples/es_orders``.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import Message

from examples.shop.gen.shop.v1 import common_pb2, events_pb2, orders_pb2
from meshkit.errors import MeshkitError
from meshkit.saga.eventstore import StateCodec

AGGREGATE = "order"


class OrderRejected(MeshkitError):
    """A command the order's current state does not allow."""

    code = "FAILED_PRECONDITION"


class Order:
    """An order; ``apply_*`` methods are the only way its state changes."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        self.customer_id = ""
        self.items: list[common_pb2.LineItem] = []
        self.total = common_pb2.Money()
        self.address = common_pb2.Address()
        self.status = orders_pb2.ORDER_STATUS_PENDING
        self.cancel_reason = ""
        self.created = False

    def __deepcopy__(self, memo: dict[int, object]) -> Order:
        """What ``Repository`` copies a cached order with before a command (see its
        docstring), cheaper than ``copy.deepcopy``'s walk: the messages the ``apply_*``
        methods change in place are copied, the line items (only ever replaced,
        never changed) are shared."""
        new = Order.__new__(Order)
        new.__dict__.update(self.__dict__)
        new.items = list(self.items)
        new.total = common_pb2.Money()
        new.total.CopyFrom(self.total)
        new.address = common_pb2.Address()
        new.address.CopyFrom(self.address)
        return new

    # -- events -> state --------------------------------------------------

    def apply_created(self, e: events_pb2.OrderCreated) -> None:
        self.created = True
        self.customer_id = e.customer_id
        self.items = list(e.items)
        self.total.CopyFrom(e.total)
        self.address.CopyFrom(e.shipping_address)
        self.status = orders_pb2.ORDER_STATUS_CREATED

    def apply_completed(self, e: events_pb2.OrderCompleted) -> None:
        self.status = orders_pb2.ORDER_STATUS_COMPLETED

    def apply_cancelled(self, e: events_pb2.OrderCancelled) -> None:
        self.status = orders_pb2.ORDER_STATUS_CANCELLED
        self.cancel_reason = e.reason

    # -- commands -> events (pure: Repository.execute may run them twice) --

    def create(self, req: orders_pb2.CreateOrderRequest) -> Sequence[Message]:
        if self.created:
            return []  # idempotent: the same order again
        if not req.items:
            raise OrderRejected("an order needs at least one item")
        total = sum(i.unit_price.amount_minor * i.quantity for i in req.items)
        currency = req.items[0].unit_price.currency
        return [
            events_pb2.OrderCreated(
                order_id=self.order_id,
                customer_id=req.customer_id,
                items=req.items,
                total=common_pb2.Money(currency=currency, amount_minor=total),
                shipping_address=req.shipping_address,
            )
        ]

    def complete(self) -> Sequence[Message]:
        if self.status == orders_pb2.ORDER_STATUS_COMPLETED:
            return []
        if self.status != orders_pb2.ORDER_STATUS_CREATED:
            raise OrderRejected(
                f"order {self.order_id} is {orders_pb2.OrderStatus.Name(self.status)}"
            )
        return [events_pb2.OrderCompleted(order_id=self.order_id, customer_id=self.customer_id)]

    def cancel(self, reason: str) -> Sequence[Message]:
        if self.status == orders_pb2.ORDER_STATUS_CANCELLED:
            return []
        if self.status == orders_pb2.ORDER_STATUS_COMPLETED:
            raise OrderRejected(f"order {self.order_id} is already completed")
        return [
            events_pb2.OrderCancelled(
                order_id=self.order_id, reason=reason, customer_id=self.customer_id
            )
        ]

    # -- the read shape ---------------------------------------------------

    def to_proto(self) -> orders_pb2.Order:
        return orders_pb2.Order(
            order_id=self.order_id,
            customer_id=self.customer_id,
            items=self.items,
            total=self.total,
            status=self.status,
            shipping_address=self.address,
            cancel_reason=self.cancel_reason,
        )


def _dump(order: Order) -> bytes:
    return order.to_proto().SerializeToString()


def _load(order_id: str, data: bytes) -> Order:
    msg = orders_pb2.Order()
    msg.ParseFromString(data)
    order = Order(order_id)
    order.customer_id = msg.customer_id
    order.items = list(msg.items)
    order.total.CopyFrom(msg.total)
    order.address.CopyFrom(msg.shipping_address)
    order.status = msg.status
    order.cancel_reason = msg.cancel_reason
    order.created = msg.status != orders_pb2.ORDER_STATUS_PENDING
    return order


ORDER_CODEC: StateCodec[Order] = StateCodec(dump=_dump, load=_load, schema=1)
