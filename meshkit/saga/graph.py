"""The choreography as a graph: who consumes which event and emits which.

Built from the participants' declarations (``@participant.on(E, emits=[...])``),
drawn as Mermaid, and checked for the usual choreography mistakes: cycles,
events nobody consumes, and failure events no compensation handler reacts to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from meshkit.saga.participant import Participant
from meshkit.saga.tracker import TIMED_OUT_TYPE, SagaDefinition

__all__ = ["Edge", "FlowGraph", "GraphReport", "analyze", "build_graph", "to_mermaid"]


@dataclass(frozen=True)
class Edge:
    """One handler: ``consumes`` → each of ``emits``."""

    participant: str
    handler: str
    consumes: str
    emits: tuple[str, ...]
    compensation: bool


@dataclass(frozen=True)
class FlowGraph:
    """Every declared handler; ``external`` are events published from outside handlers."""

    edges: tuple[Edge, ...]
    external: tuple[str, ...] = ()

    @property
    def events(self) -> list[str]:
        names = set(self.external)
        for e in self.edges:
            names.add(e.consumes)
            names.update(e.emits)
        return sorted(names)

    def consumers(self, event: str) -> list[Edge]:
        return [e for e in self.edges if e.consumes == event]

    def producers(self, event: str) -> list[Edge]:
        return [e for e in self.edges if event in e.emits]


@dataclass(frozen=True)
class GraphReport:
    """What :func:`analyze` found."""

    cycles: tuple[tuple[str, ...], ...] = ()
    unconsumed: tuple[str, ...] = ()
    uncompensated_failures: tuple[str, ...] = ()
    never_emitted: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """No cycles and every failure event compensated (unconsumed events are warnings)."""
        return not self.cycles and not self.uncompensated_failures

    def lines(self) -> list[str]:
        out: list[str] = []
        for cycle in self.cycles:
            out.append("cycle: " + " -> ".join(_short(c) for c in (*cycle, cycle[0])))
        for ev in self.uncompensated_failures:
            out.append(f"failure event without compensation: {ev}")
        for ev in self.unconsumed:
            out.append(f"event nobody consumes: {ev}")
        for ev in self.never_emitted:
            out.append(f"event consumed but never emitted: {ev}")
        out.extend(self.notes)
        return out


def build_graph(participants: Iterable[Participant], *, external: Iterable[str] = ()) -> FlowGraph:
    """The graph of every handler the participants declare."""
    edges = [
        Edge(p.name, h.name, h.event_type, h.emits, h.compensation)
        for p in participants
        for h in p.handlers.values()
    ]
    edges.sort(key=lambda e: (e.consumes, e.handler))
    return FlowGraph(tuple(edges), tuple(sorted(set(external))))


def _is_failure(event: str, definition: SagaDefinition | None) -> bool:
    if definition is not None and (definition.failures or definition.failed):
        return event in definition.failures or event == TIMED_OUT_TYPE
    short = _short(event)
    return short.endswith(("Failed", "TimedOut", "Declined", "Rejected"))


def analyze(graph: FlowGraph, definition: SagaDefinition | None = None) -> GraphReport:
    """Find cycles, unconsumed events and failure events nobody compensates."""
    consumed = {e.consumes for e in graph.edges}
    emitted = {ev for e in graph.edges for ev in e.emits} | set(graph.external)
    unconsumed = sorted(emitted - consumed)
    never = sorted(consumed - emitted - {TIMED_OUT_TYPE})
    uncompensated = sorted(
        ev
        for ev in graph.events
        if _is_failure(ev, definition)
        and ev != TIMED_OUT_TYPE
        and not any(e.compensation for e in graph.consumers(ev))
    )
    return GraphReport(
        cycles=tuple(_cycles(graph)),
        unconsumed=tuple(unconsumed),
        uncompensated_failures=tuple(uncompensated),
        never_emitted=tuple(never),
    )


def _cycles(graph: FlowGraph) -> list[tuple[str, ...]]:
    adjacency: dict[str, set[str]] = {}
    for e in graph.edges:
        adjacency.setdefault(e.consumes, set()).update(e.emits)
    found: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, path: list[str], on_path: set[str]) -> None:
        for nxt in sorted(adjacency.get(node, ())):
            if nxt == start:
                found.add(_canonical(tuple(path)))
            elif nxt not in on_path and nxt > start:
                on_path.add(nxt)
                path.append(nxt)
                walk(start, nxt, path, on_path)
                path.pop()
                on_path.discard(nxt)

    for start in sorted(adjacency):
        walk(start, start, [start], {start})
    return sorted(found)


def _canonical(cycle: tuple[str, ...]) -> tuple[str, ...]:
    i = cycle.index(min(cycle))
    return cycle[i:] + cycle[:i]


def _short(event: str) -> str:
    return event.rsplit(".", 1)[-1]


def _node(event: str) -> str:
    return "ev_" + "".join(c if c.isalnum() else "_" for c in event)


def to_mermaid(graph: FlowGraph, report: GraphReport | None = None) -> str:
    """A Mermaid flowchart: events are nodes, handlers are edges labelled by who handles.

    Compensation handlers are dashed; events in a cycle or failures nobody
    compensates are highlighted.
    """
    lines = ["flowchart LR"]
    for ev in graph.events:
        lines.append(f'    {_node(ev)}(["{_short(ev)}"])')
    sinks: set[str] = set()
    for e in graph.edges:
        arrow = "-.->" if e.compensation else "-->"
        label = e.handler
        if e.emits:
            for out in e.emits:
                lines.append(f"    {_node(e.consumes)} {arrow}|{label}| {_node(out)}")
        else:
            sink = "p_" + "".join(c if c.isalnum() else "_" for c in e.participant)
            if sink not in sinks:
                sinks.add(sink)
                lines.append(f"    {sink}[[{e.participant}]]")
            lines.append(f"    {_node(e.consumes)} {arrow}|{label}| {sink}")
    if report is not None:
        bad = {ev for c in report.cycles for ev in c} | set(report.uncompensated_failures)
        if bad:
            lines.append("    classDef problem fill:#fdd,stroke:#c00")
            lines.append("    class " + ",".join(_node(ev) for ev in sorted(bad)) + " problem")
    return "\n".join(lines) + "\n"
