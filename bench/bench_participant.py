"""One saga participant's cost per event, meshkit against the hand-written loop, in one run.

``bench_saga`` measures the whole order saga; this isolates one hop of it. The shop's
notification participant (``examples/shop/notification.py``: handle OrderCompleted,
insert a notification row, emit CustomerNotified) drains a backlog of N events on
its own nats-server:

* **meshkit**: ``Participant.start`` with ``SqliteInbox`` in the shop's ``Store``
  (the batch path: one inbox transaction per arrival, every output published before
  the first stream ack is awaited, then the acks), events published with meshkit's
  envelope headers as the order service's would be;
* **peer**: ``bench/_saga_peer.py``'s ``Participant`` loop for the notification role
  (one transaction per fetched batch, publish, ack), events with ``Nats-Msg-Id`` only.

The backlog is published before the clock starts; the phase ends when the durable
consumer has nothing pending or unacknowledged. Figures are CPU microseconds per
event of this process (the participant runs in it, as the only work) and of
nats-server, medians over alternating rounds, and their ratios. The difference is
meshkit's per-event work: its envelope and its batch machinery. The notification
handler is idempotent by construction (``idempotent=True`` since #15, stop 14), so
it runs in the inbox's transaction with no record kept; results before that stop
include the record, which ``bench_inbox`` prices alone. Writes
``bench/results/participant.json``.

``--role order`` measures the order service's hop instead: ShipmentScheduled in,
the order completed. meshkit's ``examples/shop/order.py`` participant
(``IdempotentInbox``; its handler's only effect is ``Repository.execute`` appending
OrderCompleted to the order's event-sourced aggregate, which is cached, as the
order service has it after CreateOrder) against the peer's ``UPDATE orders`` and
publish. The orders exist before the clock starts on both sides. Writes
``bench/results/participant_order.json`` (backlog only).

``--trickle RATE`` feeds the events instead, one at a time at RATE per second, from
a publisher process of its own (the order service's headers on meshkit's side,
``Nats-Msg-Id`` on the peer's): each batch is then one event, so the figure is the
cost of a batch as a saga under light load makes them. Writes
``bench/results/participant_trickle.json``.

    .venv/bin/python -m bench.bench_participant [--events 5000] [--rounds 5]
        [--trickle 1500] [--role notification|order]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import write  # noqa: E402
from bench.bench_saga import _cpu_seconds, order_request  # noqa: E402
from examples.shop.gen.shop.v1 import events_pb2 as ev  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "participant.json"
TRICKLE_RESULTS = ROOT / "bench" / "results" / "participant_trickle.json"
ORDER_RESULTS = ROOT / "bench" / "results" / "participant_order.json"
ROLES = ("notification", "order")


def durable(role: str) -> str:
    """The role's consumer, the same name on both sides."""
    return f"SHOP-{role}"


async def _meshkit(
    url: str, tmp: str, events: int, role: str = "notification"
) -> tuple[Callable[[], Awaitable[Any]], Any]:
    """Publish the backlog; return (start the participant, stop it)."""
    from examples.shop import notification
    from examples.shop import order as order_service
    from examples.shop.flow import SHOP_STREAM
    from examples.shop.store import Store
    from meshkit.saga import EventBus, IdempotentInbox, SqliteInbox
    from meshkit.saga.envelope import Envelope

    bus = await EventBus.connect(url, name="bench-participant")
    await bus.ensure_stream(SHOP_STREAM)
    # The notification participant's own database (the order service keeps none).
    store = (
        Store(os.path.join(tmp, "notification.sqlite"), notification.SCHEMA)
        if role == "notification"
        else None
    )
    order_ids = await _meshkit_orders(bus, events) if role == "order" else []
    messages = []
    for i in range(events):
        if role == "order":
            order_id = order_ids[i]
            event: Any = ev.ShipmentScheduled(order_id=order_id, shipment_id=uuid.uuid4().hex)
            source = "shipping"
        else:
            order_id = uuid.uuid4().hex
            event = ev.OrderCompleted(order_id=order_id, customer_id="c-1")
            source = "order"
        env = Envelope.new(
            event, saga_id=order_id, source=source, saga_type="order", causation_id=order_id
        )
        messages.append(
            (SHOP_STREAM.subject_for(env.event_type), event.SerializeToString(), env.to_headers())
        )
    for error in await bus.publish_many(messages):
        assert error is None, error
    running: list[Any] = []

    async def start() -> None:
        if store is None:
            # As examples/shop/order.py's build wires it: no inbox record.
            running.append(await order_service.PARTICIPANT.start(bus, inbox=IdempotentInbox()))
        else:
            running.append(
                await notification.PARTICIPANT.start(bus, inbox=SqliteInbox(store.conn, store.lock))
            )

    async def stop() -> None:
        for r in running:
            await r.stop()
        await bus.close()
        if store is not None:
            store.close()

    return start, stop


