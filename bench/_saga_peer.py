"""The order saga's success path, choreographed by hand with nats-py: bench_saga's peer.

What a competent engineer would write instead of using meshkit.saga, doing the shop's
domain work with the shop's payloads and tables:

* the same five processes (``python -m bench._saga_peer <role> --nats-url URL --port 0
  --db FILE``, printing ``READY <port>``): order (a grpc.aio ``OrderService.CreateOrder``
  with the shop's interceptors, so the entry costs what the shop's does), inventory,
  payment, shipping, notification;
* the same six events (``shop.v1.OrderCreated`` ... ``CustomerNotified``, the shop's
  generated protobuf modules) on the same subjects (``shop.events.<full name>``) in a
  file-storage stream ``SHOP`` with a 120 s duplicate window, each published with
  ``Nats-Msg-Id`` (the only header; the subject names the type, the payload carries
  the order id, which is the saga id);
* the same SQLite work: each participant's own database with the shop's tables (the
  DDL copied), the same selects, inserts and updates the shop's handlers do on the
  success path, written again here; the order service, event sourced in the shop,
  keeps its orders in a plain ``orders`` table (the shop has none to copy);
* one durable pull consumer per participant (explicit ack, ack wait 10 s, max deliver
  5, max ack pending 2000, filtered on the types it handles, as the shop's), pulled
  as a stream: a pull request for ``BATCH`` messages is kept open and topped up when
  half is used (what nats.go's ``Consume()`` does; nats-py's ``fetch(n)`` would wait
  for ``n`` messages or its timeout, so a trickle would wait out the timeout);
* per fetched batch, one SQLite transaction for every message in it, then the
  outputs are published (each awaiting its PubAck, all at once), then the inputs
  acked. A failing message naks alone (the batch is redone one message per
  transaction); a failed publish naks the batch.

Exactly-once effects without an inbox: every output's id is derived from its input's
(a redelivery republishes the same id, which JetStream drops inside the window) and
every handler finds its own earlier effect (the shop's domain functions are written
that way). No inbox, no tracing, no event store, no dead letters, no tracker.
Unlike the shop, an order committed but not yet published when the order process
dies starts its saga only when the client retries CreateOrder (same request id);
the shop's event store is its own outbox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
import sqlite3
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from nats.aio.msg import Msg
from nats.js import api

from examples.shop.gen.shop.v1 import (
    common_pb2,
    inventory_pb2,
    notification_pb2,
    orders_pb2,
    orders_pb2_grpc,
    payment_pb2,
    shipping_pb2,
)
from examples.shop.gen.shop.v1 import events_pb2 as ev

log = logging.getLogger("bench.saga_peer")

ROLES = ("order", "inventory", "payment", "shipping", "notification")
STREAM = "SHOP"
PREFIX = "shop.events."
BATCH = 128  # messages asked for per pull request (meshkit's max_in_flight in the shop)
PULL_EXPIRES = 30.0  # seconds a pull request stays open
# The shop's business rules (examples/shop/flow.py), copied.
DECLINED_CUSTOMER_PREFIX = "declined"
PAYMENT_LIMIT_MINOR = 10_000_000
UNSHIPPABLE_COUNTRIES = frozenset({"XX"})
INITIAL_STOCK = {"book": 1000, "pen": 5000 + 1_000_000, "lamp": 200, "rare-vinyl": 1}


def subject(cls: type[Message]) -> str:
    return PREFIX + cls.DESCRIPTOR.full_name


def derive_id(parent: str, who: str) -> str:
    """An output's id from its input's: a redelivery republishes the same id."""
    return hashlib.blake2b(f"{parent}/{who}".encode(), digest_size=16).hexdigest()


# -- the shop's tables (DDL copied from examples/shop/<service>.py) ---------------------

SCHEMAS = {
    # The shop's order service is event sourced (no table); here orders are rows.
    "order": """
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    data BLOB NOT NULL  -- shop.v1.Order as created
);
""",
    "inventory": """
