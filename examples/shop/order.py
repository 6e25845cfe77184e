"""The order service: creates orders (starting the saga) and completes or cancels them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from examples.shop import faults
from examples.shop._service import ServiceContext, main
from examples.shop.flow import SHOP_STREAM, SagaTimedOut, consumer_spec
from examples.shop.gen.shop.v1 import events_pb2 as ev
from examples.shop.gen.shop.v1 import orders_pb2, orders_pb2_grpc
from examples.shop.store import Store
from meshkit.saga import Context, Participant, derive_event_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    customer_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    data BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""


def _load(conn: sqlite3.Connection, order_id: str) -> orders_pb2.Order | None:
    row = conn.execute("SELECT data FROM orders WHERE order_id = ?", (order_id,)).fetchone()
    if row is None:
        return None
    order = orders_pb2.Order()
    order.ParseFromString(row[0])
    return order


def _save(conn: sqlite3.Connection, order: orders_pb2.Order) -> None:
    conn.execute(
        "UPDATE orders SET status = ?, data = ? WHERE order_id = ?",
        (int(order.status), order.SerializeToString(), order.order_id),
    )


@contextlib.contextmanager
def _incoming_trace(context: grpc.aio.ServicerContext) -> Iterator[None]:
    """Continue the caller's trace in the saga's events.

    With OpenTelemetry's grpc instrumentation installed the server span is already
    current; without it, the caller's ``traceparent`` metadata is attached here so the
    first event (and every event after it) still carries the caller's trace.
    """
    if trace.get_current_span().get_span_context().is_valid:
        yield
        return
    carrier = {
        str(k): str(v)
        for k, v in (context.invocation_metadata() or ())
        if k in ("traceparent", "tracestate")
    }
    if not carrier:
        yield
        return
    token = otel_context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        otel_context.detach(token)


class OrderService(orders_pb2_grpc.OrderServiceServicer):
    """The gRPC side: CreateOrder starts a saga; the participant finishes it."""

    def __init__(
        self, store: Store, start_saga: Callable[[orders_pb2.Order, str], Any] | None
    ) -> None:
        self.store = store
        self.start_saga = start_saga

    async def CreateOrder(
        self, request: orders_pb2.CreateOrderRequest, context: grpc.aio.ServicerContext
    ) -> orders_pb2.Order:
        if not request.customer_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "customer_id: required")
        if not request.items:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "items: at least one line item")
        for i, item in enumerate(request.items):
            if item.quantity <= 0:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"items[{i}].quantity: must be positive"
                )
        request_id = request.request_id or uuid.uuid4().hex
        async with self.store.tx() as conn:
            row = conn.execute(
                "SELECT order_id FROM orders WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is not None:
                existing = _load(conn, str(row[0]))
                assert existing is not None
                order = existing
            else:
                order = orders_pb2.Order(
                    order_id=uuid.uuid5(uuid.NAMESPACE_URL, f"order/{request_id}").hex,
                    customer_id=request.customer_id,
                    items=request.items,
                    status=orders_pb2.ORDER_STATUS_PENDING,
                    shipping_address=request.shipping_address,
                    created_at=timestamp_pb2.Timestamp(seconds=int(time.time())),
                )
                currency = request.items[0].unit_price.currency or "KRW"
                order.total.currency = currency
                order.total.amount_minor = sum(
                    i.quantity * i.unit_price.amount_minor for i in request.items
                )
                conn.execute(
                    "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        order.order_id,
                        request_id,
                        order.customer_id,
                        int(order.status),
                        order.SerializeToString(),
                        time.time(),
                    ),
                )
        if self.start_saga is not None:
            # Retried creates publish again with the same event id: JetStream drops the copy.
            with _incoming_trace(context):
                await self.start_saga(order, request_id)
        return order

    async def GetOrder(
        self, request: orders_pb2.GetOrderRequest, context: grpc.aio.ServicerContext
    ) -> orders_pb2.Order:
        order = _load(self.store.conn, request.order_id)
        if order is None or (request.customer_id and order.customer_id != request.customer_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"order {request.order_id!r} not found")
        assert order is not None
        return order

    async def ListOrders(
        self, request: orders_pb2.ListOrdersRequest, context: grpc.aio.ServicerContext
    ) -> orders_pb2.ListOrdersResponse:
        sql = "SELECT data FROM orders WHERE 1=1"
        params: list[object] = []
        if request.customer_id:
            sql += " AND customer_id = ?"
            params.append(request.customer_id)
        if request.status:
            sql += " AND status = ?"
            params.append(int(request.status))
        if request.order_ids:
            sql += f" AND order_id IN ({','.join('?' * len(request.order_ids))})"
            params.extend(request.order_ids)
        offset = int(request.page_token or 0)
        size = request.page_size or 100
        sql += " ORDER BY created_at, order_id LIMIT ? OFFSET ?"
        params += [size + 1, offset]
        rows = self.store.query(sql, tuple(params))
        resp = orders_pb2.ListOrdersResponse()
        for (data,) in rows[:size]:
            resp.orders.add().ParseFromString(data)  # type: ignore[arg-type]
        if len(rows) > size:
            resp.next_page_token = str(offset + size)
        return resp

    async def UpdateOrder(
        self, request: orders_pb2.UpdateOrderRequest, context: grpc.aio.ServicerContext
    ) -> orders_pb2.Order:
        paths = list(request.update_mask.paths) or ["labels"]
        if any(p != "labels" for p in paths):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"update_mask: only 'labels' can be updated, got {paths}",
            )
        async with self.store.tx() as conn:
            order = _load(conn, request.order.order_id)
            if order is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"order {request.order.order_id!r} not found"
                )
            assert order is not None
            order.labels.clear()
            order.labels.update(request.order.labels)
            _save(conn, order)
        return order

    async def CancelOrder(
        self, request: orders_pb2.CancelOrderRequest, context: grpc.aio.ServicerContext
    ) -> orders_pb2.Order:
        order_id = request.name.removeprefix("orders/")
        order = _load(self.store.conn, order_id)
        if order is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"order {order_id!r} not found")
        assert order is not None
        if order.status != orders_pb2.ORDER_STATUS_CANCELLED:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"order {order_id} is {orders_pb2.OrderStatus.Name(order.status)}; "
                "its saga decides whether it completes or is cancelled",
            )
        return order

    async def WatchOrders(
        self, request: orders_pb2.WatchOrdersRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        seen: dict[str, int] = {}
        sent = 0
        while True:
            sql = "SELECT order_id, status, data FROM orders"
            params: tuple[object, ...] = ()
            if request.order_id:
                sql += " WHERE order_id = ?"
                params = (request.order_id,)
            for order_id, status, data in self.store.query(sql, params):
                if seen.get(str(order_id)) == status:
                    continue
                seen[str(order_id)] = int(status)  # type: ignore[call-overload]
                order = orders_pb2.Order.FromString(data)  # type: ignore[arg-type]
                event = orders_pb2.OrderEvent(
                    order_id=order.order_id, status=order.status, detail=order.cancel_reason
                )
                event.at.GetCurrentTime()
                yield event
                sent += 1
                if request.limit and sent >= request.limit:
                    return
            await asyncio.sleep(0.1)


PARTICIPANT = Participant("order", SHOP_STREAM, consumer=consumer_spec())


def _finish(
    conn: sqlite3.Connection, order_id: str, status: int, reason: str = ""
) -> orders_pb2.Order | None:
    """Move a PENDING order to a final status; None when it already was final."""
    order = _load(conn, order_id)
    if order is None or order.status != orders_pb2.ORDER_STATUS_PENDING:
        return None
    order.status = status  # type: ignore[assignment]
    order.cancel_reason = reason
    _save(conn, order)
    return order


@PARTICIPANT.on(ev.ShipmentScheduled, emits=[ev.OrderCompleted])
async def complete(event: ev.ShipmentScheduled, ctx: Context) -> ev.OrderCompleted | None:
    await faults.mid_handler(ctx)
    order = _finish(ctx.tx, event.order_id, orders_pb2.ORDER_STATUS_COMPLETED)
    if order is None:
        return None
    return ev.OrderCompleted(order_id=order.order_id, customer_id=order.customer_id)


def _cancel(ctx: Context, order_id: str, reason: str) -> ev.OrderCancelled | None:
    order = _finish(ctx.tx, order_id, orders_pb2.ORDER_STATUS_CANCELLED, reason)
    if order is None:
        return None
    return ev.OrderCancelled(order_id=order_id, reason=reason, customer_id=order.customer_id)


@PARTICIPANT.compensate(ev.StockReservationFailed, emits=[ev.OrderCancelled])
async def cancel_out_of_stock(
    event: ev.StockReservationFailed, ctx: Context
) -> ev.OrderCancelled | None:
    await faults.mid_handler(ctx)
    return _cancel(ctx, event.order_id, event.reason or "out of stock")


@PARTICIPANT.compensate(ev.StockReleased, emits=[ev.OrderCancelled])
async def cancel_after_release(event: ev.StockReleased, ctx: Context) -> ev.OrderCancelled | None:
    await faults.mid_handler(ctx)
    return _cancel(ctx, event.order_id, event.reason or "stock released")


@PARTICIPANT.compensate(SagaTimedOut, emits=[ev.OrderCancelled])
async def cancel_timed_out(event: Any, ctx: Context) -> ev.OrderCancelled | None:
    # The saga id is the order id; a completed order stays completed.
    return _cancel(ctx, event.saga_id, "saga timed out")


async def build(ctx: ServiceContext) -> tuple[Callable[[grpc.aio.Server], None], Any]:
    bus = ctx.bus
    timeout = float(os.environ.get("SHOP_SAGA_TIMEOUT", "0") or 0) or None

    async def start_saga(order: orders_pb2.Order, request_id: str) -> None:
        created = ev.OrderCreated(
            order_id=order.order_id,
            customer_id=order.customer_id,
            items=order.items,
            total=order.total,
            shipping_address=order.shipping_address,
        )
        await bus.emit(
            SHOP_STREAM,
            created,
            saga_id=order.order_id,
            saga_type="order",
            event_id=derive_event_id(order.order_id, "order.create", 0),
            saga_timeout=timeout,
        )

    service = OrderService(ctx.store, start_saga if bus is not None else None)

    def add(server: grpc.aio.Server) -> None:
        orders_pb2_grpc.add_OrderServiceServicer_to_server(service, server)

    return add, PARTICIPANT


if __name__ == "__main__":
    main("order", SCHEMA, build)
