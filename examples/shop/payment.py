"""The payment service: charges orders and refunds them as compensation.

Every charge and refund also goes to an append-only ledger, so the demo can
check that no order was ever charged twice and that every failed order's
charge was refunded.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from examples.shop import faults
from examples.shop._service import ServiceContext, main
from examples.shop.flow import (
    DECLINED_CUSTOMER_PREFIX,
    PAYMENT_LIMIT_MINOR,
    SHOP_STREAM,
    consumer_spec,
)
from examples.shop.gen.shop.v1 import common_pb2, payment_pb2, payment_pb2_grpc
from examples.shop.gen.shop.v1 import events_pb2 as ev
from examples.shop.store import Store
from meshkit.saga import Context, Participant

SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    payment_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    currency TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    status INTEGER NOT NULL,
    decline_reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_order ON payments (order_id);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id TEXT NOT NULL,
    payment_id TEXT NOT NULL,
    kind TEXT NOT NULL,  -- charge | refund
    amount_minor INTEGER NOT NULL
);
"""

CHARGED = payment_pb2.PAYMENT_STATUS_CHARGED
DECLINED = payment_pb2.PAYMENT_STATUS_DECLINED
REFUNDED = payment_pb2.PAYMENT_STATUS_REFUNDED
CANCELLED = -1  # a tombstone: the order was cancelled before any charge


def _row_to_payment(row: Any) -> payment_pb2.Payment:
    p = payment_pb2.Payment(
        payment_id=row[0],
        order_id=row[1],
        amount=common_pb2.Money(currency=row[3], amount_minor=row[4]),
        status=max(0, row[5]),
        decline_reason=row[6],
    )
    p.updated_at.FromMilliseconds(int(row[7] * 1000))
    return p


def _by_order(conn: sqlite3.Connection, order_id: str) -> Any:
    return conn.execute(
        "SELECT * FROM payments WHERE order_id = ? ORDER BY updated_at LIMIT 1", (order_id,)
    ).fetchone()


def charge(
    conn: sqlite3.Connection, order_id: str, customer_id: str, amount: common_pb2.Money, key: str
) -> payment_pb2.Payment:
    """Charge once per idempotency key and once per order; a repeat returns the first result."""
    row = conn.execute(
        "SELECT * FROM payments WHERE idempotency_key = ? OR order_id = ? ORDER BY updated_at LIMIT 1",
        (key, order_id),
    ).fetchone()
    if row is not None:
        return _row_to_payment(row)
    payment_id = uuid.uuid5(uuid.NAMESPACE_URL, f"payment/{key}").hex
    status, reason = CHARGED, ""
    if customer_id.startswith(DECLINED_CUSTOMER_PREFIX):
        status, reason = DECLINED, "card declined"
    elif amount.amount_minor > PAYMENT_LIMIT_MINOR:
        status, reason = DECLINED, f"amount {amount.amount_minor} over the limit"
    conn.execute(
        "INSERT INTO payments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            payment_id,
            order_id,
            key,
            amount.currency,
            amount.amount_minor,
            status,
            reason,
            time.time(),
        ),
    )
    if status == CHARGED:
        conn.execute(
            "INSERT INTO ledger (order_id, payment_id, kind, amount_minor) VALUES (?, ?, 'charge', ?)",
            (order_id, payment_id, amount.amount_minor),
        )
    return payment_pb2.Payment(
        payment_id=payment_id,
        order_id=order_id,
        amount=amount,
        status=status,  # type: ignore[arg-type]
        decline_reason=reason,
    )


def charge_outcome(
    payment: payment_pb2.Payment, customer_id: str, address: Any = None
) -> ev.PaymentCompleted | ev.PaymentFailed:
    """The event a charge leads to, in both saga modes: the charge's first decision,
    whatever happened to the payment since (a refunded payment was charged), so that
    a repeat of the charge answers as the first one did."""
    if payment.status not in (CHARGED, REFUNDED):
        reason = payment.decline_reason or "payment not possible"
        return ev.PaymentFailed(order_id=payment.order_id, reason=reason)
    return ev.PaymentCompleted(
        order_id=payment.order_id,
        payment_id=payment.payment_id,
        amount=payment.amount,
        customer_id=customer_id,
        shipping_address=address,
    )


def refund(conn: sqlite3.Connection, order_id: str) -> str | None:
    """Refund the order's charge; returns the payment id, or None when nothing was charged."""
    row = _by_order(conn, order_id)
    if row is None:
        conn.execute(
            "INSERT INTO payments VALUES (?, ?, NULL, '', 0, ?, 'order cancelled', ?)",
            (uuid.uuid4().hex, order_id, CANCELLED, time.time()),
        )
        return None
    if row[5] != CHARGED:
        return None
    conn.execute(
        "UPDATE payments SET status = ?, updated_at = ? WHERE payment_id = ?",
        (REFUNDED, time.time(), row[0]),
    )
    conn.execute(
        "INSERT INTO ledger (order_id, payment_id, kind, amount_minor) VALUES (?, ?, 'refund', ?)",
        (order_id, row[0], row[4]),
    )
    return str(row[0])


