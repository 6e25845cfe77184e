"""Participants: services that react to saga events and emit the next ones.

::

    inventory = Participant("inventory", SHOP)

    @inventory.on(OrderCreated, emits=[StockReserved, StockReservationFailed])
    async def reserve(event: OrderCreated, ctx: Context) -> Message:
        ...                                  # local work in ctx.tx (the inbox's store)
        return StockReserved(order_id=event.order_id, ...)

    @inventory.compensate(PaymentFailed, emits=[StockReleased])
    async def release(event: PaymentFailed, ctx: Context) -> Message | None: ...

    running = await inventory.start(bus, inbox=SqliteInbox(conn, lock))
    ...
    await running.stop()

A handler returns nothing, one event or a sequence of events, and may also call
``ctx.emit(event)``. Outputs carry the input's saga id (correlation), its event
id as causation, and deterministic ids, so a redelivered input never produces a
second downstream event. Errors: a :class:`PermanentError` (or an undecodable
payload, a bad envelope, a failed ``validate``) dead-letters the event at once;
any other exception naks it for redelivery with backoff until ``max_deliver``,
then dead-letters it. Events of a type the participant has no handler for are
acknowledged and counted (``stats.ignored``), never blocking the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg

import meshkit.deadline
from meshkit.errors import MeshkitError
from meshkit.saga import _telemetry
from meshkit.saga.bus import EventBus
from meshkit.saga.consumer import PullConsumer
from meshkit.saga.dlq import dead_letter
from meshkit.saga.envelope import (
    Envelope,
    EnvelopeError,
    derive_event_id,
    event_type_of,
    type_name,
)
from meshkit.saga.inbox import Inbox, MemoryInbox, Outbound, run_many
from meshkit.saga.streams import ConsumerSpec, StreamSpec

__all__ = ["Context", "HandlerSpec", "Participant", "PermanentError", "RunningParticipant"]

log = logging.getLogger("meshkit.saga.participant")

E = TypeVar("E", bound=Message)
HandlerResult = Message | Sequence[Message] | None
Handler = Callable[[Any, "Context"], Awaitable[HandlerResult]]


class PermanentError(MeshkitError):
    """Raised by a handler for an event that can never succeed: it is dead-lettered."""

    code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class HandlerSpec:
    """One declared handler: what it consumes and what it may emit."""

    participant: str
    name: str
    event_type: str
    message_class: type[Message]
    func: Handler
    emits: tuple[str, ...]
    compensation: bool
    validate: Callable[[Any], None] | None = None
    # Idempotent by construction: no inbox record (see Participant.on).
    idempotent: bool = False


class Context:
    """What a handler gets besides its event: the envelope, the store, ``emit``."""

    __slots__ = ("_msg", "_outputs", "envelope", "participant", "tx")

    def __init__(self, envelope: Envelope, participant: str, tx: Any, msg: Msg | None) -> None:
        self.envelope = envelope
        self.participant = participant
        self.tx = tx
        self._msg = msg
        self._outputs: list[Message] = []

    @property
    def saga_id(self) -> str:
        return self.envelope.saga_id

    @property
    def event_id(self) -> str:
        return self.envelope.event_id

    @property
    def deliveries(self) -> int:
        """How many times this event has been delivered (1 the first time)."""
        if self._msg is None:
            return 1
        try:
            return int(self._msg.metadata.num_delivered)
        except Exception:
            return 1

    def emit(self, event: Message) -> None:
        """Emit ``event`` after the handler succeeds (in call order, before returned ones)."""
        self._outputs.append(event)

    async def progress(self) -> None:
        """Tell JetStream the handler is still working (resets the ack wait)."""
        if self._msg is not None:
            await self._msg.in_progress()


class Participant:
    """A named set of event handlers on one stream; its durable consumer has the same name."""

    def __init__(
        self,
        name: str,
        stream: StreamSpec,
        *,
        consumer: ConsumerSpec | None = None,
        durable: str | None = None,
    ) -> None:
        self.name = name
        self.stream = stream
        self.consumer_spec = consumer or ConsumerSpec()
        self.durable = durable or f"{stream.name}-{name}".replace(".", "_")
        self._handlers: dict[str, HandlerSpec] = {}

    @property
    def handlers(self) -> Mapping[str, HandlerSpec]:
        """Declared handlers by the event type they consume."""
        return dict(self._handlers)

    def on(
        self,
        event: type[E],
        *,
        emits: Iterable[type[Message] | str] = (),
        compensation: bool = False,
        validate: Callable[[E], None] | None = None,
        name: str | None = None,
        idempotent: bool = False,
    ) -> Callable[
        [Callable[[E, Context], Awaitable[HandlerResult]]],
        Callable[[E, Context], Awaitable[HandlerResult]],
    ]:
        """Declare the handler for ``event``; ``emits`` lists what it may emit (for the graph).

        ``idempotent=True`` says the handler is idempotent by construction: run again
        for an event it handled (a redelivery, a duplicate), whatever happened since,
        it changes nothing more and returns the same outputs, because its writes
        recognise their own repeat (an upsert keyed by the event, a state guard). An
        inbox that can (:class:`~meshkit.saga.SqliteInbox`) then keeps no record of
        its events: the handler runs on every delivery, still inside the batch's
        transaction, and its redeliveries count as handled, not as duplicates. A
        handler whose answer depends on state others change (a reservation that
        may fail once stock is gone) is not idempotent in this sense: the record is
        what makes it exactly-once.
        """
        etype = type_name(event)

        def register(
            func: Callable[[E, Context], Awaitable[HandlerResult]],
        ) -> Callable[[E, Context], Awaitable[HandlerResult]]:
            if etype in self._handlers:
                raise ValueError(f"participant {self.name!r} already handles {etype}")
            if not asyncio.iscoroutinefunction(func):
                raise TypeError(f"handler {func.__qualname__} must be an async function")
            self._handlers[etype] = HandlerSpec(
                participant=self.name,
                name=f"{self.name}.{name or func.__name__}",
                event_type=etype,
                message_class=event,
                func=func,
                emits=tuple(e if isinstance(e, str) else type_name(e) for e in emits),
                compensation=compensation,
                validate=validate,
                idempotent=idempotent,
            )
            return func

        return register

    def compensate(
        self,
        event: type[E],
        *,
        emits: Iterable[type[Message] | str] = (),
        validate: Callable[[E], None] | None = None,
        name: str | None = None,
        idempotent: bool = False,
    ) -> Callable[
        [Callable[[E, Context], Awaitable[HandlerResult]]],
        Callable[[E, Context], Awaitable[HandlerResult]],
    ]:
        """Declare a compensation handler (reacting to a failure event); ``idempotent``
        as for :meth:`on`."""
        return self.on(
            event,
            emits=emits,
            compensation=True,
            validate=validate,
            name=name,
            idempotent=idempotent,
        )

    def subjects(self) -> list[str]:
        """The subjects this participant's consumer filters on."""
        return sorted({f for t in self._handlers for f in self.stream.filters_for(t)})

    async def start(
        self,
        bus: EventBus,
        *,
        inbox: Inbox | None = None,
        after_commit: Callable[[Envelope], Awaitable[None]] | None = None,
    ) -> RunningParticipant:
        """Ensure the stream and consumer exist and start handling events."""
        await bus.ensure_stream(self.stream)
        running = RunningParticipant(self, bus, inbox or MemoryInbox(), after_commit)
        await running.consumer.start()
        return running


