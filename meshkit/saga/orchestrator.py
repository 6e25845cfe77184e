"""Orchestrated sagas: the order saga's state machine run by a central coordinator.

A :class:`SagaMachine` is data: states, the events that move between them,
the command each state sends to a participant when the saga enters it, and
which states compensate. The :class:`Orchestrator` keeps every saga instance
in JetStream KV (one key per saga, JSON) and moves it only with
compare-and-set on the key's revision; participants (:class:`CommandParticipant`)
receive commands on ``<prefix>.cmd.<participant>.<saga id>`` and answer with
events on ``<prefix>.reply.<saga type>.<saga id>``.

Never twice for one transition
------------------------------
A transition is: (1) read the saga and its revision; (2) write the new state
*with the command it must send* as ``pending`` (CAS on the revision; the
command's id is derived from the saga id and the transition number, so it is
the same whoever computes it); (3) publish the command with ``Nats-Msg-Id`` =
that id; (4) mark it sent (CAS); (5) ack the reply that caused it.

* Crash before (2): nothing changed; the reply is redelivered and (2) happens once,
  because a second writer's CAS fails and it re-reads a state that already
  recorded the reply's event id.
* Crash between (2) and (3) or (3) and (4): the saga sits with a pending, unsent
  command. Recovery (at start, and on the redelivered reply) first asks the
  stream whether the last command on the saga's subject already carries that
  id (a direct get, so this holds beyond the duplicate window) and publishes
  only if not; the same ``Nats-Msg-Id`` makes a racing second publish a no-op.
* Crash after (4): the redelivered reply's event id is in the history: ack only.

Participants answer with a reply id derived from the command id, so a command
redelivered to a participant cannot make two replies either.

Every saga converts to ``meshkit.v1.SagaStatus`` (:meth:`SagaInstance.to_status`)
so ``meshkit saga show`` can print orchestrated sagas beside choreographed ones
(:func:`load_status`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg
from nats.js import api

from meshkit.errors import ConfigError
from meshkit.saga import cluster
from meshkit.saga.bus import ConsumerSpec, EventBus
from meshkit.saga.dlq import dead_letter
from meshkit.saga.envelope import MSG_ID, Envelope, EnvelopeError, derive_event_id, type_name
from meshkit.saga.participant import PermanentError

__all__ = [
    "Command",
    "CommandContext",
    "CommandParticipant",
    "Orchestrator",
    "OrchestratorConfig",
    "SagaContext",
    "SagaInstance",
    "SagaMachine",
    "State",
    "list_statuses",
    "load_status",
]

log = logging.getLogger("meshkit.saga.orchestrator")

COMMAND = "Meshkit-Command"
REPLY_TO = "Meshkit-Reply-To"

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


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


# -- the orchestrator --------------------------------------------------------


@dataclass(frozen=True)
class OrchestratorConfig:
    """Where commands, replies and saga state live.

    ``stream`` holds ``<prefix>.cmd.>`` and ``<prefix>.reply.>``; ``bucket`` is the
    KV bucket of saga instances. ``duplicate_window``: how long JetStream
    remembers command ids (recovery also checks the stream, so this is a first
    line only). ``consumer``: how replies are redelivered after a crash.
    ``replicas``: the stream's and the bucket's; None takes ``MESHKIT_NATS_REPLICAS``
    (:mod:`meshkit.saga.cluster`).
    """

    stream: str = "MESHKIT_ORCH"
    prefix: str = "orch"
    bucket: str = "meshkit_orch"
    duplicate_window: float = 600.0
    storage: str = "file"
    replicas: int | None = None
    # A reply must never be dropped (a saga would hang), hence the high max_deliver:
    # after a crash, the dead process's pull request can swallow a few deliveries.
    consumer: ConsumerSpec = field(
        default_factory=lambda: ConsumerSpec(ack_wait=10.0, max_deliver=10_000)
    )

    def __post_init__(self) -> None:
        cluster.check_replicas(self.replicas, "orchestrator.replicas")

    def command_subject(self, participant: str, saga_id: str) -> str:
        return f"{self.prefix}.cmd.{participant}.{saga_id}"

    def reply_subject(self, saga_type: str, saga_id: str) -> str:
        return f"{self.prefix}.reply.{saga_type}.{saga_id}"


async def ensure_orchestration(bus: EventBus, config: OrchestratorConfig) -> Any:
    """Create the command/reply stream and the saga bucket (idempotent); returns the KV."""
    stream_cfg = api.StreamConfig(
        name=config.stream,
        subjects=[f"{config.prefix}.cmd.>", f"{config.prefix}.reply.>"],
        storage=api.StorageType(config.storage),
        duplicate_window=config.duplicate_window,
        allow_direct=True,
        num_replicas=cluster.replicas(config.replicas),
    )
    info = await cluster.stream_info_or_none(bus.js, config.stream)
    if info is None:
        await cluster.add_stream(bus.js, stream_cfg)
    else:
        have = info.config.num_replicas or 1
        raised = cluster.replicas_target(f"stream {config.stream}", have, config.replicas)
        if raised is not None:
            await cluster.update_stream(
                bus.js,
                replace(info.config, num_replicas=raised),
                f"raised the replicas of stream {config.stream} to {raised}",
            )
    return await bus.key_value(config.bucket, history=8, replicas=config.replicas)


CrashHook = Callable[[str, "SagaInstance"], Awaitable[None]]


class Orchestrator:
    """Runs sagas of one definition: starts them, and moves them on every reply."""

    def __init__(
        self,
        bus: EventBus,
        definition: SagaMachine,
        *,
        config: OrchestratorConfig | None = None,
        name: str = "orchestrator",
        hook: CrashHook | None = None,
    ) -> None:
        self.bus = bus
        self.definition = definition
        self.config = config or OrchestratorConfig()
        self.name = name
        self._hook = hook
        self._kv: Any = None
        self._consumer: Any = None
        self.stats: dict[str, int] = {
            "transitions": 0,
            "commands": 0,
            "duplicates": 0,
            "ignored": 0,
            "conflicts": 0,
            "recovered": 0,
        }

    @property
    def _durable(self) -> str:
        return f"orch-{self.definition.name}"

    def _key(self, saga_id: str) -> str:
        return f"{self.definition.name}.{saga_id}"

    async def _point(self, point: str, inst: SagaInstance) -> None:
        if self._hook is not None:
            await self._hook(point, inst)

    async def start(self) -> Orchestrator:
        """Ensure stream and bucket, finish interrupted transitions, follow replies."""
        self._kv = await ensure_orchestration(self.bus, self.config)
        await self.recover()
        self._consumer = self.bus.consumer(
            self.config.stream,
            self._durable,
            self._on_reply,
            filter_subjects=[f"{self.config.prefix}.reply.{self.definition.name}.>"],
            spec=self.config.consumer,
        )
        await self._consumer.start()
        return self

    async def stop(self, grace: float = 10.0) -> None:
        """Stop following replies, letting in-flight transitions finish for ``grace`` seconds."""
        if self._consumer is not None:
            await self._consumer.stop(grace)
            self._consumer = None

    async def kv(self) -> Any:
        if self._kv is None:
            self._kv = await ensure_orchestration(self.bus, self.config)
        return self._kv

    async def begin(self, saga_id: str, start: Message) -> SagaInstance:
        """Start saga ``saga_id`` (idempotent: a second call returns the existing saga)."""
        if not _NAME.match(saga_id):
            raise ValueError(f"saga id {saga_id!r} must match [A-Za-z0-9_-]+")
        if type_name(start) != type_name(self.definition.start_type):
            raise ValueError(
                f"saga {self.definition.name} starts with {type_name(self.definition.start_type)}, "
                f"not {type_name(start)}"
            )
        kv = await self.kv()
        now = _now_ms()
        inst = SagaInstance(
            saga_id=saga_id,
            saga_type=self.definition.name,
            state=self.definition.initial,
            start_type=type_name(start),
            start=start.SerializeToString(),
            started_ms=now,
            updated_ms=now,
        )
        inst = self._enter(inst, self.definition.initial, event="", event_id=saga_id)
        try:
            rev = await kv.create(self._key(saga_id), inst.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            existing = await self.get(saga_id)
            assert existing is not None
            return existing
        await self._point("after_write", inst)
        await self._dispatch(inst, rev, fresh=True)
        return inst

    async def get(self, saga_id: str) -> SagaInstance | None:
        got = await self._load(saga_id)
        return got[0] if got else None

    async def _load(self, saga_id: str) -> tuple[SagaInstance, int] | None:
        kv = await self.kv()
        try:
            entry = await kv.get(self._key(saga_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return SagaInstance.decode(entry.value), int(entry.revision)

    def _context(self, inst: SagaInstance) -> SagaContext:
        start = self.definition.start_type()
        start.ParseFromString(inst.start)
        replies: dict[str, Message] = {}
        for event, _t, data in inst.replies:
            msg = self.definition.events[event]()
            msg.ParseFromString(data)
            replies[event] = msg
        return SagaContext(inst.saga_id, start, replies, inst.state)

    def _enter(self, inst: SagaInstance, target: str, *, event: str, event_id: str) -> SagaInstance:
        """``inst`` moved to ``target``, with the entry command (if any) pending."""
        st = self.definition.states[target]
        step_no = len(inst.history)
        pending: list[PendingCommand] = []
        moved = replace(inst, state=target)
        for i, command in enumerate(st.entry_commands()):
            msg = command.build(self._context(moved))
            pending.append(
                PendingCommand(
                    command_id=derive_event_id(
                        inst.saga_id, f"{self.definition.name}:{step_no}:{target}", i
                    ),
                    participant=command.participant,
                    name=command.name or type_name(msg),
                    type=type_name(msg),
                    subject=self.config.command_subject(command.participant, inst.saga_id),
                    data=msg.SerializeToString(),
                    causation_id=event_id,
                )
            )
        label = ("!" if st.compensation else "") + event if event else "(start)"
        step = Step(
            inst.state,
            target,
            label,
            event_id,
            _now_ms(),
            ",".join(c.command_id for c in pending),
        )
        return replace(
            inst,
            state=target,
            history=(*inst.history, step),
            pending=tuple(pending),
            updated_ms=step.at_ms,
            final=st.final,
            succeeded=st.succeeded,
        )

    async def _on_reply(self, msg: Msg) -> None:
        try:
            env = Envelope.from_headers(msg.headers)
        except EnvelopeError as exc:
            await dead_letter(
                self.bus, msg, reason=f"invalid envelope: {exc}", consumer=self._durable
            )
            return
        event = self.definition.event_name(env.event_type)
        saga_id = env.saga_id or msg.subject.rsplit(".", 1)[-1]
        if event is None:
            self.stats["ignored"] += 1
            log.info("saga %s: ignoring unknown reply type %s", saga_id, env.event_type)
            await msg.ack()
            return
        kv = await self.kv()
        while True:
            got = await self._load(saga_id)
            if got is None:
                self.stats["ignored"] += 1
                log.warning("reply %s for unknown saga %s", env.event_id, saga_id)
                await msg.ack()
                return
            inst, rev = got
            if inst.seen(env.event_id):
                # Redelivered after a crash: finish the transition it caused, if unfinished.
                self.stats["duplicates"] += 1
                await self._dispatch(inst, rev, fresh=False)
                await msg.ack()
                return
            target = self.definition.states[inst.state].on.get(event)
            if target is None:
                self.stats["ignored"] += 1
                log.info("saga %s: %s is not expected in %s; ignored", saga_id, event, inst.state)
                await msg.ack()
                return
            await self._point("before_write", inst)
            moved = replace(inst, replies=(*inst.replies, (event, env.event_type, bytes(msg.data))))
            new = self._enter(moved, target, event=event, event_id=env.event_id)
            try:
                new_rev = await kv.update(self._key(saga_id), new.encode(), last=rev)
            except nats.js.errors.KeyWrongLastSequenceError:
                self.stats["conflicts"] += 1
                continue
            self.stats["transitions"] += 1
            await self._point("after_write", new)
            await self._dispatch(new, int(new_rev), fresh=True)
            await self._point("before_ack", new)
            await msg.ack()
            return

    async def _dispatch(self, inst: SagaInstance, rev: int, *, fresh: bool) -> None:
        """Publish ``inst``'s pending commands once each, then mark them sent."""
        if not inst.unsent:
            return
        for cmd in inst.pending:
            if cmd.sent:
                continue
            if not fresh and await self._already_published(cmd):
                self.stats["recovered"] += 1
                continue
            env = Envelope(
                event_id=cmd.command_id,
                event_type=cmd.type,
                saga_id=inst.saga_id,
                saga_type=inst.saga_type,
                causation_id=cmd.causation_id,
                timestamp_ms=_now_ms(),
                source=self.name,
                extra={
                    COMMAND: cmd.name,
                    REPLY_TO: self.config.reply_subject(inst.saga_type, inst.saga_id),
                },
            )
            ack = await self.bus.publish_raw(cmd.subject, cmd.data, env.to_headers())
            if not ack.duplicate:
                self.stats["commands"] += 1
        await self._point("after_publish", inst)
        done = replace(inst, pending=tuple(replace(c, sent=True) for c in inst.pending))
        kv = await self.kv()
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
            # Losing this CAS means someone else already marked them or moved on.
            await kv.update(self._key(inst.saga_id), done.encode(), last=rev)
        await self._point("after_mark", done)

    async def _already_published(self, cmd: PendingCommand) -> bool:
        try:
            raw = await self.bus.js.get_msg(self.config.stream, subject=cmd.subject, direct=True)
        except nats.js.errors.NotFoundError:
            return False
        return bool(raw.headers and raw.headers.get(MSG_ID) == cmd.command_id)

    async def recover(self) -> int:
        """Finish every transition a crash interrupted (pending, unsent commands)."""
        kv = await self.kv()
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return 0
        n = 0
        prefix = f"{self.definition.name}."
        for key in keys:
            if not key.startswith(prefix):
                continue
            saga_id = key.split(".", 1)[1]
            got = await self._load(saga_id)
            if got is None:
                continue
            inst, rev = got
            if inst.unsent:
                await self._dispatch(inst, rev, fresh=False)
                n += 1
        if n:
            log.info("orchestrator %s: resumed %d interrupted transitions", self.name, n)
        return n

    async def wait(self, saga_id: str, *, within: float = 10.0) -> SagaInstance:
        """Wait until the saga reaches a final state (polling KV; for tests and tools)."""
        end = time.monotonic() + within
        while True:
            inst = await self.get(saga_id)
            if inst is not None and inst.final:
                return inst
            if time.monotonic() > end:
                raise TimeoutError(
                    f"saga {saga_id} not final after {within}s: {inst and inst.state}"
                )
            await asyncio.sleep(0.02)


