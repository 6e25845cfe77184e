"""The saga state machine (meshkit.saga.advance), without NATS."""

from __future__ import annotations

import pytest

from meshkit._pb.meshkit.v1 import saga_pb2
from meshkit.saga import Envelope, SagaDefinition, advance, state_name

pytestmark = pytest.mark.unit

DEF = SagaDefinition.of(
    "order",
    start=["shop.v1.OrderCreated"],
    completed=["shop.v1.OrderCompleted"],
    failures=["shop.v1.PaymentFailed", "shop.v1.ShipmentFailed"],
    compensations=["shop.v1.StockReleased", "shop.v1.PaymentRefunded"],
    compensated=["shop.v1.OrderCancelled"],
    failed=["shop.v1.CompensationImpossible"],
)


def env(short: str, n: int, *, saga: str = "s1", deadline: int | None = None) -> Envelope:
    return Envelope(
        event_id=f"e{n}",
        event_type=f"shop.v1.{short}" if "." not in short else short,
        saga_id=saga,
        causation_id=f"e{n - 1}" if n else "",
        timestamp_ms=1_000 + n * 10,
        source="test",
        saga_type="order",
        saga_deadline_ms=deadline,
    )


def run(*shorts: str) -> saga_pb2.SagaStatus:
    status = saga_pb2.SagaStatus()
    for i, s in enumerate(shorts):
        advance(status, env(s, i), DEF)
    return status


@pytest.mark.parametrize(
    ("events", "final"),
    [
        (["OrderCreated", "StockReserved", "PaymentCompleted"], "RUNNING"),
        (["OrderCreated", "StockReserved", "OrderCompleted", "CustomerNotified"], "COMPLETED"),
        (["OrderCreated", "PaymentFailed"], "COMPENSATING"),
        (["OrderCreated", "PaymentFailed", "StockReleased"], "COMPENSATING"),
        (["OrderCreated", "PaymentFailed", "StockReleased", "OrderCancelled"], "COMPENSATED"),
        (
            [
                "OrderCreated",
                "ShipmentFailed",
                "PaymentRefunded",
                "StockReleased",
                "OrderCancelled",
            ],
            "COMPENSATED",
        ),
        (["OrderCreated", "PaymentFailed", "CompensationImpossible"], "FAILED"),
        (["OrderCreated", "meshkit.v1.SagaTimedOut", "OrderCancelled"], "TIMED_OUT"),
        # final states are sticky
        (["OrderCreated", "OrderCompleted", "PaymentFailed"], "COMPLETED"),
        (["OrderCreated", "OrderCompleted", "meshkit.v1.SagaTimedOut"], "COMPLETED"),
        (["OrderCreated", "PaymentFailed", "OrderCancelled", "OrderCompleted"], "COMPENSATED"),
        # a failure while compensating does not restart compensation
        (["OrderCreated", "PaymentFailed", "ShipmentFailed", "OrderCancelled"], "COMPENSATED"),
    ],
)
def test_transitions(events: list[str], final: str) -> None:
    status = run(*events)
    assert state_name(status.state) == final
    assert [s.event_type.rsplit(".", 1)[-1] for s in status.steps] == [
        e.rsplit(".", 1)[-1] for e in events
    ]


def test_records_ids_times_causation_and_compensation_flags() -> None:
    status = run("OrderCreated", "ShipmentFailed", "PaymentRefunded", "OrderCancelled")
    assert status.saga_id == "s1" and status.saga_type == "order"
    assert status.started_at.ToMilliseconds() == 1_000
    assert status.updated_at.ToMilliseconds() == 1_030
    assert [s.compensation for s in status.steps] == [False, False, True, True]
    assert status.steps[2].causation_id == "e1"
    assert status.reason == "ShipmentFailed"


def test_redelivered_event_is_not_recorded_twice() -> None:
    status = saga_pb2.SagaStatus()
    assert advance(status, env("OrderCreated", 0), DEF) is True
    assert advance(status, env("OrderCreated", 0), DEF) is False
    assert len(status.steps) == 1


def test_out_of_order_delivery_reaches_the_same_state() -> None:
    status = saga_pb2.SagaStatus()
    for n, short in [
        (1, "PaymentFailed"),
        (0, "OrderCreated"),
        (3, "OrderCancelled"),
        (2, "StockReleased"),
    ]:
        advance(status, env(short, n), DEF)
    assert state_name(status.state) == "COMPENSATED"
    assert status.started_at.ToMilliseconds() == 1_000  # the earliest step, not the first seen


def test_saga_deadline_is_taken_from_the_first_event_carrying_one() -> None:
    status = saga_pb2.SagaStatus()
    advance(status, env("OrderCreated", 0, deadline=5_000), DEF)
    advance(status, env("StockReserved", 1, deadline=9_999), DEF)
    assert status.deadline.ToMilliseconds() == 5_000


def test_dead_letter_fails_the_saga_with_its_reason() -> None:
    status = run("OrderCreated")
    advance(status, env("meshkit.v1.DeadLetter", 1), DEF, reason="dead-lettered: undecodable")
    assert state_name(status.state) == "FAILED"
    assert status.reason == "dead-lettered: undecodable"