CREATE TABLE IF NOT EXISTS stock (
    sku TEXT PRIMARY KEY,
    available INTEGER NOT NULL CHECK (available >= 0),
    reserved INTEGER NOT NULL CHECK (reserved >= 0)
);
CREATE TABLE IF NOT EXISTS reservations (
    order_id TEXT PRIMARY KEY,
    reservation_id TEXT NOT NULL,
    items BLOB NOT NULL,
    state TEXT NOT NULL  -- reserved | committed | released
);
""",
    "payment": """
CREATE TABLE IF NOT EXISTS payments (
    payment_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    currency TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    status INTEGER NOT NULL,
    decline_reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_order ON payments (order_id);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id TEXT NOT NULL,
    payment_id TEXT NOT NULL,
    kind TEXT NOT NULL,  -- charge | refund
    amount_minor INTEGER NOT NULL
);
""",
    "shipping": """
CREATE TABLE IF NOT EXISTS shipments (
    shipment_id TEXT PRIMARY KEY,
    order_id TEXT UNIQUE NOT NULL,
    data BLOB NOT NULL,
    status INTEGER NOT NULL
);
""",
    "notification": """
CREATE TABLE IF NOT EXISTS notifications (
    notification_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    channel INTEGER NOT NULL,
    message TEXT NOT NULL
);
""",
}

# A handler: (connection, decoded input, input's id) -> outputs as (event, id).
Outputs = list[tuple[Message, str]]
Handler = Callable[[sqlite3.Connection, Any, str], Outputs]


# -- order ------------------------------------------------------------------------------


def order_id_for(request_id: str) -> str:
    """As the shop's order service derives it (bench_saga's driver checks it)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"order/{request_id}").hex


def create_order(
    conn: sqlite3.Connection, order_id: str, req: orders_pb2.CreateOrderRequest
) -> tuple[orders_pb2.Order, ev.OrderCreated]:
    """Insert the order once (a retried create finds it); returns it and its event."""
    row = conn.execute("SELECT data, status FROM orders WHERE order_id = ?", (order_id,)).fetchone()
    if row is not None:
        order = orders_pb2.Order.FromString(row[0])
        order.status = row[1]
    else:
        total = sum(i.unit_price.amount_minor * i.quantity for i in req.items)
        order = orders_pb2.Order(
            order_id=order_id,
            customer_id=req.customer_id,
            items=req.items,
            total=common_pb2.Money(currency=req.items[0].unit_price.currency, amount_minor=total),
            status=orders_pb2.ORDER_STATUS_CREATED,
            shipping_address=req.shipping_address,
        )
        conn.execute(
            "INSERT INTO orders VALUES (?, ?, ?, ?)",
            (order_id, order.customer_id, order.status, order.SerializeToString()),
        )
    created = ev.OrderCreated(
        order_id=order_id,
        customer_id=order.customer_id,
        items=order.items,
        total=order.total,
        shipping_address=order.shipping_address,
    )
    return order, created


def complete_order(conn: sqlite3.Connection, e: ev.ShipmentScheduled, msg_id: str) -> Outputs:
    row = conn.execute(
        "SELECT customer_id, status FROM orders WHERE order_id = ?", (e.order_id,)
    ).fetchone()
    if row is None:
        raise LookupError(f"order {e.order_id}: no such order")  # nak: redelivered
    if row[1] == orders_pb2.ORDER_STATUS_CREATED:
        conn.execute(
            "UPDATE orders SET status = ? WHERE order_id = ?",
            (orders_pb2.ORDER_STATUS_COMPLETED, e.order_id),
        )
    elif row[1] != orders_pb2.ORDER_STATUS_COMPLETED:
        return []  # cancelled meanwhile: nothing to complete
    # Completed now or before (a redelivery): publish the same event, same id.
    done = ev.OrderCompleted(order_id=e.order_id, customer_id=row[0])
    return [(done, derive_id(msg_id, "order"))]


