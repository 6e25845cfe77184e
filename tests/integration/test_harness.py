"""The shared fixtures serve real generated services, sync and asyncio, on free ports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from examples.shop.gen.shop.v1 import inventory_pb2 as pb
from examples.shop.gen.shop.v1 import inventory_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


class Inventory(pb_grpc.InventoryServiceServicer):
    def GetStock(self, request: pb.GetStockRequest, context: Any) -> pb.Stock:
        return pb.Stock(sku=request.sku, available=7)


class AioInventory(pb_grpc.InventoryServiceServicer):
    async def GetStock(self, request: pb.GetStockRequest, context: Any) -> pb.Stock:
        return pb.Stock(sku=request.sku, available=9)


def test_sync_server_fixture(grpc_server: Callable[..., Any]) -> None:
    server = grpc_server((pb_grpc.add_InventoryServiceServicer_to_server, Inventory()))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stock = pb_grpc.InventoryServiceStub(channel).GetStock(pb.GetStockRequest(sku="pen"))
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="shop.v1.InventoryService")
        )
    assert (stock.sku, stock.available) == ("pen", 7)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_aio_server_fixture(aio_grpc_server: Callable[..., Any]) -> None:
    server = await aio_grpc_server((pb_grpc.add_InventoryServiceServicer_to_server, AioInventory()))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stock = await pb_grpc.InventoryServiceStub(channel).GetStock(pb.GetStockRequest(sku="pen"))
    assert stock.available == 9
