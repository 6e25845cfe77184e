"""The shop's event-sourced order service, its query side and the orchestrated mode.

Every service is its own process on a real nats-server: the demo in orchestrated
mode; the query side serving the denormalized order view over REST through the
gateway after a saga completes (both modes); `meshkit saga show/list` printing
choreographed and orchestrated sagas; and the order aggregate's events in its
own stream, copied once to the saga stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from examples.shop._gen import DESCRIPTOR_SET
from examples.shop.flow import ORDER_SAGA, ORDERS_STORE, SHOP_ORCH, SHOP_STREAM
from examples.shop.runner import SERVICES, ShopCluster
from meshkit.nats import NatsServer
from meshkit.saga import Envelope, EventBus, SagaTracker, state_name
from meshkit.saga.eventstore import EventStore
from meshkit.saga.orchestrator import load_status

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "SHOP_MODE")}


def _body(customer: str, country: str, request_id: str, qty: int = 2) -> dict[str, Any]:
    return {
        "customerId": customer,
        "items": [
            {
                "sku": "book",
                "quantity": qty,
                "unitPrice": {"currency": "KRW", "amountMinor": "15000"},
            },
            {"sku": "pen", "quantity": 1, "unitPrice": {"currency": "KRW", "amountMinor": "1200"}},
        ],
        "shippingAddress": {"name": customer, "city": "Busan", "country": country},
        "requestId": request_id,
    }


def _cli(nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshkit.cli", "saga", *args, "--nats-url", nats_url],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _view(http: Any, order_id: str, within: float = 15, **want: str) -> dict[str, Any]:
    """GET the view until its fields equal ``want``.

    The query side is eventually consistent, and its sources (the order's events,
    the saga's events) are folded independently: wait for every field asserted on.
    """
    end = time.monotonic() + within
    last: Any = None
    while time.monotonic() < end:
        resp = await http.get(f"/v1/order-views/{order_id}")
        last = (resp.status_code, resp.text)
        assert resp.status_code in (200, 404), last
        if resp.status_code == 200 and all(resp.json().get(k) == v for k, v in want.items()):
            doc: dict[str, Any] = resp.json()
            return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"view of {order_id} never showed {want}: {last}")


class Shop:
    def __init__(self, nats: NatsServer, tmp: Path, mode: str) -> None:
        self.nats = nats
        self.mode = mode
        self.cluster = ShopCluster(
            nats.url,
            tmp / "data",
            env={n: {"SHOP_MODE": mode, "SHOP_ACK_WAIT": "2"} for n in SERVICES},
        )
        self.bus: EventBus | None = None
        self.tracker: SagaTracker | None = None
        self.url = ""

    async def start(self) -> Shop:
        await asyncio.to_thread(self.cluster.start)
        gw = await asyncio.to_thread(self.cluster.start_gateway, DESCRIPTOR_SET)
        self.url = gw.url
        self.bus = await EventBus.connect(self.nats.url, name="test-cqrs")
        if self.mode == "choreography":
            self.tracker = await SagaTracker(self.bus, SHOP_STREAM, ORDER_SAGA).start()
        return self

    async def final(self, saga_id: str, within: float = 30) -> str:
        assert self.bus is not None
        if self.tracker is not None:
            assert self.tracker.store is not None
            status = await self.tracker.store.wait(saga_id, within=within)
            return state_name(status.state) if status is not None else "MISSING"
        end = time.monotonic() + within
        while True:
            status = await load_status(self.bus, saga_id, saga_type="order", config=SHOP_ORCH)
            name = state_name(status.state) if status is not None else "MISSING"
            if name not in ("MISSING", "RUNNING", "COMPENSATING") or time.monotonic() > end:
                return name
            await asyncio.sleep(0.05)

    async def stop(self) -> dict[str, int | None]:
        if self.tracker is not None:
            await self.tracker.stop()
        if self.bus is not None:
            await self.bus.close()
        return await asyncio.to_thread(self.cluster.stop)


@pytest.fixture
async def nats() -> AsyncIterator[NatsServer]:
    async with NatsServer() as server:
        yield server


def test_the_demo_in_orchestrated_mode_exits_zero() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "examples.shop.demo", "--mode", "orchestrated", "--quiet"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary: OK — orchestrated: 10 sagas (4 completed, 6 compensated)" in proc.stdout
    # The demo read the final state of every order from the query side.
    assert "order views from the query side" in proc.stdout
    assert proc.stdout.count("COMPLETED stock=RESERVED    payment=PAID") == 4
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("mode", ["choreography", "orchestrated"])
async def test_the_query_side_serves_the_order_view_over_rest(
    mode: str, nats: NatsServer, tmp_path: Path
) -> None:
    import httpx

    shop = await Shop(nats, tmp_path, mode).start()
    try:
        async with httpx.AsyncClient(base_url=shop.url, timeout=15) as http:
            ok = await http.post("/v1/orders", json=_body("olivia", "KR", f"{mode}-ok"))
            bad = await http.post("/v1/orders", json=_body("peggy", "XX", f"{mode}-ship"))
            assert ok.status_code == 200 and bad.status_code == 200, (ok.text, bad.text)
            ok_id, bad_id = ok.json()["orderId"], bad.json()["orderId"]
            # The command side answers with the aggregate's state.
            assert ok.json()["status"] == "ORDER_STATUS_CREATED"
            assert await shop.final(ok_id) == "COMPLETED"
            assert await shop.final(bad_id) == "COMPENSATED"

            view = await _view(http, ok_id, status="COMPLETED", shipment="SCHEDULED")
            assert view["orderId"] == ok_id and view["customerId"] == "olivia"
            assert [(i["sku"], i["quantity"]) for i in view["items"]] == [("book", 2), ("pen", 1)]
            assert view["total"] == {"currency": "KRW", "amountMinor": "31200"}
            assert view["stock"] == "RESERVED"
            assert view["payment"] == "PAID" and view["paid"]["amountMinor"] == "31200"
            assert view["shipment"] == "SCHEDULED" and view["shipmentId"]
            assert view["city"] == "Busan"
            # Five events shaped it (created, reserved, paid, shipped, completed), each once,
            # though the order's own events arrive from the event store and the saga stream both.
            assert int(view["version"]) == 5

            failed = await _view(http, bad_id, status="CANCELLED", stock="RELEASED")
            assert failed["payment"] == "REFUNDED"
            assert failed["stock"] == "RELEASED"
            assert failed["shipment"] == "FAILED"
            assert "cannot ship" in failed["cancelReason"]

            listed = await http.get("/v1/order-views", params={"customer_id": "olivia"})
            assert listed.status_code == 200, listed.text
            assert [v["orderId"] for v in listed.json()["views"]] == [ok_id]
            missing = await http.get("/v1/order-views/nope")
            assert missing.status_code == 404

            # The command side still serves one order (a replay of its events).
            got = await http.get(f"/v1/orders/{ok_id}")
            assert got.status_code == 200 and got.json()["status"] == "ORDER_STATUS_COMPLETED"

        # `meshkit saga show` displays the saga whichever way it ran.
        shown = await asyncio.to_thread(_cli, nats.url, "show", ok_id)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        kind = "orchestrated" if mode == "orchestrated" else "choreographed"
        assert f"saga {ok_id} (order): COMPLETED\nkind: {kind}\n" in shown.stdout
        step = (
            "SCHEDULE_SHIPPING: PAYMENT_COMPLETED -> COMPLETED"
            if mode == "orchestrated"
            else "shop.v1.OrderCompleted"
        )
        assert step in shown.stdout
        listed_cli = await asyncio.to_thread(_cli, nats.url, "list", "--json")
        assert listed_cli.returncode == 0, listed_cli.stderr
        states = {
            s["sagaId"]: s["state"].removeprefix("SAGA_STATE_")
            for s in json.loads(listed_cli.stdout)
        }
        assert states[ok_id] == "COMPLETED" and states[bad_id] == "COMPENSATED"
    finally:
        codes = await shop.stop()
    assert all(c == 0 for n, c in codes.items() if n != "gateway"), codes


async def test_orders_are_event_sourced_in_the_saga_stream_and_stored_once(
    nats: NatsServer, tmp_path: Path
) -> None:
    """The order's events live in SHOP on the order store's subjects, each stored once:
    the participants consume them there, with no copy on the saga subjects."""
    import httpx

    shop = await Shop(nats, tmp_path, "choreography").start()
    try:
        async with httpx.AsyncClient(base_url=shop.url, timeout=15) as http:
            first = await http.post("/v1/orders", json=_body("quinn", "KR", "es-1"))
            again = await http.post("/v1/orders", json=_body("quinn", "KR", "es-1"))
            assert first.status_code == again.status_code == 200
            order_id = first.json()["orderId"]
            assert again.json()["orderId"] == order_id
            assert await shop.final(order_id) == "COMPLETED"
            await _view(http, order_id, status="COMPLETED", shipment="SCHEDULED")
        assert shop.bus is not None
        # Two events in the aggregate's stream (the retried create appended nothing),
        # each on a subject that names its type.
        head = ORDERS_STORE.subject_prefix
        info = await shop.bus.js.stream_info(
            ORDERS_STORE.stream, subjects_filter=f"{head}.*.order.{order_id}"
        )
        assert info.state.subjects == {
            f"{head}.shop:v1:OrderCreated.order.{order_id}": 1,
            f"{head}.shop:v1:OrderCompleted.order.{order_id}": 1,
        }
        assert ORDERS_STORE.stream == SHOP_STREAM.name
        stored = await EventStore(shop.bus.nc, ORDERS_STORE).read("order", order_id)
        # Everything of this saga in SHOP: the order's two events once each, where
        # the store appended them, and the other participants' events.
        sinfo = await shop.bus.js.stream_info(SHOP_STREAM.name)
        saga = []
        for seq in range(sinfo.state.first_seq, sinfo.state.last_seq + 1):
            raw = await shop.bus.js.get_msg(SHOP_STREAM.name, seq)
            env = Envelope.from_headers(raw.headers)
            if env.saga_id == order_id:
                saga.append((env.event_type, env.event_id, raw.subject))
        from_order = sorted(s for s in saga if s[0] in {e.event_type for e in stored})
        assert from_order == sorted((e.event_type, e.event_id, e.subject) for e in stored)
        assert all(s[2].startswith(f"{head}.") for s in from_order)
        assert len(saga) == 6  # created, reserved, charged, scheduled, completed, notified
        assert len({s[1] for s in saga}) == 6
    finally:
        await shop.stop()


async def test_an_order_accepted_before_a_crash_still_runs_its_orchestrated_saga(
    nats: NatsServer, tmp_path: Path
) -> None:
    """CreateOrder's append is the only write: a crash right after it (here, the order
    service is down and the order was appended) must not leave an order without a saga."""
    from examples.shop.domain import AGGREGATE, Order
    from examples.shop.gen.shop.v1 import common_pb2, orders_pb2
    from examples.shop.order import order_id_for
    from meshkit.saga import derive_event_id
    from meshkit.saga.eventstore import EventStore, Repository

    shop = await Shop(nats, tmp_path, "orchestrated").start()
    try:
        assert shop.bus is not None
        await asyncio.to_thread(shop.cluster.stop_one, "order")
        order_id = order_id_for("crash-after-append")
        price = common_pb2.Money(currency="KRW", amount_minor=15000)
        req = orders_pb2.CreateOrderRequest(
            customer_id="rita",
            items=[common_pb2.LineItem(sku="book", quantity=1, unit_price=price)],
            shipping_address=common_pb2.Address(name="rita", city="Busan", country="KR"),
            request_id="crash-after-append",
        )
        orders = Repository(EventStore(shop.bus.nc, ORDERS_STORE, source="order"), AGGREGATE, Order)
        await orders.execute(
            order_id,
            lambda o: o.create(req),
            event_ids=lambda i: derive_event_id(order_id, "order.create", i),
            saga_id=order_id,
            saga_type="order",
        )
        assert await load_status(shop.bus, order_id, saga_type="order", config=SHOP_ORCH) is None
        await asyncio.to_thread(shop.cluster.restart, "order")
        assert await shop.final(order_id) == "COMPLETED"
    finally:
        await shop.stop()