class OrderService(orders_pb2_grpc.OrderServiceServicer):
    """CreateOrder only: validate as the shop does, insert, publish OrderCreated, reply."""

    def __init__(self, conn: sqlite3.Connection, js: Any) -> None:
        self.conn = conn
        self.js = js

    async def CreateOrder(
        self,
        request: orders_pb2.CreateOrderRequest,
        context: grpc.aio.ServicerContext[Any, Any],
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
        order_id = order_id_for(request.request_id or uuid.uuid4().hex)
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            order, created = create_order(self.conn, order_id, request)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        # Published after the commit, every time (a retry republishes; the id dedupes).
        await self.js.publish(
            subject(ev.OrderCreated),
            created.SerializeToString(),
            headers={"Nats-Msg-Id": derive_id(order_id, "order.create")},
        )
        return order


# -- inventory ---------------------------------------------------------------------------


def reserve(conn: sqlite3.Connection, e: ev.OrderCreated, msg_id: str) -> Outputs:
    """examples/shop/inventory.py's reserve(), then StockReserved or ...Failed."""
    reservation_id: str | None = None
    reason = ""
    row = conn.execute(
        "SELECT reservation_id, state FROM reservations WHERE order_id = ?", (e.order_id,)
    ).fetchone()
    if row is not None:
        if row[1] == "released":
            reason = "order was cancelled before its stock was reserved"
        else:
            reservation_id = str(row[0])
    else:
        wanted: dict[str, int] = {}
        for item in e.items:
            wanted[item.sku] = wanted.get(item.sku, 0) + item.quantity
        for sku, qty in wanted.items():
            have = conn.execute("SELECT available FROM stock WHERE sku = ?", (sku,)).fetchone()
            available = int(have[0]) if have else 0
            if available < qty:
                reason = f"out of stock: {sku} (wanted {qty}, {available} available)"
                break
        if not reason:
            for sku, qty in wanted.items():
                conn.execute(
                    "UPDATE stock SET available = available - ?, reserved = reserved + ?"
                    " WHERE sku = ?",
                    (qty, qty, sku),
                )
            reservation_id = uuid.uuid5(uuid.NAMESPACE_URL, f"reservation/{e.order_id}").hex
            conn.execute(
                "INSERT INTO reservations VALUES (?, ?, ?, 'reserved')",
                (
                    e.order_id,
                    reservation_id,
                    inventory_pb2.Reservation(items=e.items).SerializeToString(),
                ),
            )
    out_id = derive_id(msg_id, "inventory")
    if reservation_id is None:
        return [(ev.StockReservationFailed(order_id=e.order_id, reason=reason), out_id)]
    reserved = ev.StockReserved(
        order_id=e.order_id,
        reservation_id=reservation_id,
        items=e.items,
        customer_id=e.customer_id,
        total=e.total,
        shipping_address=e.shipping_address,
    )
    return [(reserved, out_id)]


def commit_stock(conn: sqlite3.Connection, e: ev.OrderCompleted, msg_id: str) -> Outputs:
    """examples/shop/inventory.py's commit(): the reserved stock leaves the warehouse."""
    row = conn.execute(
        "SELECT items, state FROM reservations WHERE order_id = ?", (e.order_id,)
    ).fetchone()
    if row is None or row[1] != "reserved":
        return []
    for item in inventory_pb2.Reservation.FromString(row[0]).items:
        conn.execute(
            "UPDATE stock SET reserved = reserved - ? WHERE sku = ?", (item.quantity, item.sku)
        )
    conn.execute("UPDATE reservations SET state = 'committed' WHERE order_id = ?", (e.order_id,))
    return []


# -- payment -----------------------------------------------------------------------------


def charge(conn: sqlite3.Connection, e: ev.StockReserved, msg_id: str) -> Outputs:
    """examples/shop/payment.py's charge() and charge_outcome()."""
    key = f"order/{e.order_id}"
    row = conn.execute(
        "SELECT payment_id, status, decline_reason, currency, amount_minor FROM payments"
        " WHERE idempotency_key = ? OR order_id = ? ORDER BY updated_at LIMIT 1",
        (key, e.order_id),
    ).fetchone()
    if row is not None:
        payment_id, status, reason = str(row[0]), int(row[1]), str(row[2])
        amount = common_pb2.Money(currency=row[3], amount_minor=row[4])
    else:
        amount = e.total
        payment_id = uuid.uuid5(uuid.NAMESPACE_URL, f"payment/{key}").hex
        status, reason = payment_pb2.PAYMENT_STATUS_CHARGED, ""
        if e.customer_id.startswith(DECLINED_CUSTOMER_PREFIX):
            status, reason = payment_pb2.PAYMENT_STATUS_DECLINED, "card declined"
        elif amount.amount_minor > PAYMENT_LIMIT_MINOR:
            status = payment_pb2.PAYMENT_STATUS_DECLINED
            reason = f"amount {amount.amount_minor} over the limit"
        conn.execute(
            "INSERT INTO payments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                payment_id,
                e.order_id,
                key,
                amount.currency,
                amount.amount_minor,
                status,
                reason,
                time.time(),
            ),
        )
        if status == payment_pb2.PAYMENT_STATUS_CHARGED:
            conn.execute(
                "INSERT INTO ledger (order_id, payment_id, kind, amount_minor)"
                " VALUES (?, ?, 'charge', ?)",
                (e.order_id, payment_id, amount.amount_minor),
            )
    out_id = derive_id(msg_id, "payment")
    # As the shop's charge_outcome: a refunded payment was charged.
    if status not in (payment_pb2.PAYMENT_STATUS_CHARGED, payment_pb2.PAYMENT_STATUS_REFUNDED):
        failed = ev.PaymentFailed(order_id=e.order_id, reason=reason or "payment not possible")
        return [(failed, out_id)]
    completed = ev.PaymentCompleted(
        order_id=e.order_id,
        payment_id=payment_id,
        amount=amount,
        customer_id=e.customer_id,
        shipping_address=e.shipping_address,
    )
    return [(completed, out_id)]


