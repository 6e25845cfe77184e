"""The seed's order saga (§8.3, §8.4) as an orchestrated state machine.

    PENDING --CREATE_ORDER--> ORDER_CREATED --RESERVE_STOCK_SUCCESS--> STOCK_RESERVED
    ORDER_CREATED --RESERVE_STOCK_FAILURE--> CANCELLING_ORDER --ORDER_CANCELLED--> FAILED
    STOCK_RESERVED --PROCESS_PAYMENT_SUCCESS--> PAYMENT_COMPLETED --SCHEDULE_SHIPPING--> COMPLETED
    STOCK_RESERVED --PROCESS_PAYMENT_FAILURE--> RELEASING_STOCK --STOCK_RELEASED--> CANCELLING_ORDER

Each state sends one command when the saga enters it (create the order,
reserve stock, charge, schedule shipping, notify; and the compensations
release stock and cancel the order). The participants below are small
in-memory services except ``order``, which is the event-sourced Order aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from examples.es_orders.domain import AGGREGATE, ORDER_CODEC, Order
from examples.shop.gen.shop.v1 import (
    common_pb2,
    events_pb2,
    inventory_pb2,
    notification_pb2,
    orders_pb2,
    payment_pb2,
    shipping_pb2,
)
from meshkit.saga.commands import CommandContext, CommandParticipant
from meshkit.saga.eventstore import EventStore, Repository
from meshkit.saga.machine import Command, SagaContext, SagaMachine, State
from meshkit.saga.snapshots import SnapshotStore


def _created(ctx: SagaContext) -> events_pb2.OrderCreated:
    msg = ctx.replies["CREATE_ORDER"]
    assert isinstance(msg, events_pb2.OrderCreated)
    return msg


def _create_order(ctx: SagaContext) -> Message:
    req = orders_pb2.CreateOrderRequest()
    req.CopyFrom(ctx.start)
    req.request_id = ctx.saga_id
    return req


def _reserve(ctx: SagaContext) -> Message:
    o = _created(ctx)
    return inventory_pb2.ReserveStockRequest(order_id=o.order_id, items=o.items)


def _charge(ctx: SagaContext) -> Message:
    o = _created(ctx)
    return payment_pb2.ChargeRequest(
        order_id=o.order_id, customer_id=o.customer_id, amount=o.total, idempotency_key=ctx.saga_id
    )


def _release(ctx: SagaContext) -> Message:
    r = ctx.replies["RESERVE_STOCK_SUCCESS"]
    assert isinstance(r, events_pb2.StockReserved)
    return inventory_pb2.ReleaseStockRequest(
        reservation_id=r.reservation_id, reason="payment failed"
    )


def _cancel(ctx: SagaContext) -> Message:
    o = _created(ctx)
    failure = ctx.replies.get("PROCESS_PAYMENT_FAILURE") or ctx.replies.get("RESERVE_STOCK_FAILURE")
    reason = getattr(failure, "reason", "") or "saga failed"
    return orders_pb2.CancelOrderRequest(name=f"orders/{o.order_id}", reason=reason)


def _ship(ctx: SagaContext) -> Message:
    o = _created(ctx)
    return shipping_pb2.ScheduleShipmentRequest(
        shipment=shipping_pb2.Shipment(order_id=o.order_id, address=o.shipping_address)
    )


def _complete(ctx: SagaContext) -> Message:
    o = _created(ctx)
    return orders_pb2.UpdateOrderRequest(
        order=orders_pb2.Order(order_id=o.order_id, status=orders_pb2.ORDER_STATUS_COMPLETED),
        update_mask=field_mask_pb2.FieldMask(paths=["status"]),
    )


def _notify(ctx: SagaContext) -> Message:
    o = _created(ctx)
    return notification_pb2.SendNotificationRequest(
        customer_id=o.customer_id, order_id=o.order_id, message="your order is on its way"
    )


ORDER_SAGA = SagaMachine(
    name="order",
    initial="PENDING",
    start_type=orders_pb2.CreateOrderRequest,
    events={
        "CREATE_ORDER": events_pb2.OrderCreated,
        "RESERVE_STOCK_SUCCESS": events_pb2.StockReserved,
        "RESERVE_STOCK_FAILURE": events_pb2.StockReservationFailed,
        "PROCESS_PAYMENT_SUCCESS": events_pb2.PaymentCompleted,
        "PROCESS_PAYMENT_FAILURE": events_pb2.PaymentFailed,
        "STOCK_RELEASED": events_pb2.StockReleased,
        "ORDER_CANCELLED": events_pb2.OrderCancelled,
        "SCHEDULE_SHIPPING": events_pb2.ShipmentScheduled,
    },
    states={
        "PENDING": State(
            command=Command("order", _create_order, "CreateOrder"),
            on={"CREATE_ORDER": "ORDER_CREATED"},
        ),
        "ORDER_CREATED": State(
            command=Command("inventory", _reserve, "ReserveStock"),
            on={
                "RESERVE_STOCK_SUCCESS": "STOCK_RESERVED",
                "RESERVE_STOCK_FAILURE": "CANCELLING_ORDER",
            },
        ),
        "STOCK_RESERVED": State(
            command=Command("payment", _charge, "Charge"),
            on={
                "PROCESS_PAYMENT_SUCCESS": "PAYMENT_COMPLETED",
                "PROCESS_PAYMENT_FAILURE": "RELEASING_STOCK",
            },
        ),
        "RELEASING_STOCK": State(
            command=Command("inventory", _release, "ReleaseStock"),
            on={"STOCK_RELEASED": "CANCELLING_ORDER"},
            compensation=True,
        ),
        "CANCELLING_ORDER": State(
            command=Command("order", _cancel, "CancelOrder"),
            on={"ORDER_CANCELLED": "FAILED"},
            compensation=True,
        ),
        "PAYMENT_COMPLETED": State(
            command=Command("shipping", _ship, "ScheduleShipment"),
            on={"SCHEDULE_SHIPPING": "COMPLETED"},
        ),
        # The seed's machine ends here; §8.3's last step (notify) and marking the
        # order completed are this state's two entry commands.
        "COMPLETED": State(
            commands=(
                Command("order", _complete, "CompleteOrder"),
                Command("notification", _notify, "SendNotification"),
            ),
            final=True,
            succeeded=True,
        ),
        "FAILED": State(final=True),
    },
)


@dataclass
class Shop:
    """The in-memory side of the example's participants (and what tests count)."""

    stock: dict[str, int] = field(default_factory=dict)
    reservations: dict[str, dict[str, int]] = field(default_factory=dict)
    charges: dict[str, int] = field(default_factory=dict)
    credit_limit: int = 100_000
    shipments: dict[str, str] = field(default_factory=dict)
    notified: list[str] = field(default_factory=list)
    received: list[tuple[str, str, str]] = field(
        default_factory=list
    )  # (participant, command, saga)