async def _meshkit_orders(bus: Any, n: int) -> list[str]:
    """``n`` orders created as CreateOrder creates them, in the repository the order
    participant's handlers use (cached there, as in the running service)."""
    from examples.shop import order as order_service
    from examples.shop.domain import AGGREGATE, Order
    from examples.shop.flow import ORDERS_STORE
    from meshkit.saga import derive_event_id
    from meshkit.saga.eventstore import EventStore, Repository

    store = EventStore(bus.nc, ORDERS_STORE, source="order")
    await store.ensure()
    orders: Repository[Order] = Repository(store, AGGREGATE, Order, cache_size=10_000)
    order_service._ORDERS[:] = [orders]
    ids = []
    for _ in range(n):
        request = order_request(uuid.uuid4().hex, "c-1")
        order_id = order_service.order_id_for(request.request_id)
        await orders.execute(
            order_id,
            lambda o, r=request: o.create(r),
            event_ids=lambda i, o=order_id: derive_event_id(o, "order.create", i),
            saga_id=order_id,
            saga_type="order",
            expect_new=True,
        )
        ids.append(order_id)
    return ids


async def _peer(
    url: str, tmp: str, events: int, role: str = "notification"
) -> tuple[Callable[[], Awaitable[Any]], Any]:
    import nats

    from bench import _saga_peer as peer

    nc = await nats.connect(url, name="bench-participant-peer")
    js = nc.jetstream()
    await peer.ensure(js, role)
    conn = peer.open_db(os.path.join(tmp, f"peer-{role}.sqlite"), role)
    order_ids: list[str] = []
    if role == "order":
        conn.execute("BEGIN IMMEDIATE")
        for _ in range(events):
            request = order_request(uuid.uuid4().hex, "c-1")
            order_ids.append(peer.order_id_for(request.request_id))
            peer.create_order(conn, order_ids[-1], request)
        conn.execute("COMMIT")
    sends = []
    for i in range(events):
        if role == "order":
            order_id = order_ids[i]
            event: Any = ev.ShipmentScheduled(order_id=order_id, shipment_id=uuid.uuid4().hex)
            headers = {"Nats-Msg-Id": peer.derive_id(order_id, "shipping")}
        else:
            order_id = uuid.uuid4().hex
            event = ev.OrderCompleted(order_id=order_id, customer_id="c-1")
            headers = {"Nats-Msg-Id": peer.derive_id(order_id, "order.complete")}
        sends.append(
            js.publish(peer.subject(type(event)), event.SerializeToString(), headers=headers)
        )
    await asyncio.gather(*sends)
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        pull = peer.PullStream(nc, peer.STREAM, durable(role))
        await pull.start()
        tasks.append(asyncio.create_task(peer.Participant(role, conn, js).run(pull)))

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await nc.close()
        conn.close()

    return start, stop


async def _drained(url: str, events: int, role: str = "notification") -> None:
    """Until the role's consumer has had ``events`` messages and none is left or unacked."""
    import nats

    nc = await nats.connect(url, name="bench-participant-watch")
    js = nc.jetstream()
    try:
        while True:
            await asyncio.sleep(0.02)
            info = await js.consumer_info("SHOP", durable(role))
            if (
                info.num_pending == 0
                and info.num_ack_pending == 0
                and (info.ack_floor.consumer_seq or 0) >= events
            ):
                return
    finally:
        await nc.close()


async def one_side(
    side: str, events: int, trickle: float = 0.0, role: str = "notification"
) -> tuple[float, float]:
    from meshkit.nats import NatsServer

    async with NatsServer() as server:
        with tempfile.TemporaryDirectory(prefix="meshkit-bench-participant-") as tmp:
            make = _meshkit if side == "meshkit" else _peer
            backlog = 1 if trickle else events  # trickling: one event to start on
            start, stop = await make(server.url, tmp, backlog, role)
            if trickle:
                await start()
                await asyncio.wait_for(_drained(server.url, backlog, role), 60)
            # Collected as both sides' services collect (examples/shop/_service.py's
            # tune_gc, bench/_saga_peer.py): what was made before the clock is frozen.
            gc.collect()
            gc.freeze()
            thresholds = gc.get_threshold()
            gc.set_threshold(50_000, 20, 100)
            cpu0, srv0 = time.process_time(), _cpu_seconds(server.pid or 0)
            if trickle:
                feeder = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.bench_participant",
                    "--feed",
                    server.url,
                    side,
                    str(events),
                    str(trickle),
                    cwd=ROOT,
                )
                if await feeder.wait() != 0:
                    raise RuntimeError(f"the {side} feeder failed")
            else:
                await start()
            # The watcher's polls cost the same on both sides (a few dozen requests).
            stored = backlog + events if trickle else events
            await asyncio.wait_for(_drained(server.url, stored, role), 120)
            cpu, srv = time.process_time() - cpu0, _cpu_seconds(server.pid or 0) - srv0
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            await stop()
    return cpu / events * 1e6, srv / events * 1e6


