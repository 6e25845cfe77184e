"""The example's wiring: stream names, and its projections for ``meshkit projection``.

MESHKIT_PROJECTIONS=examples.es_orders.app:projections meshkit projection status
ES_ORDERS_DB=orders_view.db meshkit projection rebuild order_view --app examples.es_orders.app:projections
"""

from __future__ import annotations

import os
from typing import Any

from examples.es_orders.view import OrderView
from meshkit.saga.eventstore import EventStoreConfig
from meshkit.saga.orchestrator import OrchestratorConfig
from meshkit.saga.projections import Source
from meshkit.saga.readmodels import SqliteReadModelStore

EVENTS = EventStoreConfig(stream="ES_ORDERS", prefix="es_orders")
ORCHESTRATION = OrchestratorConfig(
    stream="ES_ORDERS_SAGA", prefix="es_orders_saga", bucket="es_orders_saga"
)


def view(events: EventStoreConfig = EVENTS, orch: OrchestratorConfig = ORCHESTRATION) -> OrderView:
    """The order view over the order aggregates' events and the saga's replies."""
    return OrderView(
        [
            Source(events.stream, f"{events.subject_prefix}.>"),
            Source(orch.stream, f"{orch.prefix}.reply.>"),
        ]
    )


def projections() -> list[tuple[Any, Any]]:
    """For ``meshkit projection``: the order view in SQLite at ``$ES_ORDERS_DB``."""
    return [(view(), SqliteReadModelStore(os.environ.get("ES_ORDERS_DB", "es_orders_view.db")))]
