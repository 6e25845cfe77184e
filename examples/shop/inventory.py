"""The inventory service: reserves stock for orders and releases it as compensation.

Stock per SKU has ``available`` and ``reserved``; a reservation moves quantity
from one to the other, a completed order takes it out of ``reserved``, a
release puts it back. A release that arrives before the reservation leaves a
tombstone, so a late reservation for a cancelled order fails instead.

The saga's step answers through :func:`first_reservation`: its first decision for an
order, kept in these tables (a refusal in ``reservation_failures``), so a redelivered
``OrderCreated`` gets the same answer whatever happened to stock since, with no inbox
record.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from examples.shop import faults
from examples.shop._service import ServiceContext, main
from examples.shop.flow import INITIAL_STOCK, SHOP_STREAM, consumer_spec
from examples.shop.gen.shop.v1 import common_pb2, inventory_pb2, inventory_pb2_grpc
from examples.shop.gen.shop.v1 import events_pb2 as ev
from examples.shop.store import Store
from meshkit.saga import Context, Participant

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku TEXT PRIMARY KEY,
    available INTEGER NOT NULL CHECK (available >= 0),
    reserved INTEGER NOT NULL CHECK (reserved >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    order_id TEXT PRIMARY KEY,
    reservation_id TEXT NOT NULL,
    items BLOB NOT NULL,
    state TEXT NOT NULL  -- reserved | committed | released
);
CREATE TABLE IF NOT EXISTS reservation_failures (
    order_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL
);
"""


def _items_blob(items: Any) -> bytes:
    return inventory_pb2.Reservation(items=items).SerializeToString()


def _items(blob: bytes) -> list[common_pb2.LineItem]:
    return list(inventory_pb2.Reservation.FromString(blob).items)


CANCELLED_FIRST = "order was cancelled before its stock was reserved"


def reserve(conn: sqlite3.Connection, order_id: str, items: Any) -> tuple[str | None, str]:
    """Reserve all items or none; returns (reservation id, failure reason).

    Once per order: a reservation made is returned again while it holds; a released
    one (or a release that came first) refuses.
    """
    row = conn.execute(
        "SELECT reservation_id, state FROM reservations WHERE order_id = ?", (order_id,)
    ).fetchone()
    if row is not None:
        if row[1] == "released":
            return None, CANCELLED_FIRST
        return str(row[0]), ""
    return _reserve_new(conn, order_id, items)


def first_reservation(
    conn: sqlite3.Connection, order_id: str, items: Any
) -> tuple[str | None, str]:
    """:func:`reserve`, answering the first decision made for the order, whatever
    happened since: a reservation made stays the answer once committed or released,
    and a refusal for stock stays the answer once stock is back.

    That makes the saga's step idempotent by construction (a redelivery repeats the
    first answer and changes nothing), so it needs no inbox record.
    """
    # Both earlier answers in one statement; a refusal first (a release after it
    # leaves a tombstone beside it).
    row = conn.execute(
        "SELECT 0, reason FROM reservation_failures WHERE order_id = ?1"
        " UNION ALL SELECT 1, reservation_id FROM reservations WHERE order_id = ?1"
        " ORDER BY 1 LIMIT 1",
        (order_id,),
    ).fetchone()
    if row is not None:
        if not row[0]:
            return None, str(row[1])
        # A tombstone (a release before any reservation) has no id, and stays.
        return (str(row[1]), "") if row[1] else (None, CANCELLED_FIRST)
    reservation_id, reason = _reserve_new(conn, order_id, items)
    if reservation_id is None:
        conn.execute("INSERT INTO reservation_failures VALUES (?, ?)", (order_id, reason))
    return reservation_id, reason


def _reserve_new(conn: sqlite3.Connection, order_id: str, items: Any) -> tuple[str | None, str]:
    wanted: dict[str, int] = {}
    for item in items:
        wanted[item.sku] = wanted.get(item.sku, 0) + item.quantity
    for sku, qty in wanted.items():
        have = conn.execute("SELECT available FROM stock WHERE sku = ?", (sku,)).fetchone()
        available = int(have[0]) if have else 0
        if available < qty:
            return None, f"out of stock: {sku} (wanted {qty}, {available} available)"
    for sku, qty in wanted.items():
        conn.execute(
            "UPDATE stock SET available = available - ?, reserved = reserved + ? WHERE sku = ?",
            (qty, qty, sku),
        )
    reservation_id = uuid.uuid5(uuid.NAMESPACE_URL, f"reservation/{order_id}").hex
    conn.execute(
        "INSERT INTO reservations VALUES (?, ?, ?, 'reserved')",
        (order_id, reservation_id, _items_blob(items)),
    )
    return reservation_id, ""