async def feed(url: str, side: str, events: int, rate: float) -> None:
    """Publish ``events`` OrderCompleted one at a time, ``rate`` per second (a process
    of its own, so its work is not the participant's)."""
    import nats

    from bench import _saga_peer as peer
    from meshkit.saga.envelope import Envelope

    nc = await nats.connect(url, name="bench-participant-feed")
    messages = []
    for _ in range(events):
        order_id = uuid.uuid4().hex
        event = ev.OrderCompleted(order_id=order_id, customer_id="c-1")
        if side == "meshkit":
            headers = Envelope.new(
                event, saga_id=order_id, source="order", saga_type="order", causation_id=order_id
            ).to_headers()
        else:
            headers = {"Nats-Msg-Id": peer.derive_id(order_id, "order.complete")}
        messages.append((peer.subject(ev.OrderCompleted), event.SerializeToString(), headers))
    start = time.perf_counter()
    for i, (subject, payload, headers) in enumerate(messages):
        await nc.publish(subject, payload, headers=headers)
        await nc.flush()
        ahead = start + (i + 1) / rate - time.perf_counter()
        if ahead > 0:
            await asyncio.sleep(ahead)
    await nc.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, list[tuple[float, float]]] = {"meshkit": [], "peer": []}
    for r in range(args.rounds):
        for side in ("meshkit", "peer") if r % 2 == 0 else ("peer", "meshkit"):
            proc, srv = await one_side(side, args.events, args.trickle, args.role)
            rows[side].append((proc, srv))
            print(f"round {r + 1} {side:8s} {proc:6.1f} us/event here, nats-server {srv:5.1f}")
    proc_ratio = [m[0] / p[0] for m, p in zip(rows["meshkit"], rows["peer"], strict=True)]
    total_ratio = [
        (m[0] + m[1]) / (p[0] + p[1]) for m, p in zip(rows["meshkit"], rows["peer"], strict=True)
    ]
    summary = {
        side: {
            "participant_cpu_us_per_event": round(statistics.median(r[0] for r in rs), 1),
            "nats_server_cpu_us_per_event": round(statistics.median(r[1] for r in rs), 1),
        }
        for side, rs in rows.items()
    }
    ratios = {
        "participant_cpu_ratio": round(statistics.median(proc_ratio), 3),
        "total_cpu_ratio": round(statistics.median(total_ratio), 3),
    }
    print(f"meshkit {summary['meshkit']}\npeer    {summary['peer']}\nmeshkit / peer: {ratios}")
    how = (
        f"fed one event at a time, {args.trickle:g} per second, from a process of its own"
        if args.trickle
        else "draining a backlog"
    )
    if args.role == "order":
        what = (
            "the shop's order participant (ShipmentScheduled -> the order completed) "
            f"{how}: meshkit.saga (IdempotentInbox; Repository.execute appending "
            "OrderCompleted to the cached event-sourced order) vs bench/_saga_peer.py's "
            "loop (UPDATE orders, publish OrderCompleted)"
        )
    else:
        what = (
            f"the shop's notification participant {how}: meshkit.saga "
            "(SqliteInbox, batch path) vs bench/_saga_peer.py's loop, same handler and table"
        )
    return {
        "benchmark": (
            "participant_order"
            if args.role == "order"
            else "participant_trickle"
            if args.trickle
            else "participant"
        ),
        "description": f"{what}; CPU per event of the participant's process and of nats-server",
        "events_per_round": args.events,
        "trickle_events_per_s": args.trickle or None,
        "rounds": args.rounds,
        **summary,
        "ratios": ratios,
        "ratios_per_round": {
            "participant_cpu_ratio": [round(x, 3) for x in proc_ratio],
            "total_cpu_ratio": [round(x, 3) for x in total_ratio],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000, help="events per side per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument(
        "--trickle", type=float, default=0.0, help="events per second, one at a time (0: backlog)"
    )
    parser.add_argument(
        "--role", choices=ROLES, default="notification", help="the participant measured"
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    parser.add_argument(
        "--feed", nargs=4, metavar=("URL", "SIDE", "EVENTS", "RATE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.feed:
        url, side, events, rate = args.feed
        asyncio.run(feed(url, side, int(events), float(rate)))
        return 0
    if args.role == "order" and args.trickle:
        parser.error("--trickle feeds OrderCompleted to the notification participant only")
    if args.out is None:
        args.out = (
            ORDER_RESULTS if args.role == "order" else TRICKLE_RESULTS if args.trickle else RESULTS
        )
    try:
        import uvloop  # both sides' services run on it
    except ImportError:  # pragma: no cover
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    write(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
