"""The order service (command side): creates orders, starting the saga, and completes
or cancels them.

Orders are event sourced: each is an ``Order`` aggregate (``examples/shop/domain.py``)
kept in the saga stream ``SHOP`` itself (subjects ``shop_orders.<event type
token>.order.<id>``, a hosted store declared in ``flow.SHOP_STREAM``). The store is its own
outbox: the participants of OrderCreated, OrderCompleted and OrderCancelled consume
them where they were appended, so an append is the only write. With
``SHOP_MODE=orchestrated`` the order service runs the saga's orchestrator instead,
and answers its commands; a relay (checkpoint in SQLite) then begins each order's
orchestrated saga, so an order accepted just before a crash still gets one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import nats.errors
from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from examples.shop import faults
from examples.shop._service import ServiceContext, main
from examples.shop.domain import AGGREGATE, Order, OrderRejected
from examples.shop.flow import (
    ORDERS_STORE,
    SHOP_ORCH,
    SHOP_STREAM,
    SagaTimedOut,
    consumer_spec,
    env_float,
)
from examples.shop.gen.shop.v1 import events_pb2 as ev
from examples.shop.gen.shop.v1 import orders_pb2, orders_pb2_grpc
from meshkit.saga import Context, IdempotentInbox, Participant, derive_event_id
from meshkit.saga.commands import CommandContext, CommandParticipant
from meshkit.saga.eventstore import EventStore, EventStoreError, Repository, StoredEvent
from meshkit.saga.projections import Source, relay
from meshkit.saga.readmodels import SqliteReadModelStore

_ID = re.compile(r"^[A-Za-z0-9_=-]+\Z")
log = logging.getLogger("examples.shop.order")

SCHEMA = ""  # orders live in the event store; the database holds the inbox only


def order_id_for(request_id: str) -> str:
    """Orders are keyed by their request id, so a retried create finds the same order."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"order/{request_id}").hex


T = TypeVar("T")


