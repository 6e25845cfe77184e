"""``make demo``: the seed's order saga, choreographed over NATS JetStream, end to end.

Starts an embedded nats-server (or uses ``NATS_URL``), the five shop services
as separate processes and a saga tracker, places orders that take every path
(success; out of stock; payment declined; shipping failure), prints each
saga's timeline and final state, checks the invariants, stops everything and
exits 0 only when all of them hold.
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

    def __init__(self, address: str) -> None:
        from examples.shop import wiring
        from examples.shop.gen.shop.v1 import orders_pb2_grpc

        self.channel = wiring.channel(address)
        self.stub = orders_pb2_grpc.OrderServiceStub(self.channel)

    async def create(self, s: Scenario, request_id: str) -> str:
        from examples.shop.gen.shop.v1 import common_pb2, orders_pb2

        req = orders_pb2.CreateOrderRequest(
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
        order = await self.stub.CreateOrder(req, timeout=10)
        return str(order.order_id)

    async def close(self) -> None:
        await self.channel.close()


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


async def _run(quiet: bool, via: str) -> int:
    ensure_generated()
    from examples.shop import invariants
    from examples.shop._gen import DESCRIPTOR_SET
    from examples.shop.flow import INITIAL_STOCK, ORDER_SAGA, SHOP_STREAM
    from examples.shop.runner import ShopCluster
    from meshkit.nats import dev_server
    from meshkit.saga import EventBus, SagaTracker, state_name

    t0 = time.monotonic()
    failures: list[str] = []
    with dev_server() as nats:
        print(f"nats-server with JetStream at {nats.url}")
        cluster = ShopCluster(nats.url)
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
                orders = GrpcOrders(cluster.address("order"))
            tracker = await SagaTracker(bus, SHOP_STREAM, ORDER_SAGA).start()
            assert tracker.store is not None
            where = "POST /v1/orders through the gateway" if via == "rest" else "gRPC"
            print(f"placing {len(SCENARIOS)} orders over {where}")
            run_id = os.urandom(4).hex()
            ids = await asyncio.gather(
                *(orders.create(s, f"demo-{run_id}-{i}") for i, s in enumerate(SCENARIOS))
            )
            # A retried create (same request id) must not start a second saga.
            again = await orders.create(SCENARIOS[0], f"demo-{run_id}-0")
            if again != ids[0]:
                failures.append("a retried CreateOrder created a second order")
            await asyncio.gather(*(tracker.store.wait(i, within=30) for i in ids))
            # Final does not mean the tracker has recorded every step yet.
            await tracker.wait_caught_up(within=10)
            statuses = await asyncio.gather(*(tracker.store.get(i) for i in ids))
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
        print(f"summary: FAILED in {elapsed:.1f}s")
        for f in failures:
            print(f"  - {f}")
        return 1
    completed = sum(1 for s in SCENARIOS if s.expect == EXPECT_COMPLETED)
    print(
        f"summary: OK — {len(SCENARIOS)} sagas ({completed} completed, "
        f"{len(SCENARIOS) - completed} compensated), every invariant holds, in {elapsed:.1f}s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.shop.demo", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="omit the per-saga timelines")
    parser.add_argument(
        "--via",
        choices=("rest", "grpc"),
        default="rest",
        help="place orders through the gateway's REST API (default) or straight over gRPC",
    )
    args = parser.parse_args(argv)
    return asyncio.run(_run(args.quiet, args.via))


if __name__ == "__main__":
    sys.exit(main())