@dataclass
class ParticipantStats:
    """What a running participant has done."""

    handled: int = 0
    duplicates: int = 0
    ignored: int = 0
    dead_lettered: int = 0
    retries: int = 0
    emitted: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Job:
    """One admitted event of a batch, on its way through the inbox, publish and ack."""

    msg: Msg
    env: Envelope
    spec: HandlerSpec
    event: Message
    # The context the handler and the publish run in: the event's propagated
    # deadline, and with tracing its consumer span (closed by ``spans``).
    context: contextvars.Context
    spans: contextlib.ExitStack | None = None
    # With tracing, each output's producer span, in a copy of ``context`` of its own
    # (siblings under the consumer span, as separate publishes would make them).
    sends: list[tuple[contextvars.Context, contextlib.ExitStack]] = field(default_factory=list)
    outputs: list[Outbound] = field(default_factory=list)
    duplicate: bool = False

    def end_spans(self, exc: BaseException | None = None) -> None:
        """Close the event's spans, marking them failed with ``exc`` when given."""
        details = (None, None, None) if exc is None else (type(exc), exc, exc.__traceback__)
        for context, send in self.sends:
            context.run(send.__exit__, *details)
        self.sends.clear()
        if self.spans is not None:
            self.context.run(self.spans.__exit__, *details)
            self.spans = None


