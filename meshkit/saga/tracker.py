"""The saga tracker: follows every event and keeps each saga's state in JetStream KV.

A :class:`SagaDefinition` says which event types start a saga, complete it,
signal a failure (compensation starts), compensate, and finish compensation.
:func:`advance` is the pure state machine (unit-tested without NATS);
:class:`SagaTracker` runs it over a stream with a durable consumer, stores a
``meshkit.v1.SagaStatus`` per saga in the KV bucket, and times sagas out: a
RUNNING or COMPENSATING saga whose deadline passed is marked TIMED_OUT and a
``meshkit.v1.SagaTimedOut`` event is published on the saga's stream, so the
participants that handle it start compensating.

States::

    RUNNING --completed--> COMPLETED
    RUNNING --failure--> COMPENSATING --compensated--> COMPENSATED
    RUNNING/COMPENSATING --failed event or dead letter--> FAILED
    RUNNING/COMPENSATING --deadline--> TIMED_OUT
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg

from meshkit._pb.meshkit.v1 import saga_pb2
from meshkit.saga import _telemetry, cluster
from meshkit.saga._locks import KeyedLocks
from meshkit.saga.bus import EventBus
from meshkit.saga.consumer import PullConsumer
from meshkit.saga.dlq import CONSUMER, DLQ_STREAM, REASON
from meshkit.saga.envelope import (
    SAGA_ID,
    Envelope,
    EnvelopeError,
    derive_event_id,
    now_ms,
    type_name,
)
from meshkit.saga.streams import ConsumerSpec, StreamSpec

__all__ = [
    "FINAL_STATES",
    "SagaDefinition",
    "SagaState",
    "SagaStore",
    "SagaTracker",
    "advance",
    "state_name",
]

log = logging.getLogger("meshkit.saga.tracker")

SagaState = saga_pb2.SagaState
RUNNING = saga_pb2.SAGA_STATE_RUNNING
COMPLETED = saga_pb2.SAGA_STATE_COMPLETED
COMPENSATING = saga_pb2.SAGA_STATE_COMPENSATING
COMPENSATED = saga_pb2.SAGA_STATE_COMPENSATED
FAILED = saga_pb2.SAGA_STATE_FAILED
TIMED_OUT = saga_pb2.SAGA_STATE_TIMED_OUT
UNSPECIFIED = saga_pb2.SAGA_STATE_UNSPECIFIED

FINAL_STATES = frozenset({COMPLETED, COMPENSATED, FAILED, TIMED_OUT})
TIMED_OUT_TYPE = type_name(saga_pb2.SagaTimedOut)
DEAD_LETTER_TYPE = "meshkit.v1.DeadLetter"


def state_name(state: int) -> str:
    """``RUNNING`` for ``SAGA_STATE_RUNNING``."""
    return str(saga_pb2.SagaState.Name(state)).removeprefix("SAGA_STATE_")


def _names(types: Iterable[Any]) -> frozenset[str]:
    return frozenset(t if isinstance(t, str) else type_name(t) for t in types)


@dataclass(frozen=True)
class SagaDefinition:
    """Which event types move a saga between states (types or their full names)."""

    name: str
    start: frozenset[str]
    completed: frozenset[str]
    failures: frozenset[str] = frozenset()
    compensations: frozenset[str] = frozenset()
    compensated: frozenset[str] = frozenset()
    failed: frozenset[str] = frozenset()
    timeout: float | None = None

    @classmethod
    def of(
        cls,
        name: str,
        *,
        start: Iterable[Any],
        completed: Iterable[Any],
        failures: Iterable[Any] = (),
        compensations: Iterable[Any] = (),
        compensated: Iterable[Any] = (),
        failed: Iterable[Any] = (),
        timeout: float | None = None,
    ) -> SagaDefinition:
        """Build a definition from message classes (or full names)."""
        return cls(
            name,
            _names(start),
            _names(completed),
            _names(failures),
            _names(compensations),
            _names(compensated),
            _names(failed),
            timeout,
        )

    def is_compensation(self, event_type: str) -> bool:
        return event_type in self.compensations or event_type in self.compensated


def advance(status: Any, env: Envelope, definition: SagaDefinition, *, reason: str = "") -> bool:
    """Apply one event to ``status`` (a ``SagaStatus``, modified in place).

    Returns False when the event was already recorded (redelivery), True otherwise.
    """
    if any(step.event_id == env.event_id for step in status.steps):
        return False
    at_ms = env.timestamp_ms or now_ms()
    etype = env.event_type
    step = status.steps.add(
        event_id=env.event_id,
        event_type=etype,
        source=env.source,
        causation_id=env.causation_id,
        compensation=definition.is_compensation(etype),
    )
    step.at.FromMilliseconds(at_ms)
    if not status.saga_id:
        status.saga_id = env.saga_id
    if not status.saga_type:
        status.saga_type = env.saga_type or definition.name
    if status.state == UNSPECIFIED:
        status.state = RUNNING
        status.started_at.FromMilliseconds(at_ms)
    elif at_ms < status.started_at.ToMilliseconds():
        status.started_at.FromMilliseconds(at_ms)
    if env.saga_deadline_ms and not status.HasField("deadline"):
        status.deadline.FromMilliseconds(env.saga_deadline_ms)
    status.updated_at.FromMilliseconds(max(at_ms, status.updated_at.ToMilliseconds()))

    state = status.state
    if etype == TIMED_OUT_TYPE:
        if state not in FINAL_STATES:
            status.state = TIMED_OUT
            status.reason = status.reason or "saga deadline passed"
    elif etype == DEAD_LETTER_TYPE or etype in definition.failed:
        if state not in FINAL_STATES:
            status.state = FAILED
            status.reason = reason or f"{etype}"
    elif etype in definition.completed:
        if state == RUNNING:
            status.state = COMPLETED
    elif etype in definition.failures:
        if state == RUNNING:
            status.state = COMPENSATING
            status.reason = reason or etype.rsplit(".", 1)[-1]
    elif etype in definition.compensated and state in (RUNNING, COMPENSATING):
        status.state = COMPENSATED
    return True


class SagaStore:
    """Read access to the sagas' KV bucket (the CLI and tests use it)."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    @classmethod
    async def open(
        cls, bus: EventBus, bucket: str = "meshkit_sagas", *, replicas: int | None = None
    ) -> SagaStore:
        """The bucket, created when missing (``replicas`` None: ``MESHKIT_NATS_REPLICAS``)."""
        return cls(await bus.key_value(bucket, replicas=replicas))

    async def get(self, saga_id: str) -> Any | None:
        """The saga's ``SagaStatus``, or None.

        Rides out a cluster election of the bucket's leader (503s, timeouts) within
        :func:`meshkit.saga.cluster.retry_window`, then raises
        :class:`~meshkit.saga.cluster.JetStreamUnavailable`.
        """
        try:
            entry = await cluster.retrying(
                f"reading saga {saga_id} from KV", lambda: self.kv.get(saga_id)
            )
        except nats.js.errors.KeyNotFoundError:
            return None
        status = saga_pb2.SagaStatus()
        status.ParseFromString(entry.value or b"")
        return status

    async def list(self) -> list[Any]:
        """Every saga's status, oldest first."""
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        found = await asyncio.gather(*(self.get(k) for k in keys))
        out = [s for s in found if s is not None]
        out.sort(key=lambda s: (s.started_at.ToMilliseconds(), s.saga_id))
        return out

    async def watch(self) -> AsyncIterator[Any]:
        """Yield every saga status as it changes (current values first)."""
        watcher = await self.kv.watchall()
        try:
            async for entry in watcher:
                if entry is None or entry.value is None:
                    continue
                status = saga_pb2.SagaStatus()
                status.ParseFromString(entry.value)
                yield status
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def wait(self, saga_id: str, *, within: float, final: bool = True) -> Any | None:
        """Poll until the saga exists (and is final, with ``final``) for up to ``within`` s."""
        end = time.monotonic() + within
        while True:
            status = await self.get(saga_id)
            if status is not None and (not final or status.state in FINAL_STATES):
                return status
            if time.monotonic() >= end:
                return status
            await asyncio.sleep(0.05)


