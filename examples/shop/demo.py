"""``make demo``: the seed's order saga over NATS JetStream, end to end.

Starts an embedded nats-server (or uses ``NATS_URL``), the five shop services and
the order query service as separate processes, the gateway, and a saga tracker;
places orders that take every path (success; out of stock; payment declined;
shipping failure), prints each saga's timeline and final state, reads every
order's denormalized view from the query side (CQRS: eventually consistent, so it
waits for the projection), checks the invariants, stops everything and exits 0
only when all of them hold.

``--mode choreography`` (the default; ``make demo``) runs the saga as a
choreography; ``--mode orchestrated`` (or ``SHOP_MODE=orchestrated``) runs the
same business flow through the orchestrator's state machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from examples.shop._gen import ensure_generated

EXPECT_COMPLETED = "COMPLETED"
EXPECT_COMPENSATED = "COMPENSATED"


@dataclass(frozen=True)
class Scenario:
    label: str
    customer: str
    items: tuple[tuple[str, int, int], ...]  # sku, quantity, unit price (minor units)
    country: str
    expect: str  # final saga state


def order_request(s: Scenario, request_id: str) -> Any:
    """The CreateOrder request of scenario ``s`` (a shop.v1.CreateOrderRequest)."""
    from examples.shop.gen.shop.v1 import common_pb2, orders_pb2

    return orders_pb2.CreateOrderRequest(
        customer_id=s.customer,
        items=[
            common_pb2.LineItem(
                sku=sku,
                quantity=qty,
                unit_price=common_pb2.Money(currency="KRW", amount_minor=price),
            )
            for sku, qty, price in s.items
        ],
        shipping_address=common_pb2.Address(
            name=s.customer,
            line1="1 Main St",
            city="Seoul",
            postal_code="04524",
            country=s.country,
        ),
        request_id=request_id,
    )


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("success", "alice", (("book", 2, 15000), ("pen", 3, 1200)), "KR", EXPECT_COMPLETED),
    Scenario("success", "carol", (("lamp", 1, 49000),), "DE", EXPECT_COMPLETED),
    Scenario("success", "dave", (("book", 1, 15000),), "US", EXPECT_COMPLETED),
    Scenario("success (last vinyl)", "erin", (("rare-vinyl", 1, 99000),), "FR", EXPECT_COMPLETED),
    Scenario(
        "out of stock",
        "frank",
        (("rare-vinyl", 2, 99000), ("pen", 1, 1200)),
        "KR",
        EXPECT_COMPENSATED,
    ),
    Scenario("out of stock", "grace", (("lamp", 10_000, 49000),), "KR", EXPECT_COMPENSATED),
    Scenario("payment declined", "declined-heidi", (("book", 1, 15000),), "KR", EXPECT_COMPENSATED),
    Scenario("payment declined (limit)", "ivan", (("book", 700, 15000),), "KR", EXPECT_COMPENSATED),
    Scenario("shipping failure", "judy", (("book", 3, 15000),), "XX", EXPECT_COMPENSATED),
    Scenario(
        "shipping failure",
        "mallory",
        (("lamp", 2, 49000), ("pen", 5, 1200)),
        "XX",
        EXPECT_COMPENSATED,
    ),
)


class GrpcOrders:
    """Places orders over gRPC with meshkit's client interceptors (see wiring.py)."""

    def __init__(self, address: str, query_address: str | None = None) -> None:
        from examples.shop import wiring
        from examples.shop.gen.shop.v1 import orders_pb2_grpc, query_pb2_grpc

        self.channel = wiring.channel(address)
        self.stub = orders_pb2_grpc.OrderServiceStub(self.channel)
        self.query_channel = wiring.channel(query_address) if query_address else None
        self.query = (
            query_pb2_grpc.OrderQueryServiceStub(self.query_channel)
            if self.query_channel is not None
            else None
        )

    async def create(self, s: Scenario, request_id: str) -> str:
        order = await self.stub.CreateOrder(order_request(s, request_id), timeout=10)
        return str(order.order_id)

    async def view(self, order_id: str) -> dict[str, Any] | None:
        """The order's view from the query service, or None while it is not there yet."""
        import grpc
        from google.protobuf.json_format import MessageToDict

        from examples.shop.gen.shop.v1 import query_pb2

        if self.query is None:
            return None
        try:
            v = await self.query.GetOrderView(
                query_pb2.GetOrderViewRequest(order_id=order_id), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return MessageToDict(v)

    async def close(self) -> None:
        await self.channel.close()
        if self.query_channel is not None:
            await self.query_channel.close()


class RestOrders:
    """Places orders through the meshkit gateway's REST API (``POST /v1/orders``)."""

    def __init__(self, base_url: str) -> None:
        import httpx

        self.http = httpx.AsyncClient(base_url=base_url, timeout=15)

    async def create(self, s: Scenario, request_id: str) -> str:
        body = {
            "customerId": s.customer,
            "items": [
                {
                    "sku": sku,
                    "quantity": qty,
                    "unitPrice": {"currency": "KRW", "amountMinor": str(price)},
                }
                for sku, qty, price in s.items
            ],
            "shippingAddress": {
                "name": s.customer,
                "line1": "1 Main St",
                "city": "Seoul",
                "postalCode": "04524",
                "country": s.country,
            },
            "requestId": request_id,
        }
        resp = await self.http.post("/v1/orders", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"POST /v1/orders: HTTP {resp.status_code}: {resp.text}")
        return str(resp.json()["orderId"])

    async def view(self, order_id: str) -> dict[str, Any] | None:
        """``GET /v1/order-views/{order_id}`` (the query side), None while not there yet."""
        resp = await self.http.get(f"/v1/order-views/{order_id}")
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise RuntimeError(f"GET /v1/order-views/{order_id}: HTTP {resp.status_code}")
        doc: dict[str, Any] = resp.json()
        return doc

    async def close(self) -> None:
        await self.http.aclose()


def _timeline(status: Any) -> list[str]:
    from meshkit.saga import state_name

    start = status.started_at.ToMilliseconds()
    lines = []
    for step in sorted(status.steps, key=lambda st: st.at.ToMilliseconds()):
        offset = step.at.ToMilliseconds() - start
        mark = "↺" if step.compensation else "→"
        lines.append(
            f"      +{offset:4d} ms {mark} {step.event_type.rsplit('.', 1)[-1]:<24} by {step.source}"
        )
    elapsed = status.updated_at.ToMilliseconds() - start
    lines.insert(
        0,
        f"    state {state_name(status.state)} after {elapsed} ms"
        + (f" ({status.reason})" if status.reason else ""),
    )
    return lines


FINAL_VIEW = {EXPECT_COMPLETED: "COMPLETED", EXPECT_COMPENSATED: "CANCELLED"}


def settled(view: dict[str, Any] | None, expect: str) -> bool:
    """Whether an order's view shows the end of its saga.

    The view follows several streams (the order's own events, the saga's events),
    each folded in its own order, so the order's final status can show up before the
    saga's last step; wait for both.
    """
    if view is None or view.get("status") != FINAL_VIEW[expect]:
        return False
    if expect == EXPECT_COMPLETED:
        return view.get("shipment") == "SCHEDULED"
    return view.get("stock") in ("UNAVAILABLE", "RELEASED")


async def wait_views(
    orders: GrpcOrders | RestOrders, ids: list[str], expect: list[str], within: float = 15.0
) -> dict[str, dict[str, Any] | None]:
    """Read each order's view from the query side until it shows the saga's end.

    The query side is eventually consistent: the projection may still be folding
    in the saga's last events, so poll (with a timeout) instead of reading once.
    """
    deadline = time.monotonic() + within
    views: dict[str, dict[str, Any] | None] = {i: None for i in ids}
    want = dict(zip(ids, expect, strict=True))
    while True:
        missing = [i for i in ids if not settled(views[i], want[i])]
        if not missing or time.monotonic() > deadline:
            return views
        got = await asyncio.gather(*(orders.view(i) for i in missing))
        views.update(zip(missing, got, strict=True))
        await asyncio.sleep(0.05)


def _view_line(v: dict[str, Any] | None) -> str:
    if v is None:
        return "(no view)"
    items = ",".join(f"{i.get('sku')}x{i.get('quantity')}" for i in v.get("items", []))
    total = v.get("total", {})
    return (
        f"{v.get('status', '?'):<9} stock={v.get('stock', '-'):<11} payment={v.get('payment', '-'):<8} "
        f"shipment={v.get('shipment', '-'):<9} {total.get('amountMinor', total.get('amount_minor', 0))} "
        f"{total.get('currency', '')} [{items}]"
    )


async def _run(quiet: bool, via: str, mode: str = "choreography") -> int:
    ensure_generated()
    from examples.shop import invariants
    from examples.shop._gen import DESCRIPTOR_SET
    from examples.shop.flow import INITIAL_STOCK, ORDER_SAGA, SHOP_ORCH, SHOP_STREAM
    from examples.shop.runner import SERVICES, ShopCluster
    from meshkit.nats import dev_server
    from meshkit.saga import EventBus, SagaTracker, state_name
    from meshkit.saga.orchestrator import load_status

    t0 = time.monotonic()
    failures: list[str] = []
    with dev_server() as nats:
        print(f"nats-server with JetStream at {nats.url}")
        print(f"saga mode: {mode}")
        cluster = ShopCluster(nats.url, env={n: {"SHOP_MODE": mode} for n in SERVICES})
        await asyncio.to_thread(cluster.start)
        bus = await EventBus.connect(nats.url, name="shop-demo", source="demo")
        tracker: SagaTracker | None = None
        orders: GrpcOrders | RestOrders | None = None
        try:
            for name, svc in cluster.procs.items():
                print(f"  {name:<13} pid {svc.proc.pid:<7} gRPC {svc.address}")
            if via == "rest":
                gw = await asyncio.to_thread(cluster.start_gateway, DESCRIPTOR_SET)
                print(f"  {'gateway':<13} pid {gw.proc.pid:<7} REST {gw.url}")
                orders = RestOrders(gw.url)
            else:
                orders = GrpcOrders(cluster.address("order"), cluster.address("query"))
            if mode == "choreography":
                tracker = await SagaTracker(bus, SHOP_STREAM, ORDER_SAGA).start()
                assert tracker.store is not None
            where = "POST /v1/orders through the gateway" if via == "rest" else "gRPC"
            print(f"placing {len(SCENARIOS)} orders over {where}")
            run_id = os.urandom(4).hex()
            ids = list(
                await asyncio.gather(
                    *(orders.create(s, f"demo-{run_id}-{i}") for i, s in enumerate(SCENARIOS))
                )
            )
            # A retried create (same request id) must not start a second saga.
            again = await orders.create(SCENARIOS[0], f"demo-{run_id}-0")
            if again != ids[0]:
                failures.append("a retried CreateOrder created a second order")
            if tracker is not None:
                assert tracker.store is not None
                await asyncio.gather(*(tracker.store.wait(i, within=30) for i in ids))
                # Final does not mean the tracker has recorded every step yet.
                await tracker.wait_caught_up(within=10)
                statuses = await asyncio.gather(*(tracker.store.get(i) for i in ids))
            else:
                statuses = await asyncio.gather(
                    *(_orchestrated_final(bus, i, SHOP_ORCH, load_status) for i in ids)
                )
            print()
            for s, order_id, status in zip(SCENARIOS, ids, statuses, strict=True):
                state = state_name(status.state) if status is not None else "MISSING"
                ok = state == s.expect
                print(
                    f"  {'ok ' if ok else 'BAD'} saga {order_id[:12]}  {s.label:<26} customer {s.customer}"
                )
                if status is not None and not quiet:
                    print("\n".join(_timeline(status)))
                if not ok:
                    failures.append(
                        f"saga {order_id} ({s.label}) ended {state}, expected {s.expect}"
                    )
            # The query side (CQRS): each order's denormalized view, eventually consistent.
            started = time.monotonic()
            views = await wait_views(orders, ids, [s.expect for s in SCENARIOS])
            took = (time.monotonic() - started) * 1000
            source = "GET /v1/order-views/{id}" if via == "rest" else "OrderQueryService"
            print()
            print(f"order views from the query side ({source}; caught up within {took:.0f} ms):")
            for s, order_id in zip(SCENARIOS, ids, strict=True):
                v = views[order_id]
                print(f"  {order_id[:12]} {_view_line(v)}")
                if not settled(v, s.expect):
                    failures.append(
                        f"order view {order_id} ({s.label}): {v and v.get('status')}, "
                        f"expected {FINAL_VIEW[s.expect]}"
                    )
            # The last hops (stock commit, notifications) may still be in flight.
            report = invariants.check(cluster.data_dir, INITIAL_STOCK)
            deadline = time.monotonic() + 10
            while not report.ok and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                report = invariants.check(cluster.data_dir, INITIAL_STOCK)
            failures.extend(report.problems)
            print()
            print("invariants:")
            for sku, (available, reserved) in sorted(report.stock.items()):
                print(
                    f"  stock {sku:<11} {INITIAL_STOCK[sku]:>5} -> {available:>5} available, {reserved} reserved"
                )
            print(
                f"  orders: {report.completed} completed, {report.cancelled} cancelled, {report.pending} pending"
            )
            print(
                f"  ledger: {report.charges} charges, {report.refunds} refunds; no order charged twice: "
                f"{'yes' if not any('charged' in p for p in report.problems) else 'NO'}"
            )
        finally:
            if orders is not None:
                await orders.close()
            if tracker is not None:
                await tracker.stop()
            await bus.close()
            codes = await asyncio.to_thread(cluster.stop)
            cluster.cleanup()
        # uvicorn re-raises the SIGTERM it handled, so the gateway's clean exit is -15.
        bad_exits = {n: c for n, c in codes.items() if c != 0 and not (n == "gateway" and c == -15)}
        if bad_exits:
            failures.append(f"services exited uncleanly: {bad_exits}")
    elapsed = time.monotonic() - t0
    print()
    if failures:
        print(f"summary: FAILED ({mode}) in {elapsed:.1f}s")
        for f in failures:
            print(f"  - {f}")
        return 1
    completed = sum(1 for s in SCENARIOS if s.expect == EXPECT_COMPLETED)
    print(
        f"summary: OK — {mode}: {len(SCENARIOS)} sagas ({completed} completed, "
        f"{len(SCENARIOS) - completed} compensated), every invariant holds, in {elapsed:.1f}s"
    )
    return 0


async def _orchestrated_final(bus: Any, saga_id: str, config: Any, load: Any) -> Any:
    """Poll the orchestrator's saga state (KV) until final or 30 s pass."""
    from meshkit.saga import state_name

    deadline = time.monotonic() + 30
    while True:
        status = await load(bus, saga_id, saga_type="order", config=config)
        final = status is not None and state_name(status.state) not in ("RUNNING", "COMPENSATING")
        if final or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.shop.demo", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="omit the per-saga timelines")
    parser.add_argument(
        "--via",
        choices=("rest", "grpc"),
        default="rest",
        help="place orders through the gateway's REST API (default) or straight over gRPC",
    )
    parser.add_argument(
        "--mode",
        choices=("choreography", "orchestrated"),
        default=os.environ.get("SHOP_MODE") or "choreography",
        help="run the saga as a choreography (default) or through the orchestrator "
        "(also SHOP_MODE=orchestrated)",
    )
    args = parser.parse_args(argv)
    return asyncio.run(_run(args.quiet, args.via, args.mode))


if __name__ == "__main__":
    sys.exit(main())