class RunningParticipant:
    """A participant consuming events; :meth:`stop` drains in-flight handlers.

    Events arrive in batches (those one read from the socket brought): each batch's
    handlers run through the inbox together (one transaction with
    :class:`~meshkit.saga.SqliteInbox`), then all their outputs are published before
    the first stream ack is awaited, then the inputs are acknowledged. Each event is
    still settled on its own: a failing handler, a refused publish or a bad payload
    naks or dead-letters that event only.
    """

    def __init__(
        self,
        participant: Participant,
        bus: EventBus,
        inbox: Inbox,
        after_commit: Callable[[Envelope], Awaitable[None]] | None,
    ) -> None:
        self.participant = participant
        self.bus = bus
        self.inbox = inbox
        self.stats = ParticipantStats()
        self._after_commit = after_commit
        self.consumer: PullConsumer = bus.consumer(
            participant.stream,
            participant.durable,
            filter_subjects=participant.subjects(),
            spec=participant.consumer_spec,
            batch_handler=self._handle_batch,
        )

    async def stop(self, grace: float = 10.0) -> None:
        """Stop consuming; in-flight handlers finish first (up to ``grace`` seconds)."""
        await self.consumer.stop(grace)

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        etype = event_type_of(msg.headers or {})
        # An event a hosted store appended is replayed onto its type's saga subject,
        # which this participant's filters take too, not appended to its aggregate again.
        replay = self.participant.stream.subject_for(etype) if etype else ""
        await dead_letter(
            self.bus, msg, reason=reason, consumer=self.participant.durable, replay_subject=replay
        )
        # Counted once it is in the dead-letter stream, so the count can be waited on.
        self.stats.dead_lettered += 1
        _telemetry.saga_metrics().event(self.participant.durable, etype, "dead_lettered")

    async def _admit(self, msg: Msg, tracing: bool) -> _Job | None:
        """The event's job, or None when it was settled here (ignored, dead-lettered)."""
        p = self.participant
        headers = msg.headers or {}
        try:
            env = Envelope.from_headers(headers)
        except EnvelopeError as exc:
            await self._dead_letter(msg, f"invalid envelope: {exc}")
            return None
        spec = p._handlers.get(env.event_type)
        if spec is None:
            self.stats.ignored += 1
            _telemetry.saga_metrics().event(p.durable, env.event_type, "ignored")
            log.debug("%s: ignoring event type %s (%s)", p.name, env.event_type, env.event_id)
            await msg.ack()
            return None
        try:
            event = spec.message_class.FromString(msg.data)
        except (DecodeError, ValueError) as exc:
            await self._dead_letter(msg, f"undecodable {env.event_type} payload: {exc}")
            return None
        if spec.validate is not None:
            try:
                spec.validate(event)
            except Exception as exc:
                await self._dead_letter(msg, f"{env.event_type} failed validation: {exc}")
                return None
        context = contextvars.copy_context()
        left = env.remaining_deadline()
        if left is not None:
            context.run(meshkit.deadline.set_remaining, left)
        job = _Job(msg, env, spec, event, context)
        if tracing:
            job.spans = contextlib.ExitStack()
            context.run(
                job.spans.enter_context,
                _telemetry.consumer_span(msg.subject, env, p.durable, len(msg.data), headers),
            )
        return job

    def _work(self, job: _Job) -> Callable[[Any], Awaitable[list[Outbound]]]:
        p = self.participant

        async def work(tx: Any) -> list[Outbound]:
            ctx = Context(job.env, p.name, tx, job.msg)
            result = await job.spec.func(job.event, ctx)
            produced = ctx._outputs
            if isinstance(result, Message):
                produced.append(result)
            elif result is not None:
                produced.extend(result)
            name, event_id = job.spec.name, job.env.event_id
            return [
                Outbound(type_name(o), derive_event_id(event_id, name, i), o.SerializeToString())
                for i, o in enumerate(produced)
            ]

        return work

    async def _handle_batch(self, msgs: list[Msg]) -> None:
        p = self.participant
        tracing = _telemetry.tracing()
        jobs = [job for msg in msgs if (job := await self._admit(msg, tracing)) is not None]
        if not jobs:
            return
        results = await run_many(
            self.inbox,
            [
                (f"{p.name}/{job.env.event_id}", self._work(job), job.context, job.spec.idempotent)
                for job in jobs
            ],
        )
        # Committed: from here a failure (NATS down past publish_retry) is retried like
        # a handler error; the redelivery is a duplicate that republishes the recorded
        # outputs, and at max_deliver the event is dead-lettered rather than dropped
        # with its outputs unpublished.
        committed: list[_Job] = []
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, Exception):
                await self._settle_failed(job, result)
                continue
            job.outputs, job.duplicate = result
            if self._after_commit is not None:
                try:
                    await self._after_commit(job.env)
                except Exception as exc:
                    await self._settle_failed(job, exc)
                    continue
            committed.append(job)
        failures = await self._publish(committed)
        self._count([job for job in committed if job not in failures])
        for job in committed:
            failed = failures.get(job)
            if failed is not None:
                await self._settle_failed(job, failed)
                continue
            job.end_spans()
            await job.msg.ack()

    async def _publish(self, jobs: list[_Job]) -> dict[_Job, Exception]:
        """Publish every job's outputs at once; the first error of each job that had one."""
        p = self.participant
        messages: list[tuple[str, bytes, dict[str, str]]] = []
        owners: list[_Job] = []
        for job in jobs:
            if not job.outputs:
                continue
            remaining = job.context.run(meshkit.deadline.remaining)
            deadline_ms = int(remaining * 1000) if remaining is not None else None
            for out in job.outputs:
                env = job.env.caused(
                    out.event_type, event_id=out.event_id, source=p.name, deadline_ms=deadline_ms
                )
                subject = p.stream.subject_for(out.event_type)
                if job.spans is not None:  # tracing: a producer span per output
                    context, send = job.context.copy(), contextlib.ExitStack()
                    env = context.run(
                        send.enter_context,
                        _telemetry.producer_span(subject, env, len(out.payload)),
                    )
                    job.sends.append((context, send))
                # The cause's trace context is in ``env`` already: nothing else to add.
                messages.append((subject, out.payload, env.to_headers()))
                owners.append(job)
        if not messages:
            return {}
        failures: dict[_Job, Exception] = {}
        for job, error in zip(owners, await self.bus.publish_many(messages), strict=True):
            if error is not None:
                failures.setdefault(job, error)
        return failures

    def _count(self, done: list[_Job]) -> None:
        """Stats and metrics for the batch's handled events: one metric update per
        event type and outcome, not per event."""
        stats = self.stats
        tally: dict[tuple[str, str], int] = {}
        emitted = 0
        for job in done:
            etype = job.env.event_type
            emitted += len(job.outputs)
            if job.duplicate:
                stats.duplicates += 1
            else:
                stats.handled += 1
                stats.by_type[etype] = stats.by_type.get(etype, 0) + 1
            key = (etype, "duplicate" if job.duplicate else "handled")
            tally[key] = tally.get(key, 0) + 1
        stats.emitted += emitted
        metrics = _telemetry.saga_metrics()
        durable = self.participant.durable
        if emitted:
            metrics.emit(durable, emitted)
        for (etype, outcome), n in tally.items():
            metrics.event(durable, etype, outcome, n)

    async def _settle_failed(self, job: _Job, exc: Exception) -> None:
        """Dead-letter the event (a permanent error, or its last delivery) or nak it."""
        p = self.participant
        spec, env, msg = job.spec, job.env, job.msg
        job.end_spans(exc)
        if isinstance(exc, PermanentError):
            await self._dead_letter(msg, f"{spec.name} rejected the event: {exc}")
            return
        deliveries = Context(env, p.name, None, msg).deliveries
        if deliveries >= p.consumer_spec.max_deliver:
            await self._dead_letter(
                msg, f"{spec.name} failed {deliveries} times (max_deliver); last error: {exc!r}"
            )
            return
        self.stats.retries += 1
        _telemetry.saga_metrics().event(p.durable, env.event_type, "retried")
        log.info("%s failed on %s (delivery %d): %r", spec.name, env.event_id, deliveries, exc)
        await msg.nak(delay=p.consumer_spec.nak_delay(deliveries))
