"""One trace from the REST request through the gateway, gRPC and every event hop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from examples.shop._gen import DESCRIPTOR_SET
from examples.shop.flow import ORDER_SAGA, SHOP_STREAM
from examples.shop.runner import SAGA_SERVICES, SERVICES, ShopCluster
from meshkit.nats import NatsServer
from meshkit.saga import Envelope, EventBus, SagaTracker, state_name

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize("sdk", [False, True], ids=["no-sdk", "sdk"])
async def test_one_trace_runs_from_rest_through_every_event_hop(sdk: bool, tmp_path: Path) -> None:
    import httpx

    spans_file = tmp_path / "spans.jsonl"
    env = {name: ({"SHOP_OTEL_FILE": str(spans_file)} if sdk else {}) for name in SERVICES}
    async with NatsServer() as nats:
        cluster = ShopCluster(nats.url, tmp_path / "data", env=env)
        await asyncio.to_thread(cluster.start)
        bus = await EventBus.connect(nats.url, name="trace-test")
        tracker = await SagaTracker(bus, SHOP_STREAM, ORDER_SAGA).start()
        try:
            gw = await asyncio.to_thread(cluster.start_gateway, DESCRIPTOR_SET)
            async with httpx.AsyncClient(base_url=gw.url, timeout=15) as http:
                resp = await http.post(
                    "/v1/orders",
                    headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"},
                    json={
                        "customerId": "tracy",
                        "items": [
                            {
                                "sku": "book",
                                "quantity": 1,
                                "unitPrice": {"currency": "KRW", "amountMinor": "100"},
                            }
                        ],
                        "shippingAddress": {"country": "KR"},
                        "requestId": "trace-1",
                    },
                )
            assert resp.status_code == 200, resp.text
            saga_id = resp.json()["orderId"]
            assert tracker.store is not None
            status = await tracker.store.wait(saga_id, within=30)
            assert status is not None and state_name(status.state) == "COMPLETED"
            assert await tracker.wait_caught_up(within=10)
            # Every event of the saga carries the client's trace id. The saga is COMPLETED
            # at OrderCompleted; CustomerNotified follows it, so wait for that one too.
            envs: list[Envelope] = []
            first_seq, deadline = 0, asyncio.get_running_loop().time() + 15
            while not any(e.event_type.endswith("CustomerNotified") for e in envs):
                assert asyncio.get_running_loop().time() < deadline, [e.event_type for e in envs]
                info = await bus.js.stream_info(SHOP_STREAM.name)
                for seq in range(max(first_seq, info.state.first_seq), info.state.last_seq + 1):
                    raw = await bus.js.get_msg(SHOP_STREAM.name, seq)
                    e = Envelope.from_headers(raw.headers)
                    if e.saga_id == saga_id:
                        envs.append(e)
                first_seq = info.state.last_seq + 1
                await asyncio.sleep(0.05)
            types = sorted(e.event_type.rsplit(".", 1)[-1] for e in envs)
            assert types == sorted(
                [
                    "OrderCreated",
                    "StockReserved",
                    "PaymentCompleted",
                    "ShipmentScheduled",
                    "OrderCompleted",
                    "CustomerNotified",
                ]
            )
            assert all(e.traceparent.split("-")[1] == TRACE_ID for e in envs), [
                e.traceparent for e in envs
            ]
        finally:
            await tracker.stop()
            await bus.close()
            await asyncio.to_thread(cluster.stop)
    if not sdk:
        return
    spans = [json.loads(line) for line in spans_file.read_text().splitlines() if line.strip()]
    ours = [s for s in spans if s["trace_id"] == TRACE_ID]
    assert {s["service"] for s in ours} == set(SAGA_SERVICES)
    server = [s for s in ours if s["kind"] == "SERVER" and "CreateOrder" in s["name"]]
    assert len(server) == 1 and server[0]["parent_id"] == CLIENT_SPAN  # the gateway passed it on
    by_id = {s["span_id"]: s for s in ours}
    for s in ours:
        if s is not server[0]:
            assert s["parent_id"] in by_id, (
                f"{s['name']} in {s['service']} has a parent outside the trace"
            )

    def type_of(name: str) -> str:
        # "send shop.events.shop.v1.X", or where the order store appended it:
        # "process shop_orders.shop:v1:X.order.{id}" (no id: low cardinality).
        destination = name.rsplit(" ", 1)[-1]
        if destination.endswith(".{id}"):
            destination = destination.split(".")[-3]
        return destination.replace(":", ".").rsplit(".", 1)[-1]

    names = {(s["service"], s["kind"], s["name"].split(" ")[0], type_of(s["name"])) for s in ours}
    for hop in [
        ("order", "PRODUCER", "send", "OrderCreated"),
        ("inventory", "CONSUMER", "process", "OrderCreated"),
        ("inventory", "PRODUCER", "send", "StockReserved"),
        ("payment", "CONSUMER", "process", "StockReserved"),
        ("shipping", "CONSUMER", "process", "PaymentCompleted"),
        ("order", "CONSUMER", "process", "ShipmentScheduled"),
        ("notification", "CONSUMER", "process", "OrderCompleted"),
        ("notification", "PRODUCER", "send", "CustomerNotified"),
    ]:
        assert hop in names, (hop, sorted(names))
    produced = next(
        s for s in ours if type_of(s["name"]) == "OrderCreated" and s["kind"] == "PRODUCER"
    )
    assert produced["attributes"]["messaging.message.conversation_id"] == saga_id
    assert produced["attributes"]["messaging.system"] == "nats"
