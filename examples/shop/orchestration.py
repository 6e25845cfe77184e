"""The shop's order saga as an orchestrated state machine (``SHOP_MODE=orchestrated``).

The same business flow as the choreography (``flow.py``), but one coordinator,
the :class:`~meshkit.saga.orchestrator.Orchestrator` (run by the order
service), sends each participant a command and moves on when it replies::

    PENDING --CREATE_ORDER--> ORDER_CREATED --RESERVE_STOCK_SUCCESS--> STOCK_RESERVED
    ORDER_CREATED --RESERVE_STOCK_FAILURE--> CANCELLING_ORDER --ORDER_CANCELLED--> FAILED
    STOCK_RESERVED --PROCESS_PAYMENT_SUCCESS--> PAYMENT_COMPLETED --SCHEDULE_SHIPPING--> COMPLETED
    STOCK_RESERVED --PROCESS_PAYMENT_FAILURE--> RELEASING_STOCK --STOCK_RELEASED--> CANCELLING_ORDER
    PAYMENT_COMPLETED --SHIPPING_FAILURE--> REFUNDING_PAYMENT --PAYMENT_REFUNDED--> RELEASING_STOCK

This is the seed's §8.4 machine plus the shop's fourth path (shipping failure).
Entering COMPLETED completes the order, commits the stock and notifies the
customer; entering FAILED notifies the customer.

Each service answers its commands with the same local functions its
choreographed handlers use; :func:`once` records every reply through the
service's inbox in the same SQLite transaction as the effect, so a redelivered
command repeats the recorded reply instead of the effect.
"""

from __future__ import annotations

import sqlite3
import weakref
from collections.abc import Awaitable, Callable

from google.protobuf import field_mask_pb2, message_factory
from google.protobuf.descriptor_pool import Default as default_pool
from google.protobuf.message import Message

from examples.shop._service import ServiceContext
from examples.shop.flow import SHOP_ORCH, consumer_spec
from examples.shop.gen.shop.v1 import (
    events_pb2,
    inventory_pb2,
    notification_pb2,
    orders_pb2,
    payment_pb2,
    shipping_pb2,
)
from examples.shop.store import Store
from meshkit.saga import Outbound, SqliteInbox
from meshkit.saga.commands import CommandContext, CommandParticipant
from meshkit.saga.envelope import type_name
from meshkit.saga.machine import Command, SagaContext, SagaMachine, State
from meshkit.saga.streams import ConsumerSpec

# The command side's inbox per store (made at start-up by serve_commands, before any
# transaction can be open on the connection).
_INBOXES: weakref.WeakKeyDictionary[Store, SqliteInbox] = weakref.WeakKeyDictionary()


def _created(ctx: SagaContext) -> events_pb2.OrderCreated:
    msg = ctx.replies["CREATE_ORDER"]
    assert isinstance(msg, events_pb2.OrderCreated)
    return msg


def _create_order(ctx: SagaContext) -> Message:
    req = orders_pb2.CreateOrderRequest()
    req.CopyFrom(ctx.start)
    return req


def _reserve(ctx: SagaContext) -> Message:
    o = _created(ctx)
    return inventory_pb2.ReserveStockRequest(order_id=o.order_id, items=o.items)


def _charge(ctx: SagaContext) -> Message:
    o = _created(ctx)
    return payment_pb2.ChargeRequest(
        order_id=o.order_id,
        customer_id=o.customer_id,
        amount=o.total,
        idempotency_key=f"order/{o.order_id}",
    )


def _ship(ctx: SagaContext) -> Message:
    o = _created(ctx)
    return shipping_pb2.ScheduleShipmentRequest(
        shipment=shipping_pb2.Shipment(order_id=o.order_id, address=o.shipping_address)
    )


def _refund(ctx: SagaContext) -> Message:
    paid = ctx.replies["PROCESS_PAYMENT_SUCCESS"]
    failed = ctx.replies.get("SHIPPING_FAILURE")
    return payment_pb2.RefundRequest(
        payment_id=getattr(paid, "payment_id", ""),
        reason=f"shipping failed: {getattr(failed, 'reason', '')}",
    )


def _release(ctx: SagaContext) -> Message:
    r = ctx.replies["RESERVE_STOCK_SUCCESS"]
    assert isinstance(r, events_pb2.StockReserved)
    why = ctx.replies.get("PROCESS_PAYMENT_FAILURE") or ctx.replies.get("PAYMENT_REFUNDED")
    return inventory_pb2.ReleaseStockRequest(
        reservation_id=r.reservation_id, reason=getattr(why, "reason", "") or "saga failed"
    )