PARTICIPANT = Participant("payment", SHOP_STREAM, consumer=consumer_spec())


# Idempotent by construction (no inbox record): the payment row keyed by the order
# holds the charge's decision (charged, declined, or the tombstone of a cancellation
# that came first), a repeat finds it, and charge_outcome answers from it as the first
# run did (a refund since does not change what the charge decided). The refund handler
# that emits PaymentRefunded is not: rerun, it would find nothing left to refund.
@PARTICIPANT.on(ev.StockReserved, emits=[ev.PaymentCompleted, ev.PaymentFailed], idempotent=True)
async def charge_order(event: ev.StockReserved, ctx: Context) -> Any:
    payment = charge(
        ctx.tx, event.order_id, event.customer_id, event.total, f"order/{event.order_id}"
    )
    await faults.mid_handler(ctx)
    return charge_outcome(payment, event.customer_id, event.shipping_address)


@PARTICIPANT.compensate(ev.ShipmentFailed, emits=[ev.PaymentRefunded])
async def refund_after_shipping_failure(event: ev.ShipmentFailed, ctx: Context) -> Any:
    payment_id = refund(ctx.tx, event.order_id)
    await faults.mid_handler(ctx)
    # Emitted even when nothing was charged, so the compensation chain goes on.
    return ev.PaymentRefunded(
        order_id=event.order_id,
        payment_id=payment_id or "",
        reason=f"shipping failed: {event.reason}",
    )


@PARTICIPANT.compensate(ev.OrderCancelled)
async def refund_cancelled(event: ev.OrderCancelled, ctx: Context) -> None:
    # Usually already refunded or never charged; after a saga timeout this refunds.
    refund(ctx.tx, event.order_id)


class PaymentService(payment_pb2_grpc.PaymentServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    async def Charge(
        self, request: payment_pb2.ChargeRequest, context: grpc.aio.ServicerContext
    ) -> payment_pb2.Payment:
        if not request.order_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "order_id: required")
        if request.amount.amount_minor <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "amount.amount_minor: must be positive"
            )
        key = request.idempotency_key or f"order/{request.order_id}"
        async with self.store.tx() as conn:
            return charge(conn, request.order_id, request.customer_id, request.amount, key)

    async def Refund(
        self, request: payment_pb2.RefundRequest, context: grpc.aio.ServicerContext
    ) -> payment_pb2.Payment:
        rows = self.store.query(
            "SELECT order_id FROM payments WHERE payment_id = ?", (request.payment_id,)
        )
        if not rows:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"payment {request.payment_id!r} not found"
            )
        async with self.store.tx() as conn:
            refund(conn, str(rows[0][0]))
            row = conn.execute(
                "SELECT * FROM payments WHERE payment_id = ?", (request.payment_id,)
            ).fetchone()
        return _row_to_payment(row)

    async def GetPayment(
        self, request: payment_pb2.GetPaymentRequest, context: grpc.aio.ServicerContext
    ) -> payment_pb2.Payment:
        if request.payment_id:
            rows = self.store.query(
                "SELECT * FROM payments WHERE payment_id = ?", (request.payment_id,)
            )
        else:
            rows = self.store.query(
                "SELECT * FROM payments WHERE order_id = ? AND status >= 0 ORDER BY updated_at LIMIT 1",
                (request.order_id,),
            )
        if not rows:
            await context.abort(grpc.StatusCode.NOT_FOUND, "payment not found")
        return _row_to_payment(rows[0])


def commands(store: Store) -> Any:
    """The payment service's command handlers for the orchestrated saga."""
    from examples.shop.orchestration import once
    from meshkit.saga.commands import CommandContext, CommandParticipant

    part = CommandParticipant("payment")

    @part.handles(payment_pb2.ChargeRequest)
    async def charge_cmd(cmd: payment_pb2.ChargeRequest, c: CommandContext) -> Any:
        def work(conn: sqlite3.Connection) -> Any:
            payment = charge(conn, cmd.order_id, cmd.customer_id, cmd.amount, cmd.idempotency_key)
            return charge_outcome(payment, cmd.customer_id)

        return await once(store, c, work)

    @part.handles(payment_pb2.RefundRequest)
    async def refund_cmd(cmd: payment_pb2.RefundRequest, c: CommandContext) -> Any:
        def work(conn: sqlite3.Connection) -> Any:
            payment_id = refund(conn, c.saga_id)
            return ev.PaymentRefunded(
                order_id=c.saga_id, payment_id=payment_id or cmd.payment_id, reason=cmd.reason
            )

        return await once(store, c, work)

    return part


async def build(ctx: ServiceContext) -> tuple[Callable[[grpc.aio.Server], None], Any]:
    service = PaymentService(ctx.store)
    if ctx.mode == "orchestrated":
        from examples.shop.orchestration import serve_commands

        serve_commands(ctx, commands(ctx.store))

    def add(server: grpc.aio.Server) -> None:
        payment_pb2_grpc.add_PaymentServiceServicer_to_server(service, server)

    return add, PARTICIPANT


if __name__ == "__main__":
    main("payment", SCHEMA, build)
