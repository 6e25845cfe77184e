"""The shipping service: schedules shipments for paid orders; fails for unshippable addresses."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import empty_pb2

from examples.shop import faults
from examples.shop._service import ServiceContext, main
from examples.shop.flow import SHOP_STREAM, UNSHIPPABLE_COUNTRIES, consumer_spec
from examples.shop.gen.shop.v1 import events_pb2 as ev
from examples.shop.gen.shop.v1 import shipping_pb2, shipping_pb2_grpc
from examples.shop.store import Store
from meshkit.saga import Context, Participant

SCHEMA = """
CREATE TABLE IF NOT EXISTS shipments (
    shipment_id TEXT PRIMARY KEY,
    order_id TEXT UNIQUE NOT NULL,
    data BLOB NOT NULL,
    status INTEGER NOT NULL
);
"""

SCHEDULED = shipping_pb2.SHIPMENT_STATUS_SCHEDULED
CANCELLED = shipping_pb2.SHIPMENT_STATUS_CANCELLED


def schedule(
    conn: sqlite3.Connection, shipment: shipping_pb2.Shipment
) -> tuple[shipping_pb2.Shipment | None, str]:
    """Schedule once per order; returns (shipment, failure reason)."""
    row = conn.execute(
        "SELECT data, status FROM shipments WHERE order_id = ?", (shipment.order_id,)
    ).fetchone()
    if row is not None:
        if row[1] == CANCELLED:
            return None, "order was cancelled"
        return shipping_pb2.Shipment.FromString(row[0]), ""
    reason = _refusal(shipment.address)
    if reason:
        return None, reason
    return _schedule_new(conn, shipment), ""


def first_schedule(
    conn: sqlite3.Connection, shipment: shipping_pb2.Shipment
) -> tuple[shipping_pb2.Shipment | None, str]:
    """:func:`schedule`, answering the first decision made for the order, whatever
    happened since: an address refused is refused again (the refusal depends on the
    address alone), and a shipment scheduled stays the answer once cancelled.

    That makes the saga's step idempotent by construction (a redelivery repeats the
    first answer and changes nothing), so it needs no inbox record.
    """
    reason = _refusal(shipment.address)
    if reason:
        return None, reason
    row = conn.execute(
        "SELECT data FROM shipments WHERE order_id = ?", (shipment.order_id,)
    ).fetchone()
    if row is not None:
        stored = shipping_pb2.Shipment.FromString(row[0])
        # A tombstone (a cancellation before any shipment) has an id of its own.
        if stored.shipment_id != _shipment_id(shipment.order_id):
            return None, "order was cancelled"
        return stored, ""
    return _schedule_new(conn, shipment), ""


def _refusal(address: Any) -> str:
    if address.country in UNSHIPPABLE_COUNTRIES or not address.country:
        return f"cannot ship to country {address.country!r}"
    return ""


def _shipment_id(order_id: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"shipment/{order_id}").hex


def _schedule_new(
    conn: sqlite3.Connection, shipment: shipping_pb2.Shipment
) -> shipping_pb2.Shipment:
    shipment.shipment_id = _shipment_id(shipment.order_id)
    shipment.status = SCHEDULED
    shipment.eta.FromSeconds(2 * 24 * 3600)
    conn.execute(
        "INSERT INTO shipments VALUES (?, ?, ?, ?)",
        (shipment.shipment_id, shipment.order_id, shipment.SerializeToString(), SCHEDULED),
    )
    return shipment


def cancel(conn: sqlite3.Connection, order_id: str) -> None:
    row = conn.execute("SELECT data FROM shipments WHERE order_id = ?", (order_id,)).fetchone()
    if row is None:
        tomb = shipping_pb2.Shipment(
            shipment_id=uuid.uuid4().hex, order_id=order_id, status=CANCELLED
        )
        conn.execute(
            "INSERT INTO shipments VALUES (?, ?, ?, ?)",
            (tomb.shipment_id, order_id, tomb.SerializeToString(), CANCELLED),
        )
        return
    shipment = shipping_pb2.Shipment.FromString(row[0])
    shipment.status = CANCELLED
    conn.execute(
        "UPDATE shipments SET data = ?, status = ? WHERE order_id = ?",
        (shipment.SerializeToString(), CANCELLED, order_id),
    )


PARTICIPANT = Participant("shipping", SHOP_STREAM, consumer=consumer_spec())


# Idempotent by construction (no inbox record): first_schedule answers the first
# decision, and cancel_shipment's writes recognise their own repeat.
@PARTICIPANT.on(
    ev.PaymentCompleted, emits=[ev.ShipmentScheduled, ev.ShipmentFailed], idempotent=True
)
async def schedule_shipment(event: ev.PaymentCompleted, ctx: Context) -> Any:
    shipment, reason = first_schedule(
        ctx.tx, shipping_pb2.Shipment(order_id=event.order_id, address=event.shipping_address)
    )
    await faults.mid_handler(ctx)
    if shipment is None:
        return ev.ShipmentFailed(order_id=event.order_id, reason=reason)
    return ev.ShipmentScheduled(order_id=event.order_id, shipment_id=shipment.shipment_id)


@PARTICIPANT.compensate(ev.OrderCancelled, idempotent=True)
async def cancel_shipment(event: ev.OrderCancelled, ctx: Context) -> None:
    cancel(ctx.tx, event.order_id)


class ShippingService(shipping_pb2_grpc.ShippingServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    async def ScheduleShipment(
        self, request: shipping_pb2.ScheduleShipmentRequest, context: grpc.aio.ServicerContext
    ) -> shipping_pb2.Shipment:
        if not request.shipment.order_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "shipment.order_id: required")
        async with self.store.tx() as conn:
            shipment, reason = schedule(
                conn,
                shipping_pb2.Shipment(
                    order_id=request.shipment.order_id, address=request.shipment.address
                ),
            )
        if shipment is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
        assert shipment is not None
        return shipment

    async def CancelShipment(
        self, request: shipping_pb2.CancelShipmentRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        rows = self.store.query(
            "SELECT order_id FROM shipments WHERE shipment_id = ?", (request.shipment_id,)
        )
        if not rows:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"shipment {request.shipment_id!r} not found"
            )
        async with self.store.tx() as conn:
            cancel(conn, str(rows[0][0]))
        return empty_pb2.Empty()

    async def GetShipment(
        self, request: shipping_pb2.GetShipmentRequest, context: grpc.aio.ServicerContext
    ) -> shipping_pb2.Shipment:
        if request.shipment_id:
            rows = self.store.query(
                "SELECT data FROM shipments WHERE shipment_id = ?", (request.shipment_id,)
            )
        else:
            rows = self.store.query(
                "SELECT data FROM shipments WHERE order_id = ?", (request.order_id,)
            )
        if not rows:
            await context.abort(grpc.StatusCode.NOT_FOUND, "shipment not found")
        return shipping_pb2.Shipment.FromString(rows[0][0])  # type: ignore[arg-type]


def commands(store: Store) -> Any:
    """The shipping service's command handlers for the orchestrated saga."""
    from examples.shop.orchestration import once
    from meshkit.saga.commands import CommandContext, CommandParticipant

    part = CommandParticipant("shipping")

    @part.handles(shipping_pb2.ScheduleShipmentRequest)
    async def ship_cmd(cmd: shipping_pb2.ScheduleShipmentRequest, c: CommandContext) -> Any:
        def work(conn: sqlite3.Connection) -> Any:
            shipment, reason = schedule(conn, cmd.shipment)
            if shipment is None:
                return ev.ShipmentFailed(order_id=cmd.shipment.order_id, reason=reason)
            return ev.ShipmentScheduled(
                order_id=cmd.shipment.order_id, shipment_id=shipment.shipment_id
            )

        return await once(store, c, work)

    return part


async def build(ctx: ServiceContext) -> tuple[Callable[[grpc.aio.Server], None], Any]:
    service = ShippingService(ctx.store)
    if ctx.mode == "orchestrated":
        from examples.shop.orchestration import serve_commands

        serve_commands(ctx, commands(ctx.store))

    def add(server: grpc.aio.Server) -> None:
        shipping_pb2_grpc.add_ShippingServiceServicer_to_server(service, server)

    return add, PARTICIPANT


if __name__ == "__main__":
    main("shipping", SCHEMA, build)