class SagaTracker:
    """Follows a stream's events (and the dead letters) and keeps saga state in KV."""

    def __init__(
        self,
        bus: EventBus,
        stream: StreamSpec,
        definition: SagaDefinition,
        *,
        bucket: str = "meshkit_sagas",
        durable: str | None = None,
        sweep_interval: float = 0.25,
        consumer: ConsumerSpec | None = None,
    ) -> None:
        self.bus = bus
        self.stream = stream
        self.definition = definition
        self.bucket = bucket
        self.durable = durable or f"{stream.name}-meshkit-tracker"
        self.sweep_interval = sweep_interval
        # Applying an event fails only while KV is unreachable: keep retrying rather
        # than let max_deliver drop the event and freeze its saga's state.
        self.consumer_spec = consumer or ConsumerSpec(max_in_flight=256, max_deliver=10_000)
        self.store: SagaStore | None = None
        self._locks = KeyedLocks()
        self._deadlines: dict[str, int] = {}
        self._timed_out: set[str] = set()
        self._consumers: list[PullConsumer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.updates = 0

    async def start(self) -> SagaTracker:
        await self.bus.ensure_stream(self.stream)
        await self.bus.ensure_stream(DLQ_STREAM)
        self.store = await SagaStore.open(self.bus, self.bucket)
        for status in await self.store.list():
            if status.state not in FINAL_STATES and status.HasField("deadline"):
                self._deadlines[status.saga_id] = status.deadline.ToMilliseconds()
        self._consumers = [
            self.bus.consumer(
                self.stream,
                self.durable,
                self._on_event,
                filter_subjects=list(self.stream.event_subjects),
                spec=self.consumer_spec,
            ),
            self.bus.consumer(
                DLQ_STREAM,
                f"{self.durable}-dlq",
                self._on_dead_letter,
                filter_subjects=[f"{DLQ_STREAM.prefix}.{self.stream.name}.>"],
                spec=self.consumer_spec,
            ),
        ]
        for c in self._consumers:
            await c.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="meshkit-saga-timeouts")
        return self

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for c in self._consumers:
            await c.stop()

    async def wait_caught_up(self, *, within: float) -> bool:
        """Wait until every event on the stream (and dead letter) has been applied."""
        end = time.monotonic() + within
        while True:
            behind = 0
            for c in self._consumers:
                info = await self.bus.js.consumer_info(c.stream, c.durable)
                behind += info.num_pending + info.num_ack_pending
            if behind == 0:
                return True
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.05)

    async def _on_event(self, msg: Msg) -> None:
        try:
            env = Envelope.from_headers(msg.headers)
        except EnvelopeError:
            await msg.ack()  # participants dead-letter it; nothing to track
            return
        if not env.saga_id:
            await msg.ack()
            return
        await self._apply(env, "")
        await msg.ack()

    async def _on_dead_letter(self, msg: Msg) -> None:
        headers = msg.headers or {}
        saga_id = headers.get(SAGA_ID, "")
        if saga_id:
            env = Envelope(
                event_id=f"dlq-{msg.metadata.sequence.stream}",
                event_type=DEAD_LETTER_TYPE,
                saga_id=saga_id,
                timestamp_ms=now_ms(),
                source=headers.get(CONSUMER, ""),
            )
            await self._apply(env, f"dead-lettered: {headers.get(REASON, '')}")
        await msg.ack()

    async def _apply(self, env: Envelope, reason: str) -> None:
        assert self.store is not None
        async with self._locks.hold(env.saga_id):
            for _ in range(10):
                try:
                    entry = await self.store.kv.get(env.saga_id)
                    revision = entry.revision
                    status = saga_pb2.SagaStatus()
                    status.ParseFromString(entry.value or b"")
                except nats.js.errors.KeyNotFoundError:
                    revision = None
                    status = saga_pb2.SagaStatus()
                before = status.state
                if not advance(status, env, self.definition, reason=reason):
                    return
                if (
                    not status.HasField("deadline")
                    and self.definition.timeout is not None
                    and status.state == RUNNING
                ):
                    status.deadline.FromMilliseconds(
                        status.started_at.ToMilliseconds() + int(self.definition.timeout * 1000)
                    )
                try:
                    if revision is None:
                        await self.store.kv.create(env.saga_id, status.SerializeToString())
                    else:
                        await self.store.kv.update(
                            env.saga_id, status.SerializeToString(), last=revision
                        )
                except (
                    nats.js.errors.KeyWrongLastSequenceError,
                    nats.js.errors.BadRequestError,
                ):
                    continue  # another tracker wrote first: reload and re-apply
                self.updates += 1
                if status.state != before:
                    _telemetry.saga_metrics().transition(status.saga_type, state_name(status.state))
                if status.state in FINAL_STATES:
                    self._deadlines.pop(env.saga_id, None)
                    self._timed_out.discard(env.saga_id)
                elif status.HasField("deadline"):
                    self._deadlines[env.saga_id] = status.deadline.ToMilliseconds()
                return
            raise RuntimeError(f"saga {env.saga_id}: too many concurrent updates")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            now = now_ms()
            expired = [
                s for s, d in self._deadlines.items() if d <= now and s not in self._timed_out
            ]
            for saga_id in expired:
                try:
                    await self.time_out(saga_id)
                except Exception as exc:
                    log.warning("could not time out saga %s: %r", saga_id, exc)

    async def time_out(self, saga_id: str) -> None:
        """Publish the saga's ``SagaTimedOut`` event (once: its id is derived from the saga id)."""
        assert self.store is not None
        status = await self.store.get(saga_id)
        if status is None or status.state in FINAL_STATES:
            self._deadlines.pop(saga_id, None)
            return
        last = status.steps[-1].event_type if status.steps else ""
        event = saga_pb2.SagaTimedOut(saga_id=saga_id, last_event_type=last)
        env = Envelope(
            event_id=derive_event_id(saga_id, "meshkit.tracker.timeout", 0),
            event_type=TIMED_OUT_TYPE,
            saga_id=saga_id,
            causation_id=status.steps[-1].event_id if status.steps else "",
            timestamp_ms=now_ms(),
            source="meshkit-tracker",
            saga_type=status.saga_type,
        )
        await self.bus.publish(self.stream, event, env)
        self._timed_out.add(saga_id)
        log.info("saga %s timed out after %s", saga_id, last or "no events")
