"""Run the event-sourced, orchestrated order saga end to end (``python -m examples.es_orders``).

Starts an embedded nats-server (or uses ``NATS_URL``), the five command
participants, the orchestrator and the order view projection; places three
orders (success, out of stock, payment declined); prints each saga's timeline,
the order view and an order as of an earlier version; exits 0 when all hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile

from examples.es_orders.app import EVENTS, ORCHESTRATION, view
from examples.es_orders.domain import AGGREGATE, ORDER_CODEC, Order
from examples.es_orders.saga import ORDER_SAGA, Shop, order_request, participants
from meshkit._pb.meshkit.v1 import saga_pb2
from meshkit.nats import NatsServer
from meshkit.saga.bus import EventBus
from meshkit.saga.eventstore import EventStore, Repository
from meshkit.saga.orchestrator import Orchestrator, load_status
from meshkit.saga.projections import Projector
from meshkit.saga.readmodels import SqliteReadModelStore
from meshkit.saga.snapshots import SnapshotStore

ORDERS = {
    "demo-ok": order_request("alice", ("apple", 2, 1500), ("pear", 1, 3000)),
    "demo-nostock": order_request("bob", ("pear", 99, 3000)),
    "demo-declined": order_request("carol", ("apple", 1, 900_000)),
}
EXPECTED = {"demo-ok": "COMPLETED", "demo-nostock": "FAILED", "demo-declined": "FAILED"}


async def run(url: str, db: str) -> int:
    shop = Shop(stock={"apple": 10, "pear": 5})
    bus = await EventBus.connect(url, name="es-orders")
    try:
        store = EventStore(bus.nc, EVENTS, source="order")
        await store.ensure()
        snapshots = SnapshotStore(bus.nc, bucket="es_orders_snapshots")
        for p in participants(shop, store, snapshots):
            await p.start(bus, ORCHESTRATION)
        orchestrator = await Orchestrator(bus, ORDER_SAGA, config=ORCHESTRATION).start()
        projector = await Projector(bus.nc, view(), SqliteReadModelStore(db)).start()

        for saga_id, request in ORDERS.items():
            await orchestrator.begin(saga_id, request)
        ok = True
        for saga_id in ORDERS:
            inst = await orchestrator.wait(saga_id, within=30)
            status = await load_status(bus, saga_id, config=ORCHESTRATION)
            path = " -> ".join(s.to_state for s in inst.history)
            print(
                f"saga {saga_id}: {inst.state} ({saga_pb2.SagaState.Name(status.state)})\n    {path}"
            )
            ok &= inst.state == EXPECTED[saga_id]
        await projector.wait_caught_up(within=30)
        print("\norder view (query side, SQLite):")
        for doc in projector.store.find("order_view", "orders"):
            print(
                f"  {doc['order_id']:<18} {doc.get('status', '?'):<10} stock={doc.get('stock', '-'):<11}"
                f" payment={doc.get('payment', '-'):<9} shipment={doc.get('shipment', '-')}"
            )
        orders = Repository(store, AGGREGATE, Order, snapshots=snapshots, codec=ORDER_CODEC)
        now = await orders.load("o-demo-declined")
        then = await orders.load("o-demo-declined", version=1)
        print(
            f"\ntime travel: o-demo-declined is {now.state.status} at v{now.version.number}, "
            f"was {then.state.status} at v{then.version.number} (1=PENDING 2=CREATED 4=CANCELLED)"
        )
        ok &= shop.stock == {"apple": 8, "pear": 4} and len(shop.charges) == 1
        print(f"\nstock {shop.stock}, charges {len(shop.charges)}: {'OK' if ok else 'FAILED'}")
        await projector.stop()
        await orchestrator.stop()
        return 0 if ok else 1
    finally:
        await bus.close()


def main() -> int:
    url = os.environ.get("NATS_URL")
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "view.db")
        if url:
            return asyncio.run(run(url, db))
        with NatsServer() as server, contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(run(server.url, db))
    return 130


if __name__ == "__main__":
    sys.exit(main())