async def _retrying(call: Callable[[], Awaitable[T]], within: float) -> T:
    """Retry ``call`` while NATS is unreachable (a server restart is a pause, not an error).

    Safe because every append carries deterministic event ids: a retry after an
    append that did land finds it and appends nothing.
    """
    end = time.monotonic() + within
    delay = 0.1
    while True:
        try:
            return await call()
        except (EventStoreError, nats.errors.Error, TimeoutError) as exc:
            if time.monotonic() + delay > end:
                raise
            log.info("order store unavailable (%r); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)


def _incoming_carrier(context: grpc.aio.ServicerContext) -> dict[str, str] | None:
    """The caller's trace context to continue in the saga's events, or None.

    With OpenTelemetry's grpc instrumentation installed the server span is already
    current (None: nothing to attach); without it, the caller's ``traceparent``
    metadata is attached (see :func:`_attached`) so the first event (and every
    event after it) still carries the caller's trace.
    """
    carrier = {
        str(k): str(v)
        for k, v in (context.invocation_metadata() or ())
        if k in ("traceparent", "tracestate")
    }
    if not carrier or trace.get_current_span().get_span_context().is_valid:
        return None
    return carrier


def _attached(carrier: dict[str, str] | None) -> contextlib.AbstractContextManager[None]:
    """``carrier``'s trace context attached for the block; nothing when it is None
    (the common case costs no generator)."""
    return _NOTHING if carrier is None else _attaching(carrier)


_NOTHING = contextlib.nullcontext()


@contextlib.contextmanager
def _attaching(carrier: dict[str, str]) -> Iterator[None]:
    token = otel_context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        otel_context.detach(token)


class OrderService(orders_pb2_grpc.OrderServiceServicer):
    """The command side: orders are ``Order`` aggregates in the event store.

    CreateOrder appends OrderCreated, which starts the saga: its participants
    consume it where it was appended, or the relay begins the orchestrated saga. Reads
    here replay one aggregate. Lists and views belong to the query side
    (``OrderQueryService`` in ``examples/shop/query.py``).
    """

    def __init__(
        self, orders: Repository[Order], store: EventStore, saga_timeout: float | None = None
    ) -> None:
        self.orders = orders
        self.store = store
        # SHOP_SAGA_TIMEOUT: each saga's deadline, stamped on its OrderCreated.
        self.saga_timeout = saga_timeout

    async def _get(self, order_id: str) -> Order | None:
        if not order_id or not _ID.match(order_id):
            return None
        loaded = await self.orders.load(order_id)
        return loaded.state if loaded.state.created else None

    async def CreateOrder(
        self, request: orders_pb2.CreateOrderRequest, context: grpc.aio.ServicerContext
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
        req = request
        if not req.request_id:  # a copy with one: the caller's request stays as sent
            req = orders_pb2.CreateOrderRequest()
            req.CopyFrom(request)
            req.request_id = uuid.uuid4().hex
        order_id = order_id_for(req.request_id)
        left = context.time_remaining()
        within = 15.0 if left is None else max(0.5, min(30.0, left - 0.5))
        saga_deadline_ms = (
            None
            if self.saga_timeout is None
            else time.time_ns() // 1_000_000 + int(self.saga_timeout * 1000)
        )
        with _attached(_incoming_carrier(context)):
            # Idempotent: a retried create finds the order created and appends nothing.
            loaded = await _retrying(
                lambda: self.orders.execute(
                    order_id,
                    lambda o: o.create(req),
                    event_ids=lambda i: derive_event_id(order_id, "order.create", i),
                    saga_id=order_id,
                    saga_type="order",
                    # A new order most times: no read first; a retry finds its order.
                    expect_new=True,
                    saga_deadline_ms=saga_deadline_ms,
                ),
                within,
            )
        return loaded.state.to_proto()

    async def GetOrder(
        self, request: orders_pb2.GetOrderRequest, context: grpc.aio.ServicerContext
    ) -> orders_pb2.Order:
        order = await self._get(request.order_id)
        if order is None or (request.customer_id and order.customer_id != request.customer_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"order {request.order_id!r} not found")
        assert order is not None
        return order.to_proto()

    async def _all(self) -> list[Order]:
        """Every order, replayed (the command side has no index; fine for an example)."""
        ids = await self.store.aggregate_ids(AGGREGATE)
        found = await asyncio.gather(*(self._get(i) for i in ids))
        return [o for o in found if o is not None]

    async def ListOrders(
        self, request: orders_pb2.ListOrdersRequest, context: grpc.aio.ServicerContext
    ) -> orders_pb2.ListOrdersResponse:
        orders = [
            o
            for o in await self._all()
            if (not request.customer_id or o.customer_id == request.customer_id)
            and (not request.status or o.status == request.status)
            and (not request.order_ids or o.order_id in request.order_ids)
        ]
        offset = int(request.page_token or 0)
        size = request.page_size or 100
        resp = orders_pb2.ListOrdersResponse(
            orders=[o.to_proto() for o in orders[offset : offset + size]]
        )
        if len(orders) > offset + size:
            resp.next_page_token = str(offset + size)
        return resp

    async def UpdateOrder(
        self, request: orders_pb2.UpdateOrderRequest, context: grpc.aio.ServicerContext
    ) -> orders_pb2.Order:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "orders are event sourced and change only through their saga",
        )
        raise AssertionError("unreachable")

    async def CancelOrder(
        self, request: orders_pb2.CancelOrderRequest, context: grpc.aio.ServicerContext
    ) -> orders_pb2.Order:
        order_id = request.name.removeprefix("orders/")
        order = await self._get(order_id)
        if order is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"order {order_id!r} not found")
        assert order is not None
        if order.status != orders_pb2.ORDER_STATUS_CANCELLED:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"order {order_id} is {orders_pb2.OrderStatus.Name(order.status)}; "
                "its saga decides whether it completes or is cancelled",
            )
        return order.to_proto()

    async def WatchOrders(
        self, request: orders_pb2.WatchOrdersRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        seen: dict[str, int] = {}
        sent = 0
        while True:
            if request.order_id:
                one = await self._get(request.order_id)
                orders = [one] if one is not None else []
            else:
                orders = await self._all()
            for order in orders:
                if seen.get(order.order_id) == order.status:
                    continue
                seen[order.order_id] = int(order.status)
                event = orders_pb2.OrderEvent(
                    order_id=order.order_id, status=order.status, detail=order.cancel_reason
                )
                event.at.GetCurrentTime()
                yield event
                sent += 1
                if request.limit and sent >= request.limit:
                    return
            await asyncio.sleep(0.2)


PARTICIPANT = Participant("order", SHOP_STREAM, consumer=consumer_spec())


def _event_carrier(ctx: Context) -> dict[str, str] | None:
    """The trace context to store the handler's events in, or None (nothing to attach).

    With an SDK the consumer span is current already; without one, the incoming
    ``traceparent`` is attached so the appended events (and the relay) carry it.
    """
    if not ctx.envelope.traceparent or trace.get_current_span().get_span_context().is_valid:
        return None
    return ctx.envelope.to_headers()


class OrderNotFound(RuntimeError):
    """A saga event for an order the store does not have.

    Every event the participant handles follows the order's OrderCreated, so this is
    never a reason to acknowledge the event and do nothing: raised, the event is
    redelivered with backoff and dead-lettered after ``max_deliver`` attempts, where
    someone sees it. (The repository already retried the read against the stream
    leader, so a replica that was behind is not the cause.)
    """


# The repository the participant's handlers use (set by build; one per process).
_ORDERS: list[Repository[Order]] = []


async def _decide(ctx: Context, order_id: str, decide: Callable[[Order], Any]) -> None:
    """Run one of the aggregate's commands for a saga event; its state guard decides.

    The outputs reach the saga stream through the relay, not as handler outputs.
    A redelivered event appends the same event ids (``derive_event_id(event id,
    "order", i)``), which the store recognises, and a repeat finds nothing to do.
    An order that is not there is :class:`OrderNotFound` (redelivered, then
    dead-lettered), never an acknowledged no-op.
    """
    orders = _ORDERS[0]

    def guarded(o: Order) -> Any:
        if not o.created:
            raise OrderNotFound(f"order {order_id}: no such order for {ctx.envelope.event_type}")
        try:
            return decide(o)
        except OrderRejected:  # e.g. a timeout arriving after completion
            return []

    with _attached(_event_carrier(ctx)):
        await orders.execute(
            order_id,
            guarded,
            event_ids=lambda i: derive_event_id(ctx.event_id, "order", i),
            saga_id=ctx.envelope.saga_id,
            saga_type=ctx.envelope.saga_type or "order",
            causation_id=ctx.event_id,
        )


@PARTICIPANT.on(ev.ShipmentScheduled, emits=[ev.OrderCompleted])
async def complete(event: ev.ShipmentScheduled, ctx: Context) -> None:
    await faults.mid_handler(ctx)
    await _decide(ctx, event.order_id, lambda o: o.complete())


@PARTICIPANT.compensate(ev.StockReservationFailed, emits=[ev.OrderCancelled])
async def cancel_out_of_stock(event: ev.StockReservationFailed, ctx: Context) -> None:
    await faults.mid_handler(ctx)
    reason = event.reason or "out of stock"
    await _decide(ctx, event.order_id, lambda o: o.cancel(reason))


@PARTICIPANT.compensate(ev.StockReleased, emits=[ev.OrderCancelled])
async def cancel_after_release(event: ev.StockReleased, ctx: Context) -> None:
    await faults.mid_handler(ctx)
    reason = event.reason or "stock released"
    await _decide(ctx, event.order_id, lambda o: o.cancel(reason))


@PARTICIPANT.compensate(SagaTimedOut, emits=[ev.OrderCancelled])
async def cancel_timed_out(event: Any, ctx: Context) -> None:
    # The saga id is the order id; a completed order stays completed.
    await _decide(ctx, event.saga_id, lambda o: o.cancel("saga timed out"))


def commands(orders: Repository[Order]) -> CommandParticipant:
    """The order service's command handlers for the orchestrated saga."""
    part = CommandParticipant("order")

    async def run(order_id: str, decide: Callable[[Order], Any], c: CommandContext) -> Order:
        loaded = await orders.execute(
            order_id,
            decide,
            event_ids=lambda i: derive_event_id(c.command_id, "order", i),
            saga_id=c.saga_id,
            saga_type="order",
            causation_id=c.command_id,
        )
        return loaded.state

    @part.handles(orders_pb2.CreateOrderRequest)
    async def create_cmd(cmd: orders_pb2.CreateOrderRequest, c: CommandContext) -> Message:
        # CreateOrder already appended the order; this finds it (or creates it).
        o = await run(c.saga_id, lambda o: o.create(cmd), c)
        return ev.OrderCreated(
            order_id=o.order_id,
            customer_id=o.customer_id,
            items=o.items,
            total=o.total,
            shipping_address=o.address,
        )

    @part.handles(orders_pb2.UpdateOrderRequest)
    async def complete_cmd(cmd: orders_pb2.UpdateOrderRequest, c: CommandContext) -> Message:
        o = await run(c.saga_id, lambda o: [] if not o.created else o.complete(), c)
        return ev.OrderCompleted(order_id=o.order_id, customer_id=o.customer_id)

    @part.handles(orders_pb2.CancelOrderRequest)
    async def cancel_cmd(cmd: orders_pb2.CancelOrderRequest, c: CommandContext) -> Message:
        o = await run(c.saga_id, lambda o: [] if not o.created else o.cancel(cmd.reason), c)
        return ev.OrderCancelled(order_id=o.order_id, reason=cmd.reason, customer_id=o.customer_id)

    return part


def _relay_db(db: str) -> str:
    return db if db == ":memory:" else str(Path(db).with_suffix(".relay.sqlite"))


async def build(ctx: ServiceContext) -> tuple[Callable[[grpc.aio.Server], None], Any]:
    bus = ctx.bus
    if bus is None:
        raise SystemExit("the order service keeps its orders in JetStream: pass --nats-url")
    store = EventStore(bus.nc, ORDERS_STORE, source="order")
    await store.ensure()
    # The saga's commands find the order they created in memory; the append's
    # sequence check still catches a write from elsewhere.
    orders: Repository[Order] = Repository(store, AGGREGATE, Order, cache_size=10_000)
    _ORDERS[:] = [orders]
    # Its handlers' only effect is an append with ids derived from the event: a
    # redelivery finds it done, so no inbox record (nor its serializing transaction).
    ctx.inbox = IdempotentInbox()
    if ctx.mode == "orchestrated":
        from examples.shop.orchestration import ORDER_MACHINE, serve_commands
        from meshkit.saga.orchestrator import Orchestrator

        serve_commands(ctx, commands(orders))
        orchestrator = Orchestrator(bus, ORDER_MACHINE, config=SHOP_ORCH, name="order")

        async def start_orchestrator() -> Callable[[], Awaitable[None]]:
            await orchestrator.start()
            return orchestrator.stop

        ctx.background.append(start_orchestrator)

        async def begin_saga(stored: StoredEvent) -> None:
            # Idempotent (the saga's key is the order id): a replay after a crash
            # between begin and checkpoint finds the saga already begun.
            created = ev.OrderCreated.FromString(stored.data)
            start = orders_pb2.CreateOrderRequest(
                customer_id=created.customer_id,
                items=created.items,
                shipping_address=created.shipping_address,
            )
            await orchestrator.begin(stored.aggregate_id, start)

        ctx.background.append(_saga_starter(bus, store, _relay_db(ctx.args.db), begin_saga))
    # In choreography the participants consume the order events where they were
    # appended (flow.SHOP_STREAM hosts the store): nothing to run here.
    service = OrderService(orders, store, env_float("SHOP_SAGA_TIMEOUT", 0.0) or None)

    def add(server: grpc.aio.Server) -> None:
        orders_pb2_grpc.add_OrderServiceServicer_to_server(service, server)

    return add, PARTICIPANT


def _saga_starter(
    bus: Any, store: EventStore, db: str, begin: Callable[[StoredEvent], Awaitable[None]]
) -> Callable[[], Awaitable[Callable[[], Awaitable[None]]]]:
    """Orchestrated mode: hand each OrderCreated to ``begin`` (the store is the outbox).

    This process is the orders' only writer: its appends are handed to the relay
    directly, and a poll finds anything else (the backlog after a restart).
    """

    async def start() -> Callable[[], Awaitable[None]]:
        forwarder = relay(
            bus.nc,
            "shop_order_saga_starter",
            [Source(ORDERS_STORE.stream, f"{ORDERS_STORE.subject_prefix}.>")],
            SqliteReadModelStore(db),
            publish=begin,
            types=("shop.v1.OrderCreated",),
            follow=False,
        )
        forwarder.poll_interval = 0.5
        remove = store.on_append(forwarder.offer)
        await forwarder.start()

        async def stop() -> None:
            remove()
            await forwarder.stop()

        return stop

    return start


if __name__ == "__main__":
    main("order", SCHEMA, build)
