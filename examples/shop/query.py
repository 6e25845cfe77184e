"""The order query service (the seed's §9 CQRS query side), its own process.

A projection (:class:`~examples.shop.view.OrderView`) follows the order
aggregates' events and the saga's events (both in stream ``SHOP``: ``shop_orders.>``
and ``shop.events.>``) and, in orchestrated mode, the participants' replies (``SHOP_ORCH``), and keeps
one denormalized document per order in SQLite: the order, its items and total,
and the status of its stock, payment and shipment. ``OrderQueryService`` serves
it over gRPC (and, through the gateway, ``GET /v1/order-views/{order_id}`` and
``GET /v1/order-views``). It is eventually consistent with the command side:
a view can lag the saga by the projection's catch-up time.

``meshkit projection status|rebuild order_view --app examples.shop.query:projections``
with ``SHOP_QUERY_DB`` pointing at the database inspects or rebuilds it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.json_format import ParseDict

from examples.shop._service import ServiceContext, main
from examples.shop.flow import ORDERS_STORE, SHOP_ORCH, SHOP_STREAM
from examples.shop.gen.shop.v1 import query_pb2, query_pb2_grpc
from examples.shop.view import COLLECTION, OrderView
from meshkit.saga.projections import Projector, Source
from meshkit.saga.readmodels import SqliteReadModelStore

VIEW = "order_view"


def order_view(mode: str = "choreography") -> OrderView:
    """The shop's order view: order aggregates and saga events, both in ``SHOP``
    (+ orchestration replies)."""
    sources = [Source(SHOP_STREAM.name, subjects) for subjects in SHOP_STREAM.event_subjects]
    if mode == "orchestrated":
        sources.append(Source(SHOP_ORCH.stream, f"{SHOP_ORCH.prefix}.reply.>"))
    return OrderView(sources, name=VIEW, aggregate_prefix=ORDERS_STORE.subject_prefix)


def projections() -> list[tuple[Any, Any]]:
    """For ``meshkit projection``: the order view in SQLite at ``$SHOP_QUERY_DB``."""
    from examples.shop.flow import mode

    db = os.environ.get("SHOP_QUERY_DB", "query.sqlite")
    return [(order_view(mode()), SqliteReadModelStore(db))]


def to_message(doc: dict[str, Any]) -> query_pb2.OrderView:
    """A view document as the ``shop.v1.OrderView`` message (unknown keys ignored)."""
    return ParseDict(doc, query_pb2.OrderView(), ignore_unknown_fields=True)


class OrderQueryService(query_pb2_grpc.OrderQueryServiceServicer):
    """Reads the projection's documents; never touches the command side."""

    def __init__(self, store: SqliteReadModelStore) -> None:
        self.store = store

    async def GetOrderView(
        self, request: query_pb2.GetOrderViewRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.OrderView:
        doc = self.store.get(VIEW, COLLECTION, request.order_id) if request.order_id else None
        if doc is None or "customer_id" not in doc:
            # Not there yet (the view is eventually consistent) or no such order.
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"order view {request.order_id!r} not found"
            )
        assert doc is not None
        return to_message(doc)

    async def ListOrderViews(
        self, request: query_pb2.ListOrderViewsRequest, context: grpc.aio.ServicerContext
    ) -> query_pb2.ListOrderViewsResponse:
        equals: dict[str, Any] = {}
        if request.customer_id:
            equals["customer_id"] = request.customer_id
        if request.status:
            equals["status"] = request.status
        docs = sorted(
            (d for d in self.store.find(VIEW, COLLECTION, **equals) if "customer_id" in d),
            key=lambda d: str(d.get("order_id", "")),
        )
        offset = int(request.page_token or 0) if request.page_token.isdigit() else 0
        size = request.page_size if request.page_size > 0 else 100
        resp = query_pb2.ListOrderViewsResponse(
            views=[to_message(d) for d in docs[offset : offset + size]]
        )
        if len(docs) > offset + size:
            resp.next_page_token = str(offset + size)
        return resp


async def build(ctx: ServiceContext) -> tuple[Callable[[grpc.aio.Server], None], Any]:
    bus = ctx.bus
    if bus is None:
        raise SystemExit("the query service follows JetStream streams: pass --nats-url")
    # Every stream the view follows must exist before it starts following (SHOP, with
    # the order store, is ensured with the bus).
    if ctx.mode == "orchestrated":
        from meshkit.saga.orchestrator import ensure_orchestration

        await ensure_orchestration(bus, SHOP_ORCH)
    store = SqliteReadModelStore(ctx.args.db)
    projector = Projector(bus.nc, order_view(ctx.mode), store, poll_interval=0.5)

    async def start() -> Callable[[], Awaitable[None]]:
        await projector.start()

        async def stop() -> None:
            await projector.stop()
            store.close()

        return stop

    ctx.background.append(start)
    service = OrderQueryService(store)

    def add(server: grpc.aio.Server) -> None:
        query_pb2_grpc.add_OrderQueryServiceServicer_to_server(service, server)

    return add, None


if __name__ == "__main__":
    main("query", "", build)