# -- shipping ----------------------------------------------------------------------------


def schedule(conn: sqlite3.Connection, e: ev.PaymentCompleted, msg_id: str) -> Outputs:
    """examples/shop/shipping.py's schedule()."""
    out_id = derive_id(msg_id, "shipping")
    row = conn.execute(
        "SELECT data, status FROM shipments WHERE order_id = ?", (e.order_id,)
    ).fetchone()
    if row is not None:
        if row[1] == shipping_pb2.SHIPMENT_STATUS_CANCELLED:
            return [(ev.ShipmentFailed(order_id=e.order_id, reason="order was cancelled"), out_id)]
        shipment_id = shipping_pb2.Shipment.FromString(row[0]).shipment_id
        return [(ev.ShipmentScheduled(order_id=e.order_id, shipment_id=shipment_id), out_id)]
    country = e.shipping_address.country
    if country in UNSHIPPABLE_COUNTRIES or not country:
        reason = f"cannot ship to country {country!r}"
        return [(ev.ShipmentFailed(order_id=e.order_id, reason=reason), out_id)]
    shipment = shipping_pb2.Shipment(order_id=e.order_id, address=e.shipping_address)
    shipment.shipment_id = uuid.uuid5(uuid.NAMESPACE_URL, f"shipment/{e.order_id}").hex
    shipment.status = shipping_pb2.SHIPMENT_STATUS_SCHEDULED
    shipment.eta.FromSeconds(2 * 24 * 3600)
    conn.execute(
        "INSERT INTO shipments VALUES (?, ?, ?, ?)",
        (shipment.shipment_id, e.order_id, shipment.SerializeToString(), shipment.status),
    )
    scheduled = ev.ShipmentScheduled(order_id=e.order_id, shipment_id=shipment.shipment_id)
    return [(scheduled, out_id)]


# -- notification ------------------------------------------------------------------------


def notify(conn: sqlite3.Connection, e: ev.OrderCompleted, msg_id: str) -> Outputs:
    """examples/shop/notification.py's send() for a completed order."""
    n = notification_pb2.Notification(
        notification_id=uuid.uuid5(uuid.NAMESPACE_URL, f"notification/{msg_id}").hex,
        customer_id=e.customer_id,
        channel=notification_pb2.CHANNEL_EMAIL,
        message=f"Your order {e.order_id} is on its way.",
    )
    conn.execute(
        "INSERT OR IGNORE INTO notifications VALUES (?, ?, ?, ?, ?)",
        (n.notification_id, e.order_id, n.customer_id, int(n.channel), n.message),
    )
    notified = ev.CustomerNotified(order_id=e.order_id, notification_id=n.notification_id)
    return [(notified, derive_id(msg_id, "notification"))]