async def load_status(
    bus: EventBus,
    saga_id: str,
    *,
    saga_type: str | None = None,
    config: OrchestratorConfig | None = None,
) -> Any:
    """The ``meshkit.v1.SagaStatus`` of an orchestrated saga, or None (for ``meshkit saga show``)."""
    cfg = config or OrchestratorConfig()
    try:
        kv = await bus.js.key_value(cfg.bucket)
    except nats.js.errors.BucketNotFoundError:
        return None
    keys: Sequence[str]
    if saga_type:
        keys = [f"{saga_type}.{saga_id}"]
    else:
        try:
            keys = [k for k in await kv.keys() if k.split(".", 1)[-1] == saga_id]
        except nats.js.errors.NoKeysError:
            return None
    for key in keys:
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue
        if entry.value:
            return SagaInstance.decode(entry.value).to_status()
    return None


async def list_statuses(bus: EventBus, *, config: OrchestratorConfig | None = None) -> list[Any]:
    """Every orchestrated saga as ``meshkit.v1.SagaStatus`` (for ``meshkit saga list``)."""
    cfg = config or OrchestratorConfig()
    try:
        kv = await bus.js.key_value(cfg.bucket)
        keys = await kv.keys()
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
        return []
    out = []
    for key in sorted(keys):
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            entry = await kv.get(key)
            if entry.value:
                out.append(SagaInstance.decode(entry.value).to_status())
    return out