def release(conn: sqlite3.Connection, order_id: str) -> str | None:
    """Put a reservation's stock back; returns its id, or None when nothing was reserved."""
    row = conn.execute(
        "SELECT reservation_id, items, state FROM reservations WHERE order_id = ?", (order_id,)
    ).fetchone()
    if row is None:
        conn.execute("INSERT INTO reservations VALUES (?, '', ?, 'released')", (order_id, b""))
        return None
    if row[2] != "reserved":
        return None
    for item in _items(row[1]):
        conn.execute(
            "UPDATE stock SET available = available + ?, reserved = reserved - ? WHERE sku = ?",
            (item.quantity, item.quantity, item.sku),
        )
    conn.execute("UPDATE reservations SET state = 'released' WHERE order_id = ?", (order_id,))
    return str(row[0])


def commit(conn: sqlite3.Connection, order_id: str) -> None:
    """The order completed: its reserved stock leaves the warehouse."""
    row = conn.execute(
        "SELECT items, state FROM reservations WHERE order_id = ?", (order_id,)
    ).fetchone()
    if row is None or row[1] != "reserved":
        return
    for item in _items(row[0]):
        conn.execute(
            "UPDATE stock SET reserved = reserved - ? WHERE sku = ?", (item.quantity, item.sku)
        )
    conn.execute("UPDATE reservations SET state = 'committed' WHERE order_id = ?", (order_id,))


PARTICIPANT = Participant("inventory", SHOP_STREAM, consumer=consumer_spec())


# Idempotent by construction (no inbox record): first_reservation answers the first
# decision kept in the tables, and StockReserved is built from the event and that id.
@PARTICIPANT.on(
    ev.OrderCreated, emits=[ev.StockReserved, ev.StockReservationFailed], idempotent=True
)
async def reserve_stock(event: ev.OrderCreated, ctx: Context) -> Any:
    reservation_id, reason = first_reservation(ctx.tx, event.order_id, event.items)
    await faults.mid_handler(ctx)
    if reservation_id is None:
        return ev.StockReservationFailed(order_id=event.order_id, reason=reason)
    return ev.StockReserved(
        order_id=event.order_id,
        reservation_id=reservation_id,
        items=event.items,
        customer_id=event.customer_id,
        total=event.total,
        shipping_address=event.shipping_address,
    )


async def _release(ctx: Context, order_id: str, reason: str) -> ev.StockReleased | None:
    reservation_id = release(ctx.tx, order_id)
    await faults.mid_handler(ctx)
    if reservation_id is None:
        return None
    return ev.StockReleased(order_id=order_id, reservation_id=reservation_id, reason=reason)


@PARTICIPANT.compensate(ev.PaymentFailed, emits=[ev.StockReleased])
async def release_after_decline(event: ev.PaymentFailed, ctx: Context) -> Any:
    return await _release(ctx, event.order_id, f"payment failed: {event.reason}")


@PARTICIPANT.compensate(ev.PaymentRefunded, emits=[ev.StockReleased])
async def release_after_refund(event: ev.PaymentRefunded, ctx: Context) -> Any:
    return await _release(ctx, event.order_id, event.reason or "payment refunded")


# Idempotent by construction (no inbox record): the reservation's state guards both,
# and neither emits anything, so a rerun finds nothing left to do. The releases that
# emit StockReleased are not: rerun after the release, they would emit nothing, and
# their record keeps the first answer.
@PARTICIPANT.on(ev.OrderCompleted, idempotent=True)
async def commit_stock(event: ev.OrderCompleted, ctx: Context) -> None:
    commit(ctx.tx, event.order_id)


@PARTICIPANT.compensate(ev.OrderCancelled, idempotent=True)
async def release_cancelled(event: ev.OrderCancelled, ctx: Context) -> None:
    # Usually already released (the release is what cancelled the order); after a
    # saga timeout this is the compensation.
    release(ctx.tx, event.order_id)


