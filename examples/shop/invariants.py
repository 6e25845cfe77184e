"""The shop's invariants, checked against the services' own databases.

Orders are event sourced (no orders table): their status and items come from
the query side's order view (``query.sqlite``), which the checks wait for.

* stock: for every SKU, available = initial - what completed orders hold, and
  nothing stays reserved once every saga has finished;
* no order is charged twice, a completed order is charged exactly once and
  not refunded;
* every cancelled order is fully compensated: its stock released (or never
  reserved), its charge refunded (or never made), its shipment cancelled (or never made).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from examples.shop.gen.shop.v1 import common_pb2, orders_pb2

_STATUS = {
    "CREATED": orders_pb2.ORDER_STATUS_CREATED,
    "COMPLETED": orders_pb2.ORDER_STATUS_COMPLETED,
    "CANCELLED": orders_pb2.ORDER_STATUS_CANCELLED,
}


def _view_orders(path: Path) -> list[orders_pb2.Order]:
    """Orders as the query side's order view has them (status and items)."""
    out = []
    with _ro(path) as conn:
        rows = conn.execute(
            "SELECT doc FROM meshkit_documents WHERE projection = 'order_view' "
            "AND collection = 'orders'"
        ).fetchall()
    for (raw,) in rows:
        doc = json.loads(raw)
        order = orders_pb2.Order(
            order_id=str(doc.get("order_id", "")),
            customer_id=str(doc.get("customer_id", "")),
            status=_STATUS.get(str(doc.get("status", "")), orders_pb2.ORDER_STATUS_PENDING),
            cancel_reason=str(doc.get("cancel_reason", "")),
        )
        for item in doc.get("items", []):
            order.items.append(
                common_pb2.LineItem(
                    sku=str(item.get("sku", "")), quantity=int(item.get("quantity", 0))
                )
            )
        out.append(order)
    return out


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    completed: int = 0
    cancelled: int = 0
    pending: int = 0
    stock: dict[str, tuple[int, int]] = field(default_factory=dict)
    charges: int = 0
    refunds: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def check(data_dir: str | Path, initial_stock: Mapping[str, int]) -> Report:
    """Read every service's database and check the invariants."""
    data = Path(data_dir)
    rep = Report()
    orders = _view_orders(data / "query.sqlite")
    with _ro(data / "inventory.sqlite") as conn:
        stock = {
            str(s): (int(a), int(r))
            for s, a, r in conn.execute("SELECT sku, available, reserved FROM stock")
        }
        reservations = {
            str(o): str(s) for o, s in conn.execute("SELECT order_id, state FROM reservations")
        }
    with _ro(data / "payment.sqlite") as conn:
        ledger: dict[str, list[str]] = {}
        for order_id, kind in conn.execute("SELECT order_id, kind FROM ledger ORDER BY seq"):
            ledger.setdefault(str(order_id), []).append(str(kind))
    with _ro(data / "shipping.sqlite") as conn:
        shipments = {
            str(o): int(s) for o, s in conn.execute("SELECT order_id, status FROM shipments")
        }
    rep.stock = stock

    held: dict[str, int] = {}
    for order in orders:
        entries = ledger.get(order.order_id, [])
        charges, refunds = entries.count("charge"), entries.count("refund")
        rep.charges += charges
        rep.refunds += refunds
        if charges > 1:
            rep.problems.append(f"order {order.order_id} charged {charges} times")
        if order.status == orders_pb2.ORDER_STATUS_COMPLETED:
            rep.completed += 1
            for item in order.items:
                held[item.sku] = held.get(item.sku, 0) + item.quantity
            if charges != 1 or refunds != 0:
                rep.problems.append(
                    f"completed order {order.order_id}: {charges} charges, {refunds} refunds"
                )
            if reservations.get(order.order_id) != "committed":
                rep.problems.append(
                    f"completed order {order.order_id}: reservation is {reservations.get(order.order_id)}"
                )
        elif order.status == orders_pb2.ORDER_STATUS_CANCELLED:
            rep.cancelled += 1
            if charges != refunds:
                rep.problems.append(
                    f"cancelled order {order.order_id}: {charges} charges but {refunds} refunds"
                )
            if reservations.get(order.order_id, "released") != "released":
                rep.problems.append(
                    f"cancelled order {order.order_id}: stock still {reservations[order.order_id]}"
                )
            if shipments.get(order.order_id, 2) != 2:
                rep.problems.append(f"cancelled order {order.order_id}: shipment not cancelled")
        else:
            rep.pending += 1
            rep.problems.append(
                f"order {order.order_id} is still {orders_pb2.OrderStatus.Name(order.status)}"
            )
    for sku, initial in initial_stock.items():
        available, reserved = stock.get(sku, (0, 0))
        expected = initial - held.get(sku, 0)
        if available != expected:
            rep.problems.append(
                f"stock {sku}: {available} available, expected {initial} - {held.get(sku, 0)} = {expected}"
            )
        if reserved != 0:
            rep.problems.append(f"stock {sku}: {reserved} still reserved")
    return rep
