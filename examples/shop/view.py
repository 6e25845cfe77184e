"""The denormalized order view (seed §9: the read model of the query side).

One document per order: the order itself, its items and total, and the status
of stock, payment and shipment, built from the order aggregate's events and the
saga's events. It follows several streams, whose events interleave in no fixed
order, so each handler only merges the fields its event owns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from examples.shop.gen.shop.v1 import events_pb2
from meshkit.saga.eventstore import StoredEvent
from meshkit.saga.projections import Source
from meshkit.saga.readmodels import ReadModelTx

COLLECTION = "orders"

Handler = Callable[[Any, dict[str, Any]], None]


def _money(m: Any) -> dict[str, Any]:
    return {"currency": m.currency, "amount_minor": int(m.amount_minor)}


def _created(e: events_pb2.OrderCreated, doc: dict[str, Any]) -> None:
    doc.update(
        customer_id=e.customer_id,
        items=[MessageToDict(i, preserving_proto_field_name=True) for i in e.items],
        total=_money(e.total),
        city=e.shipping_address.city,
    )
    doc.setdefault("status", "CREATED")


def _completed(e: events_pb2.OrderCompleted, doc: dict[str, Any]) -> None:
    doc["status"] = "COMPLETED"


def _cancelled(e: events_pb2.OrderCancelled, doc: dict[str, Any]) -> None:
    doc.update(status="CANCELLED", cancel_reason=e.reason)


def _reserved(e: events_pb2.StockReserved, doc: dict[str, Any]) -> None:
    doc["stock"] = "RESERVED"


def _reserve_failed(e: events_pb2.StockReservationFailed, doc: dict[str, Any]) -> None:
    doc["stock"] = "UNAVAILABLE"


def _released(e: events_pb2.StockReleased, doc: dict[str, Any]) -> None:
    doc["stock"] = "RELEASED"


def _paid(e: events_pb2.PaymentCompleted, doc: dict[str, Any]) -> None:
    doc.update(payment="PAID", payment_id=e.payment_id, paid=_money(e.amount))


def _declined(e: events_pb2.PaymentFailed, doc: dict[str, Any]) -> None:
    doc.update(payment="DECLINED", payment_reason=e.reason)


def _refunded(e: events_pb2.PaymentRefunded, doc: dict[str, Any]) -> None:
    doc["payment"] = "REFUNDED"


def _shipped(e: events_pb2.ShipmentScheduled, doc: dict[str, Any]) -> None:
    doc.update(shipment="SCHEDULED", shipment_id=e.shipment_id)


def _ship_failed(e: events_pb2.ShipmentFailed, doc: dict[str, Any]) -> None:
    doc["shipment"] = "FAILED"


HANDLERS: dict[str, tuple[type[Message], Handler]] = {
    t.DESCRIPTOR.full_name: (t, h)
    for t, h in [
        (events_pb2.OrderCreated, _created),
        (events_pb2.OrderCompleted, _completed),
        (events_pb2.OrderCancelled, _cancelled),
        (events_pb2.StockReserved, _reserved),
        (events_pb2.StockReservationFailed, _reserve_failed),
        (events_pb2.StockReleased, _released),
        (events_pb2.PaymentCompleted, _paid),
        (events_pb2.PaymentFailed, _declined),
        (events_pb2.PaymentRefunded, _refunded),
        (events_pb2.ShipmentScheduled, _shipped),
        (events_pb2.ShipmentFailed, _ship_failed),
    ]
}


_ORDER_EVENTS = frozenset(
    t.DESCRIPTOR.full_name
    for t in (events_pb2.OrderCreated, events_pb2.OrderCompleted, events_pb2.OrderCancelled)
)


class OrderView:
    """The projection: ``orders/<order id>`` documents."""

    def __init__(
        self,
        sources: Sequence[Source],
        name: str = "order_view",
        *,
        aggregate_prefix: str | None = None,
    ) -> None:
        self.name = name
        self.sources = tuple(sources)
        # The order aggregate's events count from the order store (subjects under
        # ``aggregate_prefix``) only: the orchestrator's replies carry them too.
        self._aggregates = None if aggregate_prefix is None else aggregate_prefix + "."

    def handle(self, event: StoredEvent, tx: ReadModelTx) -> None:
        entry = HANDLERS.get(event.event_type)
        if entry is None:
            return
        if (
            self._aggregates is not None
            and event.event_type in _ORDER_EVENTS
            and not event.subject.startswith(self._aggregates)
        ):
            return
        cls, handler = entry
        msg = event.decode(cls)
        order_id = getattr(msg, "order_id", "")
        if not order_id:
            return
        doc = tx.get(COLLECTION, order_id) or {"order_id": order_id}
        handler(msg, doc)
        doc["version"] = int(doc.get("version", 0)) + 1
        if event.envelope.saga_id:
            doc["saga_id"] = event.envelope.saga_id
        tx.put(COLLECTION, order_id, doc)
