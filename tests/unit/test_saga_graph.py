"""The choreography graph: Mermaid output and its analysis (no network)."""

from __future__ import annotations

import pytest

from meshkit._pb.meshkit.v1 import event_pb2, saga_pb2
from meshkit.saga import (
    Context,
    Participant,
    SagaDefinition,
    StreamSpec,
    analyze,
    build_graph,
    to_mermaid,
)
from meshkit.saga.graph import Edge, FlowGraph

pytestmark = pytest.mark.unit

STREAM = StreamSpec(name="T", prefix="t")


def edge(consumes: str, *emits: str, compensation: bool = False, who: str = "p") -> Edge:
    return Edge(who, f"{who}.h_{consumes}", consumes, tuple(emits), compensation)


def test_reports_a_cycle_once_whatever_its_rotation() -> None:
    g = FlowGraph((edge("a.A", "a.B"), edge("a.B", "a.C"), edge("a.C", "a.A"), edge("a.C", "a.D")))
    report = analyze(g)
    assert report.cycles == (("a.A", "a.B", "a.C"),)
    assert not report.ok
    assert "cycle: A -> B -> C -> A" in report.lines()


def test_self_loop_is_a_cycle() -> None:
    assert analyze(FlowGraph((edge("a.A", "a.A"),))).cycles == (("a.A",),)


def test_unconsumed_and_never_emitted_events() -> None:
    g = FlowGraph(
        (edge("a.Start", "a.Mid"), edge("a.Mid", "a.End"), edge("a.Orphan", "a.Mid")),
        external=("a.Start",),
    )
    report = analyze(g)
    assert report.unconsumed == ("a.End",)
    assert report.never_emitted == ("a.Orphan",)
    assert report.ok  # warnings only


def test_failure_without_compensation_by_name_and_by_definition() -> None:
    g = FlowGraph(
        (
            edge("a.Start", "a.PaymentFailed", "a.Oops"),
            edge("a.Oops", "a.Done"),  # a plain handler is not a compensation
        ),
        external=("a.Start",),
    )
    assert analyze(g).uncompensated_failures == ("a.PaymentFailed",)
    definition = SagaDefinition.of(
        "x", start=["a.Start"], completed=["a.Done"], failures=["a.Oops", "a.PaymentFailed"]
    )
    report = analyze(g, definition)
    assert report.uncompensated_failures == ("a.Oops", "a.PaymentFailed")
    assert not report.ok


def test_graph_from_participant_declarations_and_mermaid() -> None:
    p = Participant("inv", STREAM)

    @p.on(saga_pb2.SagaStatus, emits=[saga_pb2.SagaStep])
    async def reserve(ev: saga_pb2.SagaStatus, ctx: Context) -> None:
        return None

    @p.compensate(saga_pb2.SagaTimedOut, emits=[event_pb2.DeadLetter])
    async def undo(ev: saga_pb2.SagaTimedOut, ctx: Context) -> None:
        return None

    q = Participant("sink", STREAM)

    @q.on(saga_pb2.SagaStep)
    async def take(ev: saga_pb2.SagaStep, ctx: Context) -> None:
        return None

    g = build_graph([p, q], external=["meshkit.v1.SagaStatus"])
    assert {(e.handler, e.consumes, e.emits, e.compensation) for e in g.edges} == {
        ("inv.reserve", "meshkit.v1.SagaStatus", ("meshkit.v1.SagaStep",), False),
        ("inv.undo", "meshkit.v1.SagaTimedOut", ("meshkit.v1.DeadLetter",), True),
        ("sink.take", "meshkit.v1.SagaStep", (), False),
    }
    text = to_mermaid(g, analyze(g))
    assert text.startswith("flowchart LR\n")
    assert "ev_meshkit_v1_SagaStatus -->|inv.reserve| ev_meshkit_v1_SagaStep" in text
    assert "ev_meshkit_v1_SagaTimedOut -.->|inv.undo| ev_meshkit_v1_DeadLetter" in text
    assert "p_sink[[sink]]" in text and "ev_meshkit_v1_SagaStep -->|sink.take| p_sink" in text


def test_problem_nodes_are_highlighted() -> None:
    g = FlowGraph((edge("a.A", "a.B"), edge("a.B", "a.A")))
    assert "class ev_a_A,ev_a_B problem" in to_mermaid(g, analyze(g))


def test_declaring_two_handlers_for_one_event_or_a_sync_handler_fails() -> None:
    p = Participant("x", STREAM)

    @p.on(saga_pb2.SagaStep)
    async def first(ev: saga_pb2.SagaStep, ctx: Context) -> None:
        return None

    with pytest.raises(ValueError, match=r"already handles meshkit\.v1\.SagaStep"):
        p.on(saga_pb2.SagaStep)(first)
    with pytest.raises(TypeError, match="must be an async function"):
        p.on(saga_pb2.SagaStatus)(lambda ev, ctx: None)  # type: ignore[arg-type,return-value]


def test_shop_choreography_is_sound() -> None:
    from examples.shop import flow

    g = build_graph(flow.participants(), external=flow.ORDER_SAGA.start)
    report = analyze(g, flow.ORDER_SAGA)
    assert report.ok, report.lines()
    assert report.cycles == () and report.uncompensated_failures == ()
    assert report.unconsumed == ("shop.v1.CustomerNotified",)
