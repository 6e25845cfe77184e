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
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from nats.aio.msg import Msg
from nats.js import api

from meshkit.saga import cluster
from meshkit.saga.bus import EventBus
from meshkit.saga.dlq import dead_letter
from meshkit.saga.envelope import MSG_ID, Envelope, EnvelopeError, derive_event_id, type_name
from meshkit.saga.machine import (
    Command,
    PendingCommand,
    SagaContext,
    SagaInstance,
    SagaMachine,
    State,
    Step,
    _now_ms,
)
from meshkit.saga.streams import _NAME, ConsumerSpec

__all__ = [
    "Command",
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
