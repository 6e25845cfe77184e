"""An orchestrated saga's definition and its persisted instance: data, no I/O.

A :class:`SagaMachine` is states, the events that move between them, the command
each state sends to a participant when the saga enters it, and which states
compensate. A :class:`SagaInstance` is one saga's position in it, with the
command it owes (:class:`PendingCommand`) and its history; the
:class:`~meshkit.saga.orchestrator.Orchestrator` stores it in JetStream KV.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from meshkit.errors import ConfigError
from meshkit.saga.envelope import type_name
from meshkit.saga.streams import _NAME

__all__ = [
    "Command",
    "PendingCommand",
    "SagaContext",
    "SagaInstance",
    "SagaMachine",
    "State",
    "Step",
]


# -- the definition ----------------------------------------------------------


@dataclass(frozen=True)
class SagaContext:
    """What a command builder sees: the start message and every reply so far, by event name."""

    saga_id: str
    start: Message
    replies: Mapping[str, Message]
    state: str


@dataclass(frozen=True)
class Command:
    """A command a state sends to ``participant`` when the saga enters it.

    ``build(ctx)`` makes the protobuf message; it must be deterministic in ``ctx``.
    """

    participant: str
    build: Callable[[SagaContext], Message]
    name: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.participant):
            raise ConfigError(
                "command.participant", f"{self.participant!r} must match [A-Za-z0-9_-]+"
            )


@dataclass(frozen=True)
class State:
    """One state: the commands sent on entry, and ``on``: event name -> next state.

    ``command`` is shorthand for one entry command; ``commands`` sends several (to
    different participants, e.g. complete the order *and* notify the customer).
    """

    command: Command | None = None
    on: Mapping[str, str] = field(default_factory=dict)
    final: bool = False
    compensation: bool = False
    succeeded: bool = False
    commands: tuple[Command, ...] = ()

    def entry_commands(self) -> tuple[Command, ...]:
        return ((self.command,) if self.command is not None else ()) + tuple(self.commands)


@dataclass(frozen=True)
class SagaMachine:
    """A saga as a state machine, checked when built.

    ``events`` maps each event name used in ``on`` to the protobuf message type
    participants reply with (one name per type).
    """

    name: str
    initial: str
    states: Mapping[str, State]
    events: Mapping[str, type[Message]]
    start_type: type[Message]

    def __post_init__(self) -> None:
        where = f"saga {self.name}"
        if not _NAME.match(self.name):
            raise ConfigError(f"{where}.name", "must match [A-Za-z0-9_-]+")
        if self.initial not in self.states:
            raise ConfigError(f"{where}.initial", f"{self.initial!r} is not a state")
        seen: dict[str, str] = {}
        for name, t in self.events.items():
            full = type_name(t)
            if full in seen:
                raise ConfigError(f"{where}.events.{name}", f"{full} is already event {seen[full]}")
            seen[full] = name
        for sname, st in self.states.items():
            targets = [c.participant for c in st.entry_commands()]
            if len(targets) != len(set(targets)):
                raise ConfigError(
                    f"{where}.states.{sname}.commands", "at most one command per participant"
                )
            if st.final and st.on:
                raise ConfigError(f"{where}.states.{sname}", "a final state has no transitions")
            if not st.final and not st.on:
                raise ConfigError(f"{where}.states.{sname}", "not final, but nothing leaves it")
            for event, target in st.on.items():
                if event not in self.events:
                    raise ConfigError(f"{where}.states.{sname}.on.{event}", "unknown event")
                if target not in self.states:
                    raise ConfigError(
                        f"{where}.states.{sname}.on.{event}", f"unknown state {target!r}"
                    )

    def event_name(self, full_type: str) -> str | None:
        for name, t in self.events.items():
            if type_name(t) == full_type:
                return name
        return None

    def to_mermaid(self) -> str:
        """The state machine as a Mermaid ``stateDiagram-v2``."""
        lines = ["stateDiagram-v2", f"    [*] --> {self.initial}"]
        for sname, st in self.states.items():
            cmds = ", ".join(f"{c.participant}.{c.name or 'command'}" for c in st.entry_commands())
            if cmds:
                lines.append(f"    {sname}: {sname} / {cmds}")
            for event, target in st.on.items():
                lines.append(f"    {sname} --> {target}: {event}")
            if st.final:
                lines.append(f"    {sname} --> [*]")
        return "\n".join(lines)


# -- the persisted instance --------------------------------------------------


@dataclass(frozen=True)
class PendingCommand:
    command_id: str
    participant: str
    name: str
    type: str
    subject: str
    data: bytes
    causation_id: str
    sent: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.command_id,
            "participant": self.participant,
            "name": self.name,
            "type": self.type,
            "subject": self.subject,
            "data": base64.b64encode(self.data).decode(),
            "causation": self.causation_id,
            "sent": self.sent,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PendingCommand:
        return cls(
            command_id=d["id"],
            participant=d["participant"],
            name=d["name"],
            type=d["type"],
            subject=d["subject"],
            data=base64.b64decode(d["data"]),
            causation_id=d.get("causation", ""),
            sent=bool(d.get("sent")),
        )


@dataclass(frozen=True)
class Step:
    """One transition taken: from, to, the event that caused it, and when."""

    from_state: str
    to_state: str
    event: str
    event_id: str
    at_ms: int
    command_id: str = ""


@dataclass(frozen=True)
class SagaInstance:
    """One saga's persisted state (the KV value, as JSON)."""

    saga_id: str
    saga_type: str
    state: str
    start_type: str
    start: bytes
    replies: tuple[tuple[str, str, bytes], ...] = ()  # (event name, type, payload)
    history: tuple[Step, ...] = ()
    pending: tuple[PendingCommand, ...] = ()
    started_ms: int = 0
    updated_ms: int = 0
    final: bool = False
    succeeded: bool = False

    def encode(self) -> bytes:
        return json.dumps(
            {
                "saga_id": self.saga_id,
                "saga_type": self.saga_type,
                "state": self.state,
                "start": {"type": self.start_type, "data": base64.b64encode(self.start).decode()},
                "replies": [
                    {"event": e, "type": t, "data": base64.b64encode(d).decode()}
                    for e, t, d in self.replies
                ],
                "history": [
                    {
                        "from": s.from_state,
                        "to": s.to_state,
                        "event": s.event,
                        "event_id": s.event_id,
                        "at": s.at_ms,
                        "command_id": s.command_id,
                    }
                    for s in self.history
                ],
                "pending": [c.to_json() for c in self.pending],
                "started": self.started_ms,
                "updated": self.updated_ms,
                "final": self.final,
                "succeeded": self.succeeded,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> SagaInstance:
        d = json.loads(raw)
        return cls(
            saga_id=d["saga_id"],
            saga_type=d["saga_type"],
            state=d["state"],
            start_type=d["start"]["type"],
            start=base64.b64decode(d["start"]["data"]),
            replies=tuple(
                (r["event"], r["type"], base64.b64decode(r["data"])) for r in d.get("replies", [])
            ),
            history=tuple(
                Step(
                    h["from"], h["to"], h["event"], h["event_id"], h["at"], h.get("command_id", "")
                )
                for h in d.get("history", [])
            ),
            pending=tuple(PendingCommand.from_json(c) for c in d.get("pending") or ()),
            started_ms=int(d.get("started", 0)),
            updated_ms=int(d.get("updated", 0)),
            final=bool(d.get("final")),
            succeeded=bool(d.get("succeeded")),
        )

    @property
    def unsent(self) -> bool:
        """True while an entry command of the current state may not have been published."""
        return any(not c.sent for c in self.pending)

    def seen(self, event_id: str) -> bool:
        return any(s.event_id == event_id for s in self.history)

    def to_status(self) -> Any:
        """This saga as a ``meshkit.v1.SagaStatus`` (what ``meshkit saga show`` prints)."""
        from meshkit._pb.meshkit.v1 import saga_pb2

        if self.final:
            compensated = any(s.to_state != self.state and _is_comp(s) for s in self.history)
            state = (
                saga_pb2.SAGA_STATE_COMPLETED
                if self.succeeded
                else (
                    saga_pb2.SAGA_STATE_COMPENSATED if compensated else saga_pb2.SAGA_STATE_FAILED
                )
            )
        elif self.history and self.history[-1].event.startswith("!"):
            state = saga_pb2.SAGA_STATE_COMPENSATING
        else:
            state = saga_pb2.SAGA_STATE_RUNNING
        status = saga_pb2.SagaStatus(
            saga_id=self.saga_id, saga_type=self.saga_type, state=state, reason=self.state
        )
        status.started_at.FromMilliseconds(self.started_ms)
        status.updated_at.FromMilliseconds(self.updated_ms)
        for s in self.history:
            step = status.steps.add(
                event_id=s.event_id,
                event_type=f"{s.event}: {s.from_state} -> {s.to_state}",
                source="orchestrator",
                compensation=s.event.startswith("!"),
            )
            step.at.FromMilliseconds(s.at_ms)
        return status


def _is_comp(step: Step) -> bool:
    return step.event.startswith("!")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