# What each participant consumes on the success path: subject -> (payload type, handler).
HANDLERS: dict[str, dict[str, tuple[type[Message], Handler]]] = {
    "order": {subject(ev.ShipmentScheduled): (ev.ShipmentScheduled, complete_order)},
    "inventory": {
        subject(ev.OrderCreated): (ev.OrderCreated, reserve),
        subject(ev.OrderCompleted): (ev.OrderCompleted, commit_stock),
    },
    "payment": {subject(ev.StockReserved): (ev.StockReserved, charge)},
    "shipping": {subject(ev.PaymentCompleted): (ev.PaymentCompleted, schedule)},
    "notification": {subject(ev.OrderCompleted): (ev.OrderCompleted, notify)},
}


# -- the consumer ------------------------------------------------------------------------


class PullStream:
    """A durable pull consumer pulled as a stream: one open request, topped up at half.

    Delivered messages queue here; :meth:`take` returns everything queued (at least
    one message, waiting for it). Status messages (a request's 408 on expiry, 409s)
    tell how many asked-for messages will not come.
    """

    def __init__(self, nc: Any, stream: str, durable: str, batch: int = BATCH) -> None:
        self.nc = nc
        self.stream = stream
        self.durable = durable
        self.batch = batch
        self.asked = 0  # messages requested and not yet delivered nor expired
        self.queue: deque[Msg] = deque()
        self.ready = asyncio.Event()
        self.inbox = ""
        self.last_pull = 0.0

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        await self.nc.subscribe(self.inbox, cb=self._on_msg)
        await self.top_up()

    async def top_up(self) -> None:
        now = time.monotonic()
        if self.asked > self.batch // 2 and now - self.last_pull < PULL_EXPIRES + 2:
            return
        if now - self.last_pull >= PULL_EXPIRES + 2:
            self.asked = 0  # a request the server lost (a restart) is not waited for
        request = {"batch": self.batch, "expires": int(PULL_EXPIRES * 1e9)}
        await self.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
            json.dumps(request).encode(),
            reply=self.inbox,
        )
        self.asked += self.batch
        self.last_pull = now

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if not status:
            self.asked -= 1
            self.queue.append(msg)
            self.ready.set()
            return
        if status == "100":  # idle heartbeat (not asked for)
            return
        log.info("pull status %s %s (asked %d)", status, dict(headers or {}), self.asked)
        # 408 (request expired), 409 (limits, leader change): these will not come.
        pending = headers.get("Nats-Pending-Messages") if headers else None
        self.asked = max(0, self.asked - int(pending)) if pending else 0
        if status != "408":
            await asyncio.sleep(0.05)
        await self.top_up()

    async def take(self, limit: int) -> list[Msg]:
        while not self.queue:
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), PULL_EXPIRES)
            except TimeoutError:
                await self.top_up()
        n = min(limit, len(self.queue))
        return [self.queue.popleft() for _ in range(n)]