def _failure_reason(ctx: SagaContext) -> str:
    for name in (
        "RESERVE_STOCK_FAILURE",
        "PROCESS_PAYMENT_FAILURE",
        "SHIPPING_FAILURE",
        "STOCK_RELEASED",
    ):
        reason = getattr(ctx.replies.get(name), "reason", "")
        if reason:
            return str(reason)
    return "saga failed"


def _cancel(ctx: SagaContext) -> Message:
    o = _created(ctx)
    return orders_pb2.CancelOrderRequest(name=f"orders/{o.order_id}", reason=_failure_reason(ctx))


def _complete(ctx: SagaContext) -> Message:
    o = _created(ctx)
    return orders_pb2.UpdateOrderRequest(
        order=orders_pb2.Order(order_id=o.order_id, status=orders_pb2.ORDER_STATUS_COMPLETED),
        update_mask=field_mask_pb2.FieldMask(paths=["status"]),
    )


def _commit(ctx: SagaContext) -> Message:
    return inventory_pb2.CommitStockRequest(order_id=_created(ctx).order_id)


def _notify(message: str) -> Callable[[SagaContext], Message]:
    def build(ctx: SagaContext) -> Message:
        o = _created(ctx)
        text = message.format(order_id=o.order_id, reason=_failure_reason(ctx))
        return notification_pb2.SendNotificationRequest(
            customer_id=o.customer_id, order_id=o.order_id, message=text
        )

    return build


ORDER_MACHINE = SagaMachine(
    name="order",
    initial="PENDING",
    start_type=orders_pb2.CreateOrderRequest,
    events={
        "CREATE_ORDER": events_pb2.OrderCreated,
        "RESERVE_STOCK_SUCCESS": events_pb2.StockReserved,
        "RESERVE_STOCK_FAILURE": events_pb2.StockReservationFailed,
        "PROCESS_PAYMENT_SUCCESS": events_pb2.PaymentCompleted,
        "PROCESS_PAYMENT_FAILURE": events_pb2.PaymentFailed,
        "SCHEDULE_SHIPPING": events_pb2.ShipmentScheduled,
        "SHIPPING_FAILURE": events_pb2.ShipmentFailed,
        "PAYMENT_REFUNDED": events_pb2.PaymentRefunded,
        "STOCK_RELEASED": events_pb2.StockReleased,
        "ORDER_CANCELLED": events_pb2.OrderCancelled,
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
        "PAYMENT_COMPLETED": State(
            command=Command("shipping", _ship, "ScheduleShipment"),
            on={"SCHEDULE_SHIPPING": "COMPLETED", "SHIPPING_FAILURE": "REFUNDING_PAYMENT"},
        ),
        "REFUNDING_PAYMENT": State(
            command=Command("payment", _refund, "Refund"),
            on={"PAYMENT_REFUNDED": "RELEASING_STOCK"},
            compensation=True,
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
        "COMPLETED": State(
            commands=(
                Command("order", _complete, "CompleteOrder"),
                Command("inventory", _commit, "CommitStock"),
                Command("notification", _notify("Your order {order_id} is on its way."), "Notify"),
            ),
            final=True,
            succeeded=True,
        ),
        "FAILED": State(
            commands=(
                Command(
                    "notification",
                    _notify("Your order {order_id} was cancelled: {reason}."),
                    "Notify",
                ),
            ),
            final=True,
        ),
    },
)


def _decode(type_full_name: str, data: bytes) -> Message:
    cls = message_factory.GetMessageClass(default_pool().FindMessageTypeByName(type_full_name))
    msg: Message = cls()
    msg.ParseFromString(data)
    return msg


async def once(
    store: Store, ctx: CommandContext, work: Callable[[sqlite3.Connection], Message]
) -> Message:
    """Run ``work`` (the local effect, returning the reply) once per command id.

    The same inbox the choreographed handlers use (:class:`~meshkit.saga.SqliteInbox`)
    records the reply in the effect's SQLite transaction; a redelivered command gets
    the recorded reply back and changes nothing.
    """

    async def run(conn: sqlite3.Connection) -> list[Outbound]:
        reply = work(conn)
        return [Outbound(type_name(reply), ctx.command_id, reply.SerializeToString())]

    [out], _ = await _INBOXES[store].run_once(f"cmd/{ctx.command_id}", run)
    return _decode(out.event_type, out.payload)


def serve_commands(ctx: ServiceContext, participant: CommandParticipant) -> None:
    """Run ``participant`` next to the service's gRPC server (orchestrated mode)."""
    _INBOXES[ctx.store] = SqliteInbox(ctx.store.conn, ctx.store.lock)

    async def start() -> Callable[[], Awaitable[None]]:
        await participant.start(
            ctx.bus,
            SHOP_ORCH,
            spec=ConsumerSpec(ack_wait=consumer_spec().ack_wait, max_deliver=10_000),
        )
        return participant.stop

    ctx.background.append(start)
