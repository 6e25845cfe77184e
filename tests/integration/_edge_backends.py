"""Shop backends for the edge tests: grpc.aio servers on free loopback ports, built on the
generated shop code, with a grpc.health.v1 servicer, call counters, an identity label
(so tests see which backend answered) and switchable failures."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from examples.shop.gen.shop.v1 import (
    common_pb2,
    orders_pb2,
    orders_pb2_grpc,
    payment_pb2,
    payment_pb2_grpc,
    shipping_pb2,
    shipping_pb2_grpc,
)


class ShopBackend:
    """Order, shipping and payment services answering from fixed data."""

    def __init__(self, name: str = "blue") -> None:
        self.name = name
        self.calls: collections.Counter[str] = collections.Counter()
        self.metadata: list[dict[str, str]] = []
        self.fail_payment: grpc.StatusCode | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.delay = 0.0
        # When set, GetOrder waits until GetPayment has started (proves the calls overlap).
        self.payment_started: asyncio.Event | None = None
        self.watch_gate = asyncio.Event()
        self.list_requests: list[Any] = []  # the ListOrdersRequest messages received

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _record(self, method: str, ctx: grpc.aio.ServicerContext) -> None:
        self.calls[method] += 1
        self.metadata.append({k: v for k, v in ctx.invocation_metadata() if isinstance(v, str)})

    async def start(self, port: int = 0) -> ShopBackend:
        """Serve on ``port`` (0: a free one)."""
        server = grpc.aio.server()
        backend = self

        class Orders(orders_pb2_grpc.OrderServiceServicer):
            async def GetOrder(self, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
                backend._record("GetOrder", ctx)
                if backend.delay:
                    await asyncio.sleep(backend.delay)
                if backend.payment_started is not None:
                    await asyncio.wait_for(backend.payment_started.wait(), 5.0)
                if req.order_id == "missing":
                    await ctx.abort(grpc.StatusCode.NOT_FOUND, f"order {req.order_id} not found")
                return orders_pb2.Order(
                    order_id=req.order_id,
                    customer_id="c-1",
                    items=[
                        common_pb2.LineItem(
                            sku="sku-1",
                            quantity=2,
                            unit_price=common_pb2.Money(currency="KRW", amount_minor=5000),
                        )
                    ],
                    total=common_pb2.Money(currency="KRW", amount_minor=10000),
                    status=orders_pb2.ORDER_STATUS_CREATED,
                    shipping_address=common_pb2.Address(name="Kim", line1="1 Main", city="Seoul"),
                    labels={"server": backend.name},
                )

            async def ListOrders(self, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
                backend._record("ListOrders", ctx)
                backend.list_requests.append(req)
                return orders_pb2.ListOrdersResponse(
                    orders=[orders_pb2.Order(order_id="o-1", status=req.status)]
                )

            async def WatchOrders(self, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
                backend._record("WatchOrders", ctx)
                for detail in ("first", "second"):
                    yield orders_pb2.OrderEvent(
                        order_id=req.order_id, status=orders_pb2.ORDER_STATUS_CREATED, detail=detail
                    )
                    await backend.watch_gate.wait()  # the test decides when the next comes

        class Shipping(shipping_pb2_grpc.ShippingServiceServicer):
            async def GetShipment(self, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
                backend._record("GetShipment", ctx)
                return shipping_pb2.Shipment(
                    shipment_id=f"s-{req.order_id}",
                    order_id=req.order_id,
                    status=shipping_pb2.SHIPMENT_STATUS_SCHEDULED,
                    address=common_pb2.Address(city="Seoul"),
                )

        class Payment(payment_pb2_grpc.PaymentServiceServicer):
            async def GetPayment(self, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
                backend._record("GetPayment", ctx)
                if backend.payment_started is not None:
                    backend.payment_started.set()
                if backend.fail_payment is not None:
                    await ctx.abort(backend.fail_payment, "payments are down")
                return payment_pb2.Payment(
                    payment_id=f"p-{req.order_id}",
                    order_id=req.order_id,
                    status=payment_pb2.PAYMENT_STATUS_CHARGED,
                    amount=common_pb2.Money(currency="KRW", amount_minor=10000),
                )

        orders_pb2_grpc.add_OrderServiceServicer_to_server(Orders(), server)
        shipping_pb2_grpc.add_ShippingServiceServicer_to_server(Shipping(), server)
        payment_pb2_grpc.add_PaymentServiceServicer_to_server(Payment(), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        self.server = server
        await self.set_serving(True)
        return self

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        r = self.health.set("", status)
        if asyncio.iscoroutine(r):
            await r

    async def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            await self.server.stop(grace)


def edge_client(app: Any, client: tuple[str, int] | None = None) -> httpx.AsyncClient:
    """An httpx client driving an edge ASGI app in-process (``edge.asgi()`` or one profile)."""
    transport = (
        httpx.ASGITransport(app=app)
        if client is None
        else httpx.ASGITransport(app=app, client=client)
    )
    return httpx.AsyncClient(transport=transport, base_url="http://edge")