def participants(
    shop: Shop, store: EventStore, snapshots: SnapshotStore | None = None
) -> list[CommandParticipant]:
    """The five participants of the order saga, in orchestration mode."""
    orders = Repository(
        store,
        AGGREGATE,
        Order,
        snapshots=snapshots,
        snapshot_every=50 if snapshots else 0,
        codec=ORDER_CODEC if snapshots else None,
    )
    order = CommandParticipant("order")
    inventory = CommandParticipant("inventory")
    payment = CommandParticipant("payment")
    shipping = CommandParticipant("shipping")
    notification = CommandParticipant("notification")

    def seen(part: str, cmd: Message, ctx: CommandContext) -> None:
        shop.received.append((part, type(cmd).__name__, ctx.saga_id))

    @order.handles(orders_pb2.CreateOrderRequest)
    async def create(cmd: orders_pb2.CreateOrderRequest, ctx: CommandContext) -> Message:
        seen("order", cmd, ctx)
        order_id = f"o-{ctx.saga_id}"
        loaded = await orders.execute(
            order_id, lambda o: o.create(cmd), saga_id=ctx.saga_id, causation_id=ctx.command_id
        )
        o = loaded.state
        return events_pb2.OrderCreated(
            order_id=order_id,
            customer_id=o.customer_id,
            items=o.items,
            total=o.total,
            shipping_address=o.address,
        )

    @order.handles(orders_pb2.CancelOrderRequest)
    async def cancel(cmd: orders_pb2.CancelOrderRequest, ctx: CommandContext) -> Message:
        seen("order", cmd, ctx)
        order_id = cmd.name.removeprefix("orders/")
        await orders.execute(
            order_id,
            lambda o: o.cancel(cmd.reason),
            saga_id=ctx.saga_id,
            causation_id=ctx.command_id,
        )
        return events_pb2.OrderCancelled(order_id=order_id, reason=cmd.reason)

    @order.handles(orders_pb2.UpdateOrderRequest)
    async def complete(cmd: orders_pb2.UpdateOrderRequest, ctx: CommandContext) -> Message:
        seen("order", cmd, ctx)
        order_id = cmd.order.order_id
        await orders.execute(
            order_id, lambda o: o.complete(), saga_id=ctx.saga_id, causation_id=ctx.command_id
        )
        return events_pb2.OrderCompleted(order_id=order_id)

    @inventory.handles(inventory_pb2.ReserveStockRequest)
    async def reserve(cmd: inventory_pb2.ReserveStockRequest, ctx: CommandContext) -> Message:
        seen("inventory", cmd, ctx)
        rid = f"r-{cmd.order_id}"
        if rid not in shop.reservations:
            short = [i.sku for i in cmd.items if shop.stock.get(i.sku, 0) < i.quantity]
            if short:
                return events_pb2.StockReservationFailed(
                    order_id=cmd.order_id, reason=f"out of stock: {','.join(short)}"
                )
            for i in cmd.items:
                shop.stock[i.sku] -= i.quantity
            shop.reservations[rid] = {i.sku: i.quantity for i in cmd.items}
        return events_pb2.StockReserved(order_id=cmd.order_id, reservation_id=rid, items=cmd.items)

    @inventory.handles(inventory_pb2.ReleaseStockRequest)
    async def release(cmd: inventory_pb2.ReleaseStockRequest, ctx: CommandContext) -> Message:
        seen("inventory", cmd, ctx)
        held = shop.reservations.pop(cmd.reservation_id, {})
        for sku, qty in held.items():
            shop.stock[sku] = shop.stock.get(sku, 0) + qty
        return events_pb2.StockReleased(
            order_id=cmd.reservation_id.removeprefix("r-"), reservation_id=cmd.reservation_id
        )

    @payment.handles(payment_pb2.ChargeRequest)
    async def charge(cmd: payment_pb2.ChargeRequest, ctx: CommandContext) -> Message:
        seen("payment", cmd, ctx)
        if cmd.amount.amount_minor > shop.credit_limit:
            return events_pb2.PaymentFailed(order_id=cmd.order_id, reason="card declined")
        shop.charges.setdefault(cmd.idempotency_key, cmd.amount.amount_minor)
        return events_pb2.PaymentCompleted(
            order_id=cmd.order_id, payment_id=f"p-{cmd.idempotency_key}", amount=cmd.amount
        )

    @shipping.handles(shipping_pb2.ScheduleShipmentRequest)
    async def ship(cmd: shipping_pb2.ScheduleShipmentRequest, ctx: CommandContext) -> Message:
        seen("shipping", cmd, ctx)
        sid = f"s-{cmd.shipment.order_id}"
        shop.shipments[sid] = cmd.shipment.order_id
        return events_pb2.ShipmentScheduled(order_id=cmd.shipment.order_id, shipment_id=sid)

    @notification.handles(notification_pb2.SendNotificationRequest)
    async def notify(cmd: notification_pb2.SendNotificationRequest, ctx: CommandContext) -> Message:
        seen("notification", cmd, ctx)
        shop.notified.append(cmd.order_id)
        return events_pb2.CustomerNotified(
            order_id=cmd.order_id, notification_id=f"n-{cmd.order_id}"
        )

    return [order, inventory, payment, shipping, notification]


def order_request(customer: str, *items: tuple[str, int, int]) -> orders_pb2.CreateOrderRequest:
    """A CreateOrderRequest of (sku, quantity, unit price) items."""
    return orders_pb2.CreateOrderRequest(
        customer_id=customer,
        items=[
            common_pb2.LineItem(
                sku=s, quantity=q, unit_price=common_pb2.Money(currency="KRW", amount_minor=p)
            )
            for s, q, p in items
        ],
        shipping_address=common_pb2.Address(name=customer, city="Seoul", country="KR"),
    )