# -- participants in orchestration mode --------------------------------------


@dataclass(frozen=True)
class CommandContext:
    """What a command handler sees besides the command."""

    envelope: Envelope
    participant: str
    deliveries: int

    @property
    def saga_id(self) -> str:
        return self.envelope.saga_id

    @property
    def command_id(self) -> str:
        return self.envelope.event_id


CommandHandler = Callable[[Any, CommandContext], Awaitable[Message]]


class CommandParticipant:
    """A participant that executes commands and replies with one event each.

    ::

        inventory = CommandParticipant("inventory")

        @inventory.handles(ReserveStockRequest)
        async def reserve(cmd: ReserveStockRequest, ctx: CommandContext) -> Message:
            return StockReserved(...)  # or StockReservationFailed(...)

    The reply's id is derived from the command's, so a redelivered command
    yields a reply JetStream drops. Effects must be idempotent per
    ``ctx.command_id`` (or run through an inbox, :mod:`meshkit.saga.inbox`).
    """

    def __init__(self, name: str) -> None:
        if not _NAME.match(name):
            raise ConfigError("participant.name", f"{name!r} must match [A-Za-z0-9_-]+")
        self.name = name
        self._handlers: dict[str, tuple[type[Message], CommandHandler]] = {}
        self._consumer: Any = None
        self._bus: EventBus | None = None

    def handles(self, command: type[Message]) -> Callable[[CommandHandler], CommandHandler]:
        def deco(fn: CommandHandler) -> CommandHandler:
            full = type_name(command)
            if full in self._handlers:
                raise ConfigError(f"participant {self.name}", f"{full} already has a handler")
            self._handlers[full] = (command, fn)
            return fn

        return deco

    async def start(
        self,
        bus: EventBus,
        config: OrchestratorConfig | None = None,
        *,
        spec: ConsumerSpec | None = None,
    ) -> CommandParticipant:
        cfg = config or OrchestratorConfig()
        await ensure_orchestration(bus, cfg)
        self._bus = bus
        consumer_spec = spec or ConsumerSpec(ack_wait=10.0)
        durable = f"cmd-{self.name}"

        async def give_up(msg: Msg, reason: str) -> None:
            # A command nobody can execute must stay visible and replayable: a
            # silently dropped one would leave its saga waiting forever.
            await dead_letter(bus, msg, reason=reason, consumer=durable)

        async def handle(msg: Msg) -> None:
            try:
                env = Envelope.from_headers(msg.headers)
            except EnvelopeError as exc:
                await give_up(msg, f"invalid envelope: {exc}")
                return
            entry = self._handlers.get(env.event_type)
            if entry is None:
                await give_up(msg, f"{self.name} has no handler for command {env.event_type}")
                return
            cls, fn = entry
            try:
                cmd = cls.FromString(msg.data)
            except (DecodeError, ValueError) as exc:
                await give_up(msg, f"undecodable {env.event_type} payload: {exc}")
                return
            deliveries = 1
            with contextlib.suppress(Exception):
                deliveries = int(msg.metadata.num_delivered)
            try:
                reply = await fn(cmd, CommandContext(env, self.name, deliveries))
                reply_to = (msg.headers or {}).get(REPLY_TO) or cfg.reply_subject(
                    env.saga_type, env.saga_id
                )
                out = env.caused(
                    reply, event_id=derive_event_id(env.event_id, self.name, 0), source=self.name
                )
                await bus.publish_raw(reply_to, reply.SerializeToString(), out.to_headers())
            except PermanentError as exc:
                await give_up(msg, f"{self.name} rejected {env.event_type}: {exc}")
                return
            except Exception as exc:
                if deliveries >= consumer_spec.max_deliver:
                    await give_up(
                        msg,
                        f"{self.name} failed {env.event_type} {deliveries} times "
                        f"(max_deliver); last error: {exc!r}",
                    )
                    return
                raise  # the consumer naks it with the spec's backoff
            await msg.ack()

        self._consumer = bus.consumer(
            cfg.stream,
            durable,
            handle,
            filter_subjects=[f"{cfg.prefix}.cmd.{self.name}.>"],
            spec=consumer_spec,
        )
        await self._consumer.start()
        return self

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking commands, letting in-flight ones finish for ``grace`` seconds."""
        if self._consumer is not None:
            await self._consumer.stop(grace)
            self._consumer = None