class InventoryService(inventory_pb2_grpc.InventoryServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    def _stock(self, sku: str) -> inventory_pb2.Stock:
        row = self.store.query("SELECT available, reserved FROM stock WHERE sku = ?", (sku,))
        if not row:
            return inventory_pb2.Stock(sku=sku)
        return inventory_pb2.Stock(sku=sku, available=int(row[0][0]), reserved=int(row[0][1]))  # type: ignore[call-overload]

    async def GetStock(
        self, request: inventory_pb2.GetStockRequest, context: grpc.aio.ServicerContext
    ) -> inventory_pb2.Stock:
        exists = self.store.query("SELECT 1 FROM stock WHERE sku = ?", (request.sku,))
        if not exists:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"sku {request.sku!r} not found")
        return self._stock(request.sku)

    async def ReserveStock(
        self, request: inventory_pb2.ReserveStockRequest, context: grpc.aio.ServicerContext
    ) -> inventory_pb2.Reservation:
        async with self.store.tx() as conn:
            reservation_id, reason = reserve(conn, request.order_id, request.items)
        if reservation_id is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
        return inventory_pb2.Reservation(
            reservation_id=reservation_id or "", order_id=request.order_id, items=request.items
        )

    async def ReleaseStock(
        self, request: inventory_pb2.ReleaseStockRequest, context: grpc.aio.ServicerContext
    ) -> inventory_pb2.Reservation:
        row = self.store.query(
            "SELECT order_id, items FROM reservations WHERE reservation_id = ?",
            (request.reservation_id,),
        )
        if not row:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"reservation {request.reservation_id!r} not found"
            )
        order_id = str(row[0][0])
        async with self.store.tx() as conn:
            release(conn, order_id)
        return inventory_pb2.Reservation(
            reservation_id=request.reservation_id,
            order_id=order_id,
            items=_items(row[0][1]),  # type: ignore[arg-type]
            released=True,
        )

    async def AdjustStock(
        self,
        request_iterator: AsyncIterator[inventory_pb2.StockAdjustment],
        context: grpc.aio.ServicerContext,
    ) -> inventory_pb2.AdjustStockSummary:
        count = 0
        skus: list[str] = []
        async for adj in request_iterator:
            async with self.store.tx() as conn:
                conn.execute("INSERT OR IGNORE INTO stock VALUES (?, 0, 0)", (adj.sku,))
                have = conn.execute(
                    "SELECT available FROM stock WHERE sku = ?", (adj.sku,)
                ).fetchone()[0]
                if have + adj.delta < 0:
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"adjustment {count}: {adj.sku} would go negative ({have} + {adj.delta})",
                    )
                conn.execute(
                    "UPDATE stock SET available = available + ? WHERE sku = ?", (adj.delta, adj.sku)
                )
            count += 1
            if adj.sku not in skus:
                skus.append(adj.sku)
        return inventory_pb2.AdjustStockSummary(
            adjustments=count, stock=[self._stock(s) for s in skus]
        )


def commands(store: Store) -> Any:
    """The inventory's command handlers for the orchestrated saga (``SHOP_MODE=orchestrated``)."""
    from examples.shop.orchestration import once
    from meshkit.saga.commands import CommandContext, CommandParticipant

    part = CommandParticipant("inventory")

    @part.handles(inventory_pb2.ReserveStockRequest)
    async def reserve_cmd(cmd: inventory_pb2.ReserveStockRequest, c: CommandContext) -> Any:
        def work(conn: sqlite3.Connection) -> Any:
            reservation_id, reason = reserve(conn, cmd.order_id, cmd.items)
            if reservation_id is None:
                return ev.StockReservationFailed(order_id=cmd.order_id, reason=reason)
            return ev.StockReserved(
                order_id=cmd.order_id, reservation_id=reservation_id, items=cmd.items
            )

        return await once(store, c, work)

    @part.handles(inventory_pb2.ReleaseStockRequest)
    async def release_cmd(cmd: inventory_pb2.ReleaseStockRequest, c: CommandContext) -> Any:
        def work(conn: sqlite3.Connection) -> Any:
            release(conn, c.saga_id)
            return ev.StockReleased(
                order_id=c.saga_id, reservation_id=cmd.reservation_id, reason=cmd.reason
            )

        return await once(store, c, work)

    @part.handles(inventory_pb2.CommitStockRequest)
    async def commit_cmd(cmd: inventory_pb2.CommitStockRequest, c: CommandContext) -> Any:
        def work(conn: sqlite3.Connection) -> Any:
            commit(conn, cmd.order_id)
            return inventory_pb2.Reservation(order_id=cmd.order_id)

        return await once(store, c, work)

    return part


async def build(ctx: ServiceContext) -> tuple[Callable[[grpc.aio.Server], None], Any]:
    async with ctx.store.tx() as conn:
        if conn.execute("SELECT COUNT(*) FROM stock").fetchone()[0] == 0:
            conn.executemany("INSERT INTO stock VALUES (?, ?, 0)", sorted(INITIAL_STOCK.items()))
    service = InventoryService(ctx.store)
    if ctx.mode == "orchestrated":
        from examples.shop.orchestration import serve_commands

        serve_commands(ctx, commands(ctx.store))

    def add(server: grpc.aio.Server) -> None:
        inventory_pb2_grpc.add_InventoryServiceServicer_to_server(service, server)

    return add, PARTICIPANT


if __name__ == "__main__":
    main("inventory", SCHEMA, build)
