"""Participants in orchestration mode: they take commands from the orchestrator
(``<prefix>.cmd.<participant>.<saga id>``) and answer with events on
``<prefix>.reply.<saga type>.<saga id>``; a reply's id is derived from the command's,
so a redelivered command cannot make two replies (see
:mod:`meshkit.saga.orchestrator` for the whole protocol).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg

from meshkit.errors import ConfigError
from meshkit.saga.bus import EventBus
from meshkit.saga.dlq import dead_letter
from meshkit.saga.envelope import Envelope, EnvelopeError, derive_event_id, type_name
from meshkit.saga.orchestrator import REPLY_TO, OrchestratorConfig, ensure_orchestration
from meshkit.saga.participant import PermanentError
from meshkit.saga.streams import _NAME, ConsumerSpec

__all__ = ["CommandContext", "CommandParticipant"]

log = logging.getLogger("meshkit.saga.orchestrator")


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
