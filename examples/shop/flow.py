"""The order saga's shared wiring: the stream, the saga definition, the business rules.

Every shop process imports this; ``meshkit saga graph examples.shop.flow:PARTICIPANTS``
draws the choreography from the participants declared in the service modules.
"""

from __future__ import annotations

import os
from typing import Any

from examples.shop.gen.shop.v1 import events_pb2 as ev
from meshkit._pb.meshkit.v1 import saga_pb2
from meshkit.saga import ConsumerSpec, EventBus, HostedStore, SagaDefinition, StreamSpec
from meshkit.saga.eventstore import EventStoreConfig
from meshkit.saga.orchestrator import OrchestratorConfig

# The order service's aggregates (event sourced), kept in the saga stream itself:
# shop_orders.<event type token>.order.<order id>.
ORDERS_STORE = EventStoreConfig(stream="SHOP", prefix="shop_orders")

# The saga's events: shop.events.<event type>, and the order aggregate's events where
# the order service appended them (a hosted store). The store is its own outbox (an
# append is the only write, no relay to run), and with no copy to make each order
# event is stored once and reaches the participants straight from the append.
SHOP_STREAM = StreamSpec(
    name="SHOP",
    prefix="shop.events",
    duplicate_window=120.0,
    description="the example shop's order saga events and order aggregates",
    hosted_stores=(
        HostedStore(ORDERS_STORE, (ev.OrderCreated, ev.OrderCompleted, ev.OrderCancelled)),
    ),
)

# Orchestrated mode: commands and replies (shop.orch.cmd.> / shop.orch.reply.>), and the
# saga instances in meshkit's default bucket so `meshkit saga show` finds them.
SHOP_ORCH = OrchestratorConfig(stream="SHOP_ORCH", prefix="shop.orch", bucket="meshkit_orch")

MODES = ("choreography", "orchestrated")


def mode() -> str:
    """How the order saga runs: ``SHOP_MODE`` = choreography (default) or orchestrated."""
    value = os.environ.get("SHOP_MODE", "") or "choreography"
    if value not in MODES:
        raise ValueError(f"SHOP_MODE={value!r}: expected one of {', '.join(MODES)}")
    return value


ORDER_SAGA = SagaDefinition.of(
    "order",
    start=[ev.OrderCreated],
    completed=[ev.OrderCompleted],
    failures=[ev.StockReservationFailed, ev.PaymentFailed, ev.ShipmentFailed],
    compensations=[ev.PaymentRefunded, ev.StockReleased],
    compensated=[ev.OrderCancelled],
)

SagaTimedOut = saga_pb2.SagaTimedOut


def env_float(name: str, default: float) -> float:
    """A number from the environment; a bad value names its variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None


def env_int(name: str, default: int) -> int:
    """An integer from the environment; a bad value names its variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None


def consumer_spec() -> ConsumerSpec:
    """Participants' consumer settings; tests shorten the ack wait through SHOP_ACK_WAIT."""
    return ConsumerSpec(
        ack_wait=env_float("SHOP_ACK_WAIT", 10.0),
        max_deliver=env_int("SHOP_MAX_DELIVER", 5),
        nak_backoff=(0.1, 0.5, 1.0, 2.0),
        max_in_flight=env_int("SHOP_MAX_IN_FLIGHT", 128),
    )


# Business rules that pick each saga path deterministically from the order itself.
DECLINED_CUSTOMER_PREFIX = "declined"  # payment declines these customers
PAYMENT_LIMIT_MINOR = 10_000_000  # and any order above this total
UNSHIPPABLE_COUNTRIES = frozenset({"XX"})  # shipping fails for these addresses

INITIAL_STOCK: dict[str, int] = {
    "book": 1000,
    "pen": 5000,
    "lamp": 200,
    "rare-vinyl": 1,
}


async def connect_bus(url: str, *, name: str) -> EventBus:
    """Connect to NATS and make sure the shop's stream exists."""
    bus = await EventBus.connect(url, name=name, source=name.removeprefix("shop-"))
    await bus.ensure_stream(SHOP_STREAM)
    return bus


def participants() -> list[Any]:
    """Every shop participant (imports the service modules)."""
    from examples.shop import inventory, notification, order, payment, shipping

    return [
        order.PARTICIPANT,
        inventory.PARTICIPANT,
        payment.PARTICIPANT,
        shipping.PARTICIPANT,
        notification.PARTICIPANT,
    ]


def __getattr__(name: str) -> Any:
    # PARTICIPANTS is computed lazily: the service modules import this one.
    if name == "PARTICIPANTS":
        return participants()
    raise AttributeError(name)