class Participant:
    """Fetch a batch, handle it in one transaction, publish the outputs, ack the inputs."""

    def __init__(self, role: str, conn: sqlite3.Connection, js: Any) -> None:
        self.role = role
        self.conn = conn
        self.js = js
        self.handlers = HANDLERS[role]

    def _handle(self, msg: Msg) -> Outputs:
        cls, handler = self.handlers[msg.subject]
        headers = msg.headers or {}
        return handler(self.conn, cls.FromString(msg.data), headers.get("Nats-Msg-Id", ""))

    def _in_tx(self, msgs: list[Msg]) -> Outputs:
        """Handle ``msgs`` in one transaction (their outputs), or raise having rolled back."""
        out: Outputs = []
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for msg in msgs:
                out.extend(self._handle(msg))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return out

    async def run(self, pull: PullStream) -> None:
        while True:
            msgs = await pull.take(BATCH)
            await pull.top_up()
            try:
                outputs = self._in_tx(msgs)
                done = msgs
            except Exception:
                # One bad message must not hold up the rest: redo them one by one.
                outputs, done = [], []
                for msg in msgs:
                    try:
                        outputs.extend(self._in_tx([msg]))
                        done.append(msg)
                    except Exception:
                        log.exception("%s: %s failed; nak", self.role, msg.subject)
                        await msg.nak(delay=0.1)
            try:
                await asyncio.gather(
                    *(
                        self.js.publish(
                            subject(type(event)),
                            event.SerializeToString(),
                            headers={"Nats-Msg-Id": event_id},
                        )
                        for event, event_id in outputs
                    )
                )
            except Exception:
                # The effects are committed; the redelivery republishes the same ids.
                log.exception("%s: publishing failed; nak the batch", self.role)
                for msg in done:
                    await msg.nak(delay=0.5)
                continue
            for msg in done:
                await msg.ack()


async def ensure(js: Any, role: str) -> None:
    """The stream (any process may create it; same config) and the role's consumer."""
    config = api.StreamConfig(
        name=STREAM,
        subjects=[PREFIX + ">"],
        storage=api.StorageType.FILE,
        duplicate_window=120.0,
        allow_direct=True,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(config)
    subjects = sorted(HANDLERS[role])
    await js.add_consumer(
        STREAM,
        api.ConsumerConfig(
            name=f"{STREAM}-{role}",
            durable_name=f"{STREAM}-{role}",
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=10.0,
            max_deliver=5,
            max_ack_pending=2000,
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
        ),
    )


def open_db(path: str, role: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMAS[role])
    if role == "inventory":
        conn.executemany(
            "INSERT OR IGNORE INTO stock VALUES (?, ?, 0)", sorted(INITIAL_STOCK.items())
        )
    return conn


def grpc_server(interceptors: str) -> grpc.aio.Server:
    """``meshkit``: the shop's server interceptors (the same entry cost); ``none``: bare."""
    if interceptors == "meshkit":
        from examples.shop import wiring

        return grpc.aio.server(interceptors=wiring.server_interceptors())
    return grpc.aio.server()


async def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s peer-{args.role}: %(message)s",
    )
    conn = open_db(args.db, args.role)
    nc = await nats.connect(
        args.nats_url, name=f"peer-{args.role}", max_reconnect_attempts=-1, ping_interval=5
    )
    js = nc.jetstream()
    await ensure(js, args.role)
    server = grpc_server(args.interceptors)
    if args.role == "order":
        orders_pb2_grpc.add_OrderServiceServicer_to_server(OrderService(conn, js), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    pull = PullStream(nc, STREAM, f"{STREAM}-{args.role}")
    await pull.start()
    worker = asyncio.create_task(Participant(args.role, conn, js).run(pull))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        # Stop when the benchmark that started this process is gone (no orphans).
        while os.getppid() == parent and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        stop.set()

    watcher = asyncio.create_task(watch_parent())
    # As the shop's services do (examples/shop/_service.py tune_gc): a deployment setting.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    print(f"READY {port}", flush=True)
    await stop.wait()
    watcher.cancel()
    worker.cancel()
    await server.stop(grace=1.0)
    await nc.drain()
    conn.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench._saga_peer", description=__doc__)
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db", default=":memory:")
    parser.add_argument("--interceptors", choices=("meshkit", "none"), default="meshkit")
    parser.add_argument("--log-level", default=os.environ.get("SHOP_LOG_LEVEL", "ERROR"))
    args = parser.parse_args(argv)
    profile_dir = os.environ.get("PEER_PROFILE")
    try:
        import uvloop

        runner: Callable[[Any], int] = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    if not profile_dir:
        return runner(serve(args))
    import cProfile

    # CPU time, not wall time (see examples/shop/_service.py).
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        return runner(serve(args))
    finally:
        profiler.disable()
        profiler.dump_stats(os.path.join(profile_dir, f"peer-{args.role}.prof"))


if __name__ == "__main__":
    sys.exit(main())
