"""The event store: aggregates that are their events, on JetStream.

Every event sits on ``<prefix>.<aggregate type>.<id>.<event type>`` in one
stream, so one aggregate is the filter ``<prefix>.<aggregate type>.<id>.>``.
Appending sets ``Nats-Expected-Last-Subject-Sequence`` to the stream sequence of
the aggregate's last event as the writer saw it, checked against that filter
(``Nats-Expected-Last-Subject-Sequence-Subject``, nats-server >= 2.11), so of two
writers racing on one aggregate the server lets exactly one win; the other gets
an :class:`AggregateConflict` (a :class:`~meshkit.errors.ConcurrencyError`)
naming the aggregate, the version it expected and the version it found.

The event type in the subject lets consumers take only the types they handle,
and lets the server copy chosen types into a saga stream
(:class:`~meshkit.saga.EventStoreSource`): the store is then its own outbox,
with no relay.

Several events appended together are one atomic batch (ADR-50 headers
``Nats-Batch-Id``/``Nats-Batch-Sequence``/``Nats-Batch-Commit``, nats-server >=
2.12 with ``allow_atomic`` on the stream): all are stored or none. On an older
server the store falls back to one publish per event, each checked against the
previous one's sequence; no other writer can interleave, but a crash half way
leaves a prefix of the events stored (see docs/event-sourcing.md).

Loading reads only the aggregate's subjects with JetStream's batched direct get
(``next_by_subj``), starting after the snapshot when there is one, so its cost
is the number of events since the snapshot. Events are protobuf messages; their
metadata travels in the same headers as every saga event
(:class:`~meshkit.saga.envelope.Envelope`) plus the aggregate headers below.

::

    store = EventStore(nc, EventStoreConfig(stream="ORDERS", prefix="orders"))
    await store.ensure()
    orders = Repository(store, "order", Order, snapshots=SnapshotStore(nc), snapshot_every=100,
                        codec=ORDER_CODEC)
    loaded = await orders.execute("o-1", lambda order: order.place(...))
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import functools
import inspect
import json
import logging
import random
import re
import typing
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.js import api

from meshkit.errors import ConcurrencyError, ConfigError, MeshkitError
from meshkit.saga import _client, _telemetry, cluster
from meshkit.saga._locks import KeyedLocks
from meshkit.saga.envelope import Envelope, new_event_id, now_ms, type_name

__all__ = [
    "AGGREGATE_ID",
    "AGGREGATE_TYPE",
    "AGGREGATE_VERSION",
    "SCHEMA_VERSION",
    "AggregateConflict",
    "AppendResult",
    "Appliers",
    "EventStore",
    "EventStoreConfig",
    "EventStoreError",
    "EventStoreUnavailable",
    "Loaded",
    "Repository",
    "StoredEvent",
    "Upcasters",
    "Version",
]

log = logging.getLogger("meshkit.saga.eventstore")

AGGREGATE_TYPE = "Meshkit-Aggregate-Type"
AGGREGATE_ID = "Meshkit-Aggregate-Id"
AGGREGATE_VERSION = "Meshkit-Aggregate-Version"
SCHEMA_VERSION = "Meshkit-Schema-Version"

_BATCH_ID = "Nats-Batch-Id"
_BATCH_SEQ = "Nats-Batch-Sequence"
_BATCH_COMMIT = "Nats-Batch-Commit"
_EXPECTED_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_EXPECTED_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
_WRONG_LAST_SEQUENCE = 10071
# On a replicated stream the leader refuses an expected-sequence publish while another
# write to the same subjects is still being replicated (JSStreamWrongLastSequenceConstantErr):
# the outcome of that write decides ours, so wait for it and send again.
_WRONG_LAST_SEQUENCE_IN_FLIGHT = 10164
# How long an append waits for another writer's in-flight write before calling it a
# lost race (AggregateConflict); a replicated write takes milliseconds.
_IN_FLIGHT_WAIT = 2.0
_BATCH_DUPLICATE_ID = 10201
# nats-server's default limit on the messages of one atomic batch.
MAX_BATCH = 1000

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_ID = re.compile(r"^[A-Za-z0-9_=-]+$")

A = TypeVar("A")
T = TypeVar("T")


class EventStoreError(MeshkitError):
    """The event store could not read or write (the message says what and where)."""

    code = "INTERNAL"


class EventStoreUnavailable(EventStoreError):
    """JetStream did not answer (no responders, no answer in time, 503): a leader
    election, a restarting server, or no stream for the subjects. Appends and reads
    retry it within :func:`meshkit.saga.cluster.retry_window` before raising it."""

    code = "UNAVAILABLE"


_UNAVAILABLE: tuple[type[BaseException], ...] = (EventStoreUnavailable, *cluster.TRANSIENT)


async def _riding(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` retried through elections (:func:`meshkit.saga.cluster.retrying`);
    an :class:`EventStoreUnavailable` saying what failed and for how long after that."""
    try:
        return await cluster.retrying(what, call, transient=_UNAVAILABLE)
    except cluster.JetStreamUnavailable as exc:
        raise EventStoreUnavailable(str(exc)) from exc.__cause__


class AggregateConflict(ConcurrencyError):
    """Another writer appended to the aggregate first; reload and retry."""

    def __init__(self, aggregate: str, expected: int, actual: int) -> None:
        super().__init__(
            f"aggregate {aggregate}: expected version {expected}, found version {actual}"
        )
        self.aggregate = aggregate
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """An aggregate's version: how many events it has, and the stream sequence of the last.

    ``Version(0, 0)`` is an aggregate with no events yet.
    """

    number: int = 0
    seq: int = 0


@dataclass(frozen=True)
class EventStoreConfig:
    """Where the events live.

    ``prefix``: subjects are ``<prefix>.<aggregate type>.<id>.<event type>`` (default:
    the stream name in lower case). ``atomic``: use atomic batch publish when the server has
    it. ``schema_versions``: the current schema version of each event type (full
    protobuf name), written into every event; 1 when not listed. ``replicas``: the
    stream's; None takes ``MESHKIT_NATS_REPLICAS`` (:mod:`meshkit.saga.cluster`)
    when the store is ensured.
    """

    stream: str = "EVENTS"
    prefix: str = ""
    storage: Literal["file", "memory"] = "file"
    duplicate_window: float = 120.0
    replicas: int | None = None
    atomic: bool = True
    timeout: float = 5.0
    read_batch: int = 1000
    schema_versions: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.stream):
            raise ConfigError("eventstore.stream", f"{self.stream!r} must match [A-Za-z0-9_-]+")
        if self.prefix and not _TOKEN.match(self.prefix):
            raise ConfigError(
                "eventstore.prefix", f"{self.prefix!r} must be dot-separated tokens, no wildcards"
            )
        if not self.duplicate_window > 0:
            raise ConfigError("eventstore.duplicate_window", "must be > 0 seconds")
        cluster.check_replicas(self.replicas, "eventstore.replicas")
        if not 1 <= self.read_batch <= 10_000:
            raise ConfigError("eventstore.read_batch", f"{self.read_batch!r}: expected 1..10000")

    @property
    def subject_prefix(self) -> str:
        return self.prefix or self.stream.lower()


@dataclass(frozen=True)
class StoredEvent:
    """One event as stored: payload bytes plus where and when it sits."""

    aggregate_type: str
    aggregate_id: str
    version: int
    seq: int
    event_type: str
    schema_version: int
    data: bytes
    envelope: Envelope
    subject: str = ""
    stream: str = ""

    @property
    def event_id(self) -> str:
        return self.envelope.event_id

    def version_at(self) -> Version:
        """The aggregate's version right after this event."""
        return Version(self.version, self.seq)

    @property
    def timestamp_ms(self) -> int:
        return self.envelope.timestamp_ms

    def decode(self, message_type: type[Message]) -> Message:
        """The payload parsed as ``message_type``."""
        msg = message_type()
        msg.ParseFromString(self.data)
        return msg

    @classmethod
    def from_msg(
        cls,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None,
        seq: int,
        stream: str,
        prefix: str = "",
    ) -> StoredEvent:
        """A stored message as an event. For a message without aggregate headers the
        aggregate comes from its subject; ``prefix`` (the store's subject prefix)
        says where in the subject it starts."""
        h = headers or {}
        # Server and publish-control headers (sequence, expected sequence, batch ids)
        # describe the stored copy, not the event: keep them out of the envelope so
        # a republished event does not carry them.
        env = Envelope.from_headers(
            {k: v for k, v in h.items() if not str(k).startswith("Nats-") or k == "Nats-Msg-Id"}
        )
        agg_type = h.get(AGGREGATE_TYPE, "")
        agg_id = h.get(AGGREGATE_ID, "")
        if not agg_type or not agg_id:
            # Events published by something else on an aggregate's subjects:
            # <prefix>.<aggregate type>.<id>.<event type>.
            if prefix and subject.startswith(prefix + "."):
                parts = subject[len(prefix) + 1 :].split(".")
            else:
                head = subject.removesuffix("." + env.event_type) if env.event_type else subject
                parts = head.split(".")[-2:]
            agg_type, agg_id = (parts[0], parts[1]) if len(parts) >= 2 else ("", subject)
        return cls(
            aggregate_type=agg_type,
            aggregate_id=agg_id,
            version=_int_header(h, AGGREGATE_VERSION, 0),
            seq=seq,
            event_type=env.event_type,
            schema_version=_int_header(h, SCHEMA_VERSION, 1),
            data=data,
            envelope=env,
            subject=subject,
            stream=stream,
        )


def _int_header(h: Mapping[str, str], name: str, default: int) -> int:
    raw = h.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise EventStoreError(f"header {name}: expected an integer, got {raw!r}") from None


@dataclass(frozen=True)
class AppendResult:
    """What an append stored: the version right after its events, and the events."""

    version: Version
    events: tuple[StoredEvent, ...]
    atomic: bool
    #: True when every event was already stored (a retried append whose first try
    #: was stored): ``version`` and ``events`` are then what that first try stored,
    #: and nothing new was written.
    duplicate: bool = False


class EventStore:
    """Append to and read from per-aggregate subjects of one JetStream stream."""

    # The per-aggregate check needs Nats-Expected-Last-Subject-Sequence-Subject.
    MIN_SERVER = (2, 11)

    def __init__(
        self, nc: NATS, config: EventStoreConfig | None = None, *, source: str = ""
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=(config or EventStoreConfig()).timeout)
        self.config = config or EventStoreConfig()
        self.source = source
        self._atomic: bool | None = None
        self._server_checked = False
        self._append_listeners: list[Callable[[Sequence[StoredEvent]], None]] = []

    def on_append(self, listener: Callable[[Sequence[StoredEvent]], None]) -> Callable[[], None]:
        """Call ``listener`` with the events of every append; returns its remover.

        Listeners run synchronously, in append order, once the server has stored
        the events (a relay in the same process takes them from here instead of
        reading them back: :meth:`~meshkit.saga.projections.Projector.offer`).
        """
        self._append_listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._append_listeners.remove(listener)

        return remove

    def _appended(self, result: AppendResult) -> AppendResult:
        for listener in self._append_listeners:
            try:
                listener(result.events)
            except Exception:  # a listener must not turn a stored append into an error
                log.exception("append listener %r failed", listener)
        return result

    # -- stream -----------------------------------------------------------

    @property
    def stream(self) -> str:
        return self.config.stream

    @property
    def subjects(self) -> str:
        """The filter matching every aggregate subject of this store."""
        return f"{self.config.subject_prefix}.>"

    def aggregate_name(self, aggregate_type: str, aggregate_id: str) -> str:
        """``<prefix>.<aggregate type>.<id>``; raises ValueError naming a bad type or id."""
        if not _NAME.match(aggregate_type):
            raise ValueError(f"aggregate type {aggregate_type!r} must match [A-Za-z0-9_-]+")
        if not _ID.match(aggregate_id):
            raise ValueError(f"aggregate id {aggregate_id!r} must match [A-Za-z0-9_=-]+")
        return f"{self.config.subject_prefix}.{aggregate_type}.{aggregate_id}"

    def aggregate_filter(self, aggregate_type: str, aggregate_id: str) -> str:
        """The subject filter matching every event of one aggregate."""
        return self.aggregate_name(aggregate_type, aggregate_id) + ".>"

    def event_subject(self, aggregate_type: str, aggregate_id: str, event_type: str) -> str:
        """The subject one event of the aggregate is stored on."""
        if not _TOKEN.match(event_type):
            raise ValueError(f"event type {event_type!r} must be dot-separated subject tokens")
        return f"{self.aggregate_name(aggregate_type, aggregate_id)}.{event_type}"

    async def aggregate_ids(self, aggregate_type: str) -> list[str]:
        """The ids of every aggregate of this type with at least one event, sorted."""
        if not _NAME.match(aggregate_type):
            raise ValueError(f"aggregate type {aggregate_type!r} must match [A-Za-z0-9_-]+")
        head = f"{self.config.subject_prefix}.{aggregate_type}."
        subjects = await self._subjects(head + "*.>")
        return sorted({s[len(head) :].split(".", 1)[0] for s in subjects})

    async def _subjects(self, subjects_filter: str) -> dict[str, int]:
        """The stream's subjects matching ``subjects_filter``, with their message counts.

        Read page by page: the server answers at most 100,000 subjects at a time.
        """
        out: dict[str, int] = {}
        while True:
            request = {"subjects_filter": subjects_filter, "offset": len(out)}
            msg = await _client.replies(self.nc).request(
                f"$JS.API.STREAM.INFO.{self.stream}",
                json.dumps(request).encode(),
                None,
                self.config.timeout,
            )
            resp = json.loads(msg.data)
            if "error" in resp:
                raise nats.js.errors.APIError.from_error(resp["error"])
            page = (resp.get("state") or {}).get("subjects") or {}
            out.update(page)
            if not page or len(out) >= int(resp.get("total", 0) or 0):
                return out

    def _check_server(self) -> None:
        if self._server_checked:
            return
        version = _server_version(self.nc)
        if version < self.MIN_SERVER:
            raise EventStoreError(
                f"nats-server {'.'.join(map(str, version))} is too old for the event store: "
                "its per-aggregate version check needs "
                "Nats-Expected-Last-Subject-Sequence-Subject (nats-server >= 2.11)"
            )
        self._server_checked = True

    async def ensure(self) -> None:
        """Create or update the stream (direct get, and atomic batches when available).

        Raises :class:`EventStoreError` when the stream holds events in the layout
        before the event type joined the subjects (``<prefix>.<type>.<id>``): the
        store would not see them. :meth:`upgrade_layout` moves them.
        """
        self._check_server()
        atomic = self.config.atomic and _server_supports_atomic(self.nc)
        cfg = self.config
        subjects = [self.subjects]
        info = await cluster.stream_info_or_none(self.js, cfg.stream)
        if info is None:
            stream_cfg = api.StreamConfig(
                name=cfg.stream,
                subjects=subjects,
                storage=api.StorageType(cfg.storage),
                duplicate_window=cfg.duplicate_window,
                num_replicas=cluster.replicas(cfg.replicas),
                allow_direct=True,
                allow_atomic=True if atomic else None,
            )
            if await cluster.add_stream(self.js, stream_cfg):
                log.info(
                    "created event stream %s (%s, replicas %d)",
                    cfg.stream,
                    subjects[0],
                    stream_cfg.num_replicas,
                )
            else:  # created by another process since our lookup
                info = await cluster.stream_info_existing(self.js, cfg.stream)
        if info is not None:
            await self._update(info.config, atomic)
        self._atomic = atomic
        # The stream exists now; just created on a cluster, its group may have no
        # leader yet and info answers "not found" for a moment.
        old = await cluster.retrying(
            f"looking up the subjects of stream {cfg.stream}",
            lambda: self._subjects(f"{self.config.subject_prefix}.*.*"),
            transient=cluster.JUST_CREATED,
        )
        if old:
            raise EventStoreError(
                f"stream {cfg.stream} holds {sum(old.values())} events of {len(old)} "
                f"aggregates on <prefix>.<aggregate type>.<id> subjects (e.g. {min(old)}), "
                "the layout before the event type joined the subject; the store cannot see "
                "them: move them with `await EventStore(nc, config).upgrade_layout()`"
            )

    async def upgrade_layout(self) -> int:
        """Move events stored on ``<prefix>.<type>.<id>`` onto typed subjects.

        Each aggregate's events are republished in order onto
        ``<prefix>.<type>.<id>.<event type>`` with their meshkit headers (the event
        id stays in ``Meshkit-Event-Id``; ``Nats-Msg-Id`` is left off, or JetStream
        would take each copy for its original), each expecting the aggregate's
        previous one; then the old subjects are purged. A second run, after a crash
        half way, skips what an aggregate already has. Returns how many events
        moved. Run it once, with no other writer on the stream.
        """
        self._check_server()
        old_filter = f"{self.config.subject_prefix}.*.*"
        moved = 0
        # Per aggregate: the seq of its last event on typed subjects, and how many of
        # its old events are still to skip (moved by an earlier run).
        last: dict[str, int] = {}
        skip: dict[str, int] = {}
        reader = read_batches(
            self.nc, self.stream, old_filter, 1, self.config.read_batch, self.config.timeout
        )
        async with contextlib.aclosing(reader):
            async for chunk in reader:
                for m in chunk:
                    etype = str(m.headers.get("Meshkit-Event-Type", ""))
                    if not _TOKEN.match(etype):
                        raise EventStoreError(
                            f"{m.subject} seq {m.seq}: no usable Meshkit-Event-Type header "
                            f"({etype!r}); cannot place it on a typed subject"
                        )
                    agg = m.subject + ".>"
                    if agg not in last:
                        last[agg] = (await self._last_seq(agg)) or 0
                        skip[agg] = sum((await self._subjects(agg)).values()) if last[agg] else 0
                    if skip[agg]:
                        skip[agg] -= 1
                        continue
                    headers = {k: v for k, v in m.headers.items() if not str(k).startswith("Nats-")}
                    headers[_EXPECTED_SUBJECT_SEQ] = str(last[agg])
                    headers[_EXPECTED_SUBJECT_SEQ_SUBJECT] = agg
                    ack = await self._request(f"{m.subject}.{etype}", m.data, headers)
                    last[agg] = _ack_seq(ack)
                    moved += 1
        if last:
            await self.js.purge_stream(self.stream, subject=old_filter)
        return moved

    async def _update(self, current: api.StreamConfig, atomic: bool) -> None:
        subjects = list(current.subjects or [])
        have = current.num_replicas or 1
        raised = cluster.replicas_target(
            f"event stream {self.config.stream}", have, self.config.replicas
        )
        changed = raised is not None
        if self.subjects not in subjects:
            subjects.append(self.subjects)
            changed = True
        if not current.allow_direct:
            changed = True
        if atomic and not current.allow_atomic:
            changed = True
        if changed:
            await cluster.update_stream(
                self.js,
                replace(
                    current,
                    subjects=subjects,
                    allow_direct=True,
                    allow_atomic=True if atomic else current.allow_atomic,
                    num_replicas=raised or have,
                ),
                f"updated event stream {self.config.stream}",
            )

    async def _uses_atomic(self) -> bool:
        if self._atomic is None:
            info = await self.js.stream_info(self.config.stream)
            self._atomic = bool(info.config.allow_atomic) and self.config.atomic
        return self._atomic

    # -- append -----------------------------------------------------------

    async def append(
        self,
        aggregate_type: str,
        aggregate_id: str,
        events: Sequence[Message],
        *,
        expected: Version | int | None,
        event_ids: Sequence[str] | None = None,
        saga_id: str = "",
        saga_type: str = "",
        causation_id: str = "",
        timestamp_ms: int | None = None,
        only_new: bool = False,
        saga_deadline_ms: int | None = None,
    ) -> AppendResult:
        """Append ``events`` to one aggregate, all or nothing.

        ``expected`` is the version the caller decided on: a :class:`Version`
        from a load (no extra round trip), a bare event count (the store looks up
        its sequence first), or None to append at whatever the version is (read,
        then checked like the others, and retried when another writer got there first,
        so version numbers never collide).
        Raises :class:`AggregateConflict` when the aggregate moved on.
        ``event_ids`` (deterministic ids, one per event) make a retried append
        idempotent: when the check fails because exactly these events are already
        there, the append returns them instead of a conflict. ``only_new`` (with
        ``expected=Version()``): the aggregate must have no events at all, a
        retry of this very append included; anything else is a conflict.
        ``saga_deadline_ms``: the saga's deadline (epoch ms) in the events' headers.

        With an OpenTelemetry SDK the append is a PRODUCER span, whose context the
        events carry; without one they carry the caller's trace context. Raises
        :class:`EventStoreError` on a nats-server older than 2.11 (see ``MIN_SERVER``).
        """
        self._check_server()
        name = self.aggregate_name(aggregate_type, aggregate_id)
        if not events:
            raise ValueError("append needs at least one event")
        if len(events) > MAX_BATCH:
            raise ValueError(f"{len(events)} events in one append; the limit is {MAX_BATCH}")
        if event_ids is not None and len(event_ids) != len(events):
            raise ValueError(f"{len(event_ids)} event ids for {len(events)} events")
        ids = list(event_ids) if event_ids is not None else [new_event_id() for _ in events]
        payloads = [event.SerializeToString() for event in events]
        # Each type once: the name is checked above, only the event types here.
        types = [type_name(event) for event in events]
        for etype in set(types):
            if not _TOKEN.match(etype):
                raise ValueError(f"event type {etype!r} must be dot-separated subject tokens")
        subjects = [f"{name}.{etype}" for etype in types]
        if _telemetry.tracing():
            template = f"{self.config.subject_prefix}.{aggregate_type}.{{id}}." + (
                types[0] if len(set(types)) == 1 else ">"
            )
            probe = Envelope(event_id=ids[0], event_type=types[0], saga_id=saga_id)
            span: Any = _telemetry.producer_span(
                subjects[0], probe, sum(map(len, payloads)), template=template, count=len(events)
            )
        else:
            span = contextlib.nullcontext(None)
        with span as traced:
            trace = (
                (traced.traceparent, traced.tracestate) if traced is not None else _current_trace()
            )
            atomic = len(events) > 1 and await self._uses_atomic()
            meta: dict[str, Any] = {
                "saga_id": saga_id,
                "saga_type": saga_type,
                "causation_id": causation_id,
                "timestamp_ms": timestamp_ms,
                "saga_deadline_ms": saga_deadline_ms,
            }
            # With expected=None the append still checks against the version it just
            # read (so version headers never collide) and retries when someone else won.
            attempts = 50 if expected is None else 1
            for attempt in range(attempts):
                if isinstance(expected, Version):
                    current = expected
                else:
                    current = await self._deciding_version(aggregate_type, aggregate_id)
                    if expected is not None and current.number != expected:
                        if event_ids is not None and current.number > expected:
                            # A retry of an append that was stored: the events
                            # after `expected` are ours.
                            at = await self._seq_of_version(
                                aggregate_type, aggregate_id, expected + 1, current
                            )
                            done = await self._resume(
                                at, aggregate_type, aggregate_id, events, ids, atomic, **meta
                            )
                            if done is not None:
                                return done
                        raise AggregateConflict(name, expected, current.number)
                envs = [
                    self._envelope(
                        types[i],
                        ids[i],
                        current.number + i + 1,
                        aggregate_type,
                        aggregate_id,
                        saga_id=saga_id,
                        saga_type=saga_type,
                        causation_id=causation_id,
                        timestamp_ms=timestamp_ms,
                        saga_deadline_ms=saga_deadline_ms,
                        trace=trace,
                    )
                    for i in range(len(events))
                ]
                headers = [e.to_headers() for e in envs]
                self._check_sizes(name, subjects, payloads, headers, types)
                try:
                    # Resent as it was while the cluster elects a leader: the same
                    # Nats-Msg-Id, so one that was stored but not acknowledged is
                    # acknowledged as a duplicate and not stored again.
                    seqs = await _riding(
                        f"append to {name}",
                        functools.partial(
                            self._store,
                            atomic,
                            name,
                            subjects,
                            payloads,
                            headers,
                            current,
                            only_new,
                        ),
                    )
                    break
                except _Duplicate as dup:
                    # The server already has our first event (a retry, or a resend
                    # after a lost answer): answer with what is stored, not with
                    # versions counted from `current`.
                    if dup.index:
                        raise EventStoreError(
                            f"append to {name}: event id {ids[dup.index]} is already stored "
                            f"(seq {dup.seq}) but the events before it were not (event ids "
                            "reused?)"
                        ) from None
                    done = await self._resume(
                        dup.seq, aggregate_type, aggregate_id, events, ids, atomic, **meta
                    )
                    if done is None:
                        raise EventStoreError(
                            f"append to {name}: the stream has event id {ids[0]} at seq "
                            f"{dup.seq}, not as one of this aggregate's events (event ids "
                            "reused?)"
                        ) from None
                    return done
                except _DuplicateInBatch:
                    # An atomic batch is stored whole or not at all: a message id
                    # the stream has means the whole batch was stored before.
                    if only_new:
                        actual = await self._deciding_version(aggregate_type, aggregate_id)
                        raise AggregateConflict(name, 0, actual.number) from None
                    at = await self._find_id(aggregate_type, aggregate_id, ids[0], current)
                    done = await self._resume(
                        at, aggregate_type, aggregate_id, events, ids, atomic, **meta
                    )
                    if done is not None:
                        return done
                    raise EventStoreError(
                        f"append to {name}: the stream already has one of the event ids "
                        f"{ids} but not as this append's run of events (event ids reused?)"
                    ) from None
                except _WrongLastSequence:
                    if only_new:
                        actual = await self._deciding_version(aggregate_type, aggregate_id)
                        raise AggregateConflict(name, 0, actual.number) from None
                    if event_ids is not None:
                        # Our events (or the start of them) right after `current`:
                        # this append's first try was stored.
                        done = await self._resume(
                            current.seq + 1,
                            aggregate_type,
                            aggregate_id,
                            events,
                            ids,
                            atomic,
                            **meta,
                        )
                        if done is None:
                            # Or ours end at `current`: a retry decided on the state
                            # its first try returned.
                            at = await self._ending_at(aggregate_type, aggregate_id, ids, current)
                            done = await self._resume(
                                at, aggregate_type, aggregate_id, events, ids, atomic, **meta
                            )
                        if done is not None:
                            return done
                    if attempt + 1 < attempts:
                        # Writers that collided once collide again if they retry in
                        # lockstep: a short random pause spreads them out.
                        await asyncio.sleep(random.uniform(0, min(0.02, 0.001 * 2**attempt)))
                        continue
                    actual = await self._deciding_version(aggregate_type, aggregate_id)
                    raise AggregateConflict(name, current.number, actual.number) from None
            stored = tuple(
                StoredEvent(
                    aggregate_type=aggregate_type,
                    aggregate_id=aggregate_id,
                    version=current.number + i + 1,
                    seq=seqs[i],
                    event_type=envs[i].event_type,
                    schema_version=self.config.schema_versions.get(envs[i].event_type, 1),
                    data=payloads[i],
                    envelope=envs[i],
                    subject=subjects[i],
                    stream=self.stream,
                )
                for i in range(len(events))
            )
            return self._appended(
                AppendResult(Version(current.number + len(events), seqs[-1]), stored, atomic)
            )

    async def _resume(
        self,
        seq: int | None,
        aggregate_type: str,
        aggregate_id: str,
        events: Sequence[Message],
        ids: list[str],
        atomic: bool,
        **meta: Any,
    ) -> AppendResult | None:
        """The answer to an append whose first event may be stored at ``seq``.

        The aggregate's events from ``seq`` on are compared with ``ids``. All of
        them there: what was stored (a retry gets what its first try stored). A
        prefix there (a one-by-one append cut short earlier): the rest is appended
        after it, so the caller gets the whole run, each event once. None when the
        event at ``seq`` is not ours, or ``seq`` is None (none of ours was found).
        """
        if not seq:
            return None
        mine = await self._run_from(aggregate_type, aggregate_id, seq, ids)
        if not mine:
            return None
        stored = self._appended(_replayed(mine, atomic))
        if len(mine) == len(ids):
            return stored
        rest = await self.append(
            aggregate_type,
            aggregate_id,
            events[len(mine) :],
            expected=mine[-1].version_at(),
            event_ids=ids[len(mine) :],
            **meta,
        )
        return AppendResult(rest.version, (*mine, *rest.events), rest.atomic)

    async def _run_from(
        self, aggregate_type: str, aggregate_id: str, seq: int, ids: list[str]
    ) -> list[StoredEvent]:
        """The aggregate's events from stream sequence ``seq`` on, as long as their ids
        are ``ids[0]``, ``ids[1]``, ... (at most ``len(ids)`` events)."""
        subject = self.aggregate_filter(aggregate_type, aggregate_id)

        async def collect() -> list[StoredEvent]:
            out: list[StoredEvent] = []
            reader = read_batches(
                self.nc, self.stream, subject, seq, len(ids) + 1, self.config.timeout
            )
            async with contextlib.aclosing(reader):
                async for chunk in reader:
                    for m in chunk:
                        ev = StoredEvent.from_msg(
                            m.subject,
                            m.data,
                            m.headers,
                            m.seq,
                            self.stream,
                            self.config.subject_prefix,
                        )
                        if len(out) == len(ids) or ev.event_id != ids[len(out)]:
                            return out
                        out.append(ev)
            return out

        return await _riding(f"reading {subject}", collect)

    async def _seq_of_version(
        self, aggregate_type: str, aggregate_id: str, version: int, last: Version
    ) -> int:
        """The stream sequence of the aggregate's event at ``version`` (0: none);
        ``last`` is the aggregate's latest version.

        Found by bisecting the stream sequences up to ``last.seq`` with direct gets
        (each answers the aggregate's first event at or after a sequence): a few
        small reads, however long the aggregate.
        """
        subject = self.aggregate_filter(aggregate_type, aggregate_id)
        lo, hi = 1, last.seq
        while lo <= hi:
            mid = (lo + hi) // 2
            m = await _riding(
                f"reading {subject}",
                functools.partial(self._direct_get, {"seq": mid, "next_by_subj": subject}),
            )
            if m is None:
                hi = mid - 1
                continue
            at = _int_header(m.headers, AGGREGATE_VERSION, 0)
            if at > version:
                hi = mid - 1
            elif at < version:
                lo = m.seq + 1
            else:
                return m.seq
        return 0

    async def _ending_at(
        self, aggregate_type: str, aggregate_id: str, ids: list[str], at: Version
    ) -> int:
        """The stream sequence of ``ids[0]`` if the aggregate's event at ``at`` is
        ``ids[-1]`` (0 otherwise): one direct get, then a bisection for a batch."""
        if not at.seq:
            return 0
        last = await _riding(
            f"reading {self.stream} seq {at.seq}",
            functools.partial(self._direct_get, {"seq": at.seq}),
        )
        name = self.aggregate_name(aggregate_type, aggregate_id)
        if (
            last is None
            or not last.subject.startswith(name + ".")
            or last.headers.get("Nats-Msg-Id") != ids[-1]
        ):
            return 0
        if len(ids) == 1:
            return last.seq
        first = _int_header(last.headers, AGGREGATE_VERSION, 0) - len(ids) + 1
        return await self._seq_of_version(aggregate_type, aggregate_id, first, at)

    async def _find_id(
        self, aggregate_type: str, aggregate_id: str, event_id: str, last: Version
    ) -> int:
        """The stream sequence of the aggregate's event ``event_id`` at or before
        ``last`` (0: none).

        Searched backwards from ``last.seq`` in windows growing 16-fold: a retry the
        stream deduplicates comes within its duplicate window, so near the end.
        """
        subject = self.aggregate_filter(aggregate_type, aggregate_id)
        width = 1024
        while True:
            lo = max(1, last.seq - width + 1)
            found = await _riding(
                f"reading {subject}", functools.partial(self._first_with_id, subject, lo, event_id)
            )
            if found or lo == 1:
                return found
            width *= 16

    async def _first_with_id(self, subject: str, start_seq: int, event_id: str) -> int:
        """The sequence of the first message on ``subject`` from ``start_seq`` whose
        ``Nats-Msg-Id`` is ``event_id`` (0: none)."""
        reader = read_batches(
            self.nc, self.stream, subject, start_seq, self.config.read_batch, self.config.timeout
        )
        async with contextlib.aclosing(reader):
            async for chunk in reader:
                for m in chunk:
                    if m.headers.get("Nats-Msg-Id") == event_id:
                        return m.seq
        return 0

    def _envelope(
        self,
        etype: str,
        event_id: str,
        version: int,
        aggregate_type: str,
        aggregate_id: str,
        *,
        saga_id: str,
        saga_type: str,
        causation_id: str,
        timestamp_ms: int | None,
        saga_deadline_ms: int | None,
        trace: tuple[str, str],
    ) -> Envelope:
        traceparent, tracestate = trace
        return Envelope(
            event_id=event_id,
            event_type=etype,
            saga_id=saga_id,
            causation_id=causation_id,
            timestamp_ms=now_ms() if timestamp_ms is None else timestamp_ms,
            source=self.source,
            saga_type=saga_type,
            saga_deadline_ms=saga_deadline_ms,
            traceparent=traceparent,
            tracestate=tracestate,
            extra={
                AGGREGATE_TYPE: aggregate_type,
                AGGREGATE_ID: aggregate_id,
                AGGREGATE_VERSION: str(version),
                SCHEMA_VERSION: str(self.config.schema_versions.get(etype, 1)),
            },
        )

    async def _store(
        self,
        atomic: bool,
        name: str,
        subjects: list[str],
        payloads: list[bytes],
        headers: list[dict[str, str]],
        current: Version,
        only_new: bool,
    ) -> list[int]:
        """Publish the events expecting ``current``; returns their sequences.

        While another write to the aggregate is in flight on a replicated stream the
        server refuses ours (10164) without knowing yet whether the other one will
        land: ours is sent again (same ids, so nothing is stored twice) until the
        server can say, for up to ``_IN_FLIGHT_WAIT`` seconds. Then a lost race is
        the 10071 conflict it is on one node.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + _IN_FLIGHT_WAIT
        delay = 0.002
        while True:
            try:
                if atomic:
                    # An atomic batch is stored as one contiguous run of sequences.
                    last_seq = await self._publish_batch(
                        name, subjects, payloads, headers, current, only_new
                    )
                    return list(range(last_seq - len(payloads) + 1, last_seq + 1))
                return await self._publish_chain(
                    name, subjects, payloads, headers, current, only_new
                )
            except _InFlight:
                if loop.time() + delay >= end:
                    raise
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 0.05)

    async def _publish_chain(
        self,
        name: str,
        subjects: list[str],
        payloads: list[bytes],
        headers: list[dict[str, str]],
        current: Version,
        only_new: bool = False,
    ) -> list[int]:
        """Publish one by one, each expecting the previous; returns each one's sequence
        (not contiguous: other aggregates' events may land in between)."""
        expected_seq = current.seq
        seqs: list[int] = []
        for subject, payload, h in zip(subjects, payloads, headers, strict=True):
            h[_EXPECTED_SUBJECT_SEQ] = str(expected_seq)
            h[_EXPECTED_SUBJECT_SEQ_SUBJECT] = name + ".>"
            ack = await self._request(subject, payload, h)
            try:
                expected_seq = _ack_seq(ack, only_new)
            except _Duplicate as dup:
                raise _Duplicate(dup.seq, len(seqs)) from None
            seqs.append(expected_seq)
        return seqs

    async def _publish_batch(
        self,
        name: str,
        subjects: list[str],
        payloads: list[bytes],
        headers: list[dict[str, str]],
        current: Version,
        only_new: bool = False,
    ) -> int:
        """Publish the events as one atomic batch; returns the last one's sequence.

        A batch that fails before its commit is sent (the connection refuses a
        message, an answer does not come) is abandoned at once rather than left open
        on the server until its timeout: see :meth:`_abandon`.
        """
        batch_id = uuid.uuid4().hex
        n = len(payloads)
        opened = False
        for i, (subject, payload, h) in enumerate(zip(subjects, payloads, headers, strict=True), 1):
            h[_BATCH_ID] = batch_id
            h[_BATCH_SEQ] = str(i)
            if i == 1:
                h[_EXPECTED_SUBJECT_SEQ] = str(current.seq)
                h[_EXPECTED_SUBJECT_SEQ_SUBJECT] = name + ".>"
            if i == n:
                h[_BATCH_COMMIT] = "1"
                return _ack_seq(await self._request(subject, payload, h), only_new)
            try:
                if i == 1:
                    # A request for the first message: the server answers (empty) once
                    # the batch is open, or with an error we can report precisely.
                    opened = True
                    reply = await self._request(subject, payload, h)
                    if reply:
                        opened = False  # refused: no batch is open
                        _ack_seq(reply)
                else:
                    await self._publish(subject, payload, h)
            except BaseException:
                if opened:
                    await self._abandon(subjects[0], batch_id, n)
                raise
        raise AssertionError("unreachable")

    async def _abandon(self, subject: str, batch_id: str, n: int) -> None:
        """Close an open batch that will not be completed: a message numbered after
        a gap makes the server abandon it as incomplete (stored: nothing). Best
        effort: without it the server drops the batch after its timeout (10 s)."""
        with contextlib.suppress(Exception):
            await self.nc.publish(
                subject, b"", headers={_BATCH_ID: batch_id, _BATCH_SEQ: str(n + 2)}
            )
            await self.nc.flush(timeout=1)

    def _check_sizes(
        self,
        name: str,
        subjects: list[str],
        payloads: list[bytes],
        headers: list[dict[str, str]],
        types: list[str],
    ) -> None:
        """Refuse, before anything is sent, an event the server would refuse for size.

        The limit is the connection's ``max_payload`` (the server's, from nats-py's
        public API), for payload and headers together, the store's own control
        headers (batch id, sequence, commit, expected sequence) included.
        """
        limit = self.nc.max_payload
        # The control headers' largest values; only the subject's depends on the call.
        control = _CONTROL_SIZE + len((name + ".>").encode())
        for i, (payload, h) in enumerate(zip(payloads, headers, strict=True)):
            size = len(payload) + _header_size(h) + control
            if size > limit:
                raise EventStoreError(
                    f"append to {name}: event {i + 1} of {len(payloads)} ({types[i]}, "
                    f"{subjects[i]}) is {size} bytes with its headers; the server takes at "
                    f"most {limit} (max_payload): nothing was sent"
                )

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        try:
            await self.nc.publish(subject, payload, headers=headers)
        except nats.errors.MaxPayloadError:
            raise EventStoreError(
                f"append to {subject}: {len(payload)} bytes is more than the server's "
                f"max_payload ({self.nc.max_payload})"
            ) from None

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str]) -> bytes:
        try:
            msg = await _client.replies(self.nc).request(
                subject, payload, headers, self.config.timeout
            )
        except nats.errors.NoRespondersError:
            raise EventStoreUnavailable(
                f"no stream takes {subject} (a leader election, or EventStore.ensure() "
                "was not called)"
            ) from None
        except nats.errors.TimeoutError:
            raise EventStoreUnavailable(
                f"append to {subject}: no answer in {self.config.timeout}s"
            ) from None
        except nats.errors.MaxPayloadError:
            raise EventStoreError(
                f"append to {subject}: {len(payload)} bytes is more than the server's "
                f"max_payload ({self.nc.max_payload})"
            ) from None
        return bytes(msg.data)

    # -- read -------------------------------------------------------------

    async def version(self, aggregate_type: str, aggregate_id: str) -> Version:
        """The aggregate's current version (one direct get of its last event).

        On a replicated stream a follower behind the leader may answer it: to decide
        on, use :meth:`leader_version` (``append`` does, on a cluster).
        """
        subjects = self.aggregate_filter(aggregate_type, aggregate_id)
        last = await _riding(
            f"reading the version of {subjects}", lambda: self._direct_last(subjects)
        )
        if last is None:
            return Version()
        return Version(_int_header(last.headers, AGGREGATE_VERSION, 0), last.seq)

    async def leader_version(self, aggregate_type: str, aggregate_id: str) -> Version:
        """The aggregate's current version as the stream leader has it.

        :meth:`version` and :meth:`read` use direct gets, which any replica of a
        replicated stream may answer, a follower that has not applied the latest
        writes included. This asks the leader (``$JS.API.STREAM.MSG.GET``), which has
        applied every write it acknowledged: what a decision must not miss.
        """
        subjects = self.aggregate_filter(aggregate_type, aggregate_id)
        last = await _riding(
            f"reading the version of {subjects} from the leader",
            functools.partial(self._leader_get, {"last_by_subj": subjects}),
        )
        if last is None:
            return Version()
        return Version(_int_header(last.headers, AGGREGATE_VERSION, 0), last.seq)

    async def _deciding_version(self, aggregate_type: str, aggregate_id: str) -> Version:
        """The version an append decides on (``expected=<int>`` or ``None``).

        On a cluster, from the stream leader (:meth:`leader_version`): a follower
        behind it would answer an old version by direct get, a spurious
        :class:`AggregateConflict` for ``expected=<int>`` and a refused first try for
        ``expected=None``. The request is one, as the direct get's; on a single
        nats-server the direct get stays (its one copy is current).
        """
        if self._on_cluster():
            return await self.leader_version(aggregate_type, aggregate_id)
        return await self.version(aggregate_type, aggregate_id)

    def _on_cluster(self) -> bool:
        """Whether the connection knows several servers (a cluster's members, given or
        discovered from the server's INFO), so the stream may be replicated. Free:
        nats-py's public server pool is already there."""
        return len(self.nc.servers) > 1

    async def read_from_leader(
        self, aggregate_type: str, aggregate_id: str, *, after: Version, through_seq: int
    ) -> list[StoredEvent]:
        """The aggregate's events after ``after`` up to stream sequence ``through_seq``,
        each read from the stream leader (one request per event: for the few events a
        follower's answer missed, see :meth:`leader_version`)."""
        subject = self.aggregate_filter(aggregate_type, aggregate_id)

        async def collect() -> list[StoredEvent]:
            out: list[StoredEvent] = []
            seq = after.seq + 1
            while seq <= through_seq:
                m = await self._leader_get({"seq": seq, "next_by_subj": subject})
                if m is None or m.seq > through_seq:
                    break
                out.append(
                    StoredEvent.from_msg(
                        m.subject, m.data, m.headers, m.seq, self.stream, self.config.subject_prefix
                    )
                )
                seq = m.seq + 1
            return out

        return await _riding(f"reading {subject} from the leader", collect)

    async def _leader_get(self, request: Mapping[str, Any]) -> RawMessage | None:
        """One message through the stream leader (``STREAM.MSG.GET``); None for 404."""
        what = f"reading {json.dumps(request)} from the leader of stream {self.stream}"
        try:
            msg = await _client.replies(self.nc).request(
                f"$JS.API.STREAM.MSG.GET.{self.stream}",
                json.dumps(request).encode(),
                None,
                self.config.timeout,
            )
        except nats.errors.NoRespondersError:
            raise EventStoreUnavailable(f"{what}: no responders") from None
        except nats.errors.TimeoutError:
            raise EventStoreUnavailable(f"{what}: no answer in {self.config.timeout}s") from None
        h = msg.headers or {}
        if h.get("Status") in ("503", "408"):
            raise EventStoreUnavailable(f"{what}: {h.get('Status')} {h.get('Description', '')}")
        resp = json.loads(msg.data)
        err = resp.get("error")
        if err:
            if err.get("err_code") == 10037 or err.get("code") == 404:
                return None
            if err.get("code") == 503:
                raise EventStoreUnavailable(f"{what}: {err.get('description', err)}")
            raise EventStoreError(f"{what}: {err.get('description', err)}")
        m = resp["message"]
        return RawMessage(
            subject=m["subject"],
            seq=int(m["seq"]),
            headers=_parse_headers(base64.b64decode(m.get("hdrs") or b"")),
            data=base64.b64decode(m.get("data") or b""),
            pending=0,
        )

    async def _last_seq(self, subjects_filter: str) -> int | None:
        last = await self._direct_last(subjects_filter)
        return None if last is None else last.seq

    async def _direct_last(self, subjects_filter: str) -> RawMessage | None:
        """The last message on ``subjects_filter`` (wildcards allowed), by direct get.

        The filter goes in the request's body: a wildcard may not be part of the
        subject a request is published on.
        """
        return await self._direct_get({"last_by_subj": subjects_filter})

    async def _direct_get(self, request: Mapping[str, Any]) -> RawMessage | None:
        """One message by direct get (``request`` as ADR-31 has it); None for 404."""
        msg = await _client.replies(self.nc).request(
            f"$JS.API.DIRECT.GET.{self.stream}",
            json.dumps(request).encode(),
            None,
            self.config.timeout,
        )
        h = msg.headers or {}
        status = h.get("Status")
        if status == "404":
            return None
        what = f"direct get {json.dumps(request)} from stream {self.stream}"
        if status in ("503", "408"):
            raise EventStoreUnavailable(f"{what}: {status} {h.get('Description', '')}".rstrip())
        if status:
            raise EventStoreError(f"{what}: {status} {h.get('Description', '')}".rstrip())
        return RawMessage(
            subject=h.get("Nats-Subject", ""),
            seq=int(h.get("Nats-Sequence", "0")),
            headers=h,
            data=bytes(msg.data),
            pending=0,
        )

    async def read(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        after: Version | None = None,
        to_version: int | None = None,
        until_ms: int | None = None,
    ) -> list[StoredEvent]:
        """The aggregate's events after ``after`` (from the start when None).

        ``to_version`` stops after that version; ``until_ms`` stops before the
        first event stamped later than that Unix time in milliseconds.
        """
        subject = self.aggregate_filter(aggregate_type, aggregate_id)
        start = (after.seq + 1) if after is not None else 1

        async def collect() -> list[StoredEvent]:
            out: list[StoredEvent] = []
            scan = self._scan(subject, start)
            async with contextlib.aclosing(scan):
                async for ev in scan:
                    if to_version is not None and ev.version > to_version:
                        break
                    if until_ms is not None and ev.timestamp_ms > until_ms:
                        break
                    out.append(ev)
                    if to_version is not None and ev.version >= to_version:
                        break
            return out

        # A read cut short by an election starts over: it is a list, not a stream.
        return await _riding(f"reading {subject}", collect)

    async def _scan(self, subject: str, start_seq: int) -> typing.AsyncGenerator[StoredEvent, None]:
        """Every message on ``subject`` from ``start_seq``, in stream order."""
        reader = read_batches(
            self.nc, self.stream, subject, start_seq, self.config.read_batch, self.config.timeout
        )
        async with contextlib.aclosing(reader):
            async for chunk in reader:
                for m in chunk:
                    yield StoredEvent.from_msg(
                        m.subject, m.data, m.headers, m.seq, self.stream, self.config.subject_prefix
                    )


class _WrongLastSequence(Exception):
    pass


class _InFlight(_WrongLastSequence):
    """Refused while another write to the aggregate was in flight (10164): the race is
    not decided yet; a conflict if it stays so."""


class _DuplicateInBatch(_WrongLastSequence):
    """An atomic batch carried a message id the stream already has (a retried append)."""


class _Duplicate(Exception):
    """The stream already has the message id of event ``index`` of an append, at
    ``seq`` (JetStream's deduplication answered instead of storing it)."""

    def __init__(self, seq: int, index: int = 0) -> None:
        super().__init__(f"duplicate of seq {seq}")
        self.seq = seq
        self.index = index


def _parse_headers(raw: bytes) -> dict[str, str]:
    """A NATS header block (``NATS/1.0`` then ``Name: value`` lines) as a dict."""
    out: dict[str, str] = {}
    for line in raw.decode(errors="replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name:
            out[name.strip()] = value.strip()
    return out


# What the store's control headers add to an event at most, but for the value of
# _EXPECTED_SUBJECT_SEQ_SUBJECT (the aggregate's subjects): see EventStore._check_sizes.
_CONTROL_SIZE = sum(
    len(k) + len(v) + 4
    for k, v in (
        (_BATCH_ID, "0" * 32),
        (_BATCH_SEQ, str(MAX_BATCH)),
        (_BATCH_COMMIT, "1"),
        (_EXPECTED_SUBJECT_SEQ, "0" * 20),
        (_EXPECTED_SUBJECT_SEQ_SUBJECT, ""),
    )
)


def _header_size(headers: Mapping[str, str]) -> int:
    """The bytes ``headers`` take on the wire (``NATS/1.0``, one line each, a blank)."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def _replayed(mine: Sequence[StoredEvent], atomic: bool) -> AppendResult:
    """The answer to an append whose events were all stored before: those events."""
    return AppendResult(mine[-1].version_at(), tuple(mine), atomic, duplicate=True)


def _ack_seq(raw: bytes, refuse_duplicate: bool = False) -> int:
    try:
        ack = json.loads(raw)
    except ValueError:
        raise EventStoreError(f"unexpected publish answer {raw[:200]!r}") from None
    if ack.get("duplicate") and not ack.get("error"):
        if refuse_duplicate:
            # Deduplicated by its message id: stored before, so the aggregate is not new.
            raise _WrongLastSequence("duplicate message id")
        raise _Duplicate(int(ack["seq"]))
    err = ack.get("error")
    if err:
        if err.get("err_code") == _WRONG_LAST_SEQUENCE:
            raise _WrongLastSequence(err.get("description", ""))
        if err.get("err_code") == _WRONG_LAST_SEQUENCE_IN_FLIGHT:
            raise _InFlight(err.get("description", ""))
        if err.get("err_code") == _BATCH_DUPLICATE_ID:
            raise _DuplicateInBatch(err.get("description", ""))
        raise EventStoreError(
            f"append refused: {err.get('description', err)} (err_code {err.get('err_code')})"
        )
    return int(ack["seq"])


def _server_version(nc: NATS) -> tuple[int, int]:
    # nats-py's public view of the server's INFO: "0.0.0-unknown" until one arrived.
    reported = nc.connected_server_version
    try:
        version = (reported.major, reported.minor)
    except ValueError:  # not semantic versioning
        version = (0, 0)
    if version == (0, 0):
        # Not "0.0 is too old": nothing is known, so nothing can be promised.
        raise EventStoreError(
            f"the nats-server version is unknown (nats-py reports {reported!r}: no server "
            "INFO on this connection yet, or not a semantic version); the event store needs "
            "nats-server >= 2.11 for Nats-Expected-Last-Subject-Sequence-Subject"
        )
    return version


def _server_supports_atomic(nc: NATS) -> bool:
    return _server_version(nc) >= (2, 12)


@dataclass(frozen=True)
class RawMessage:
    """A stored message as read back: subject, sequence, headers, payload, and how
    many messages matching the read's filter follow it."""

    subject: str
    seq: int
    headers: Mapping[str, str]
    data: bytes
    pending: int


# Per connection, the streams known to lack allow_direct (read through a consumer instead).
_NO_DIRECT: weakref.WeakKeyDictionary[NATS, set[str]] = weakref.WeakKeyDictionary()


async def read_batches(
    nc: NATS, stream: str, subject: str, start_seq: int, batch: int, wait_s: float
) -> typing.AsyncGenerator[list[RawMessage], None]:
    """Every message on ``subject`` (wildcards allowed) from ``start_seq``, in batches.

    Uses batched direct gets (ADR-31) when the stream allows them; otherwise an
    ephemeral ordered pull consumer, so streams declared elsewhere work too.
    """
    no_direct = _NO_DIRECT.setdefault(nc, set())
    if stream not in no_direct:
        try:
            seq = start_seq
            while True:
                got = await _direct_batch(nc, stream, subject, seq, batch, wait_s)
                if got:
                    yield got
                if not got or got[-1].pending == 0:
                    return
                seq = got[-1].seq + 1
        except _NoDirect:
            # "No responders" also answers while a restarting server's JetStream is
            # not up yet: fall back for good only when the stream really lacks direct
            # gets, otherwise fail this read (callers retry) and stay on the fast path.
            if await _allows_direct(nc, stream, wait_s):
                raise EventStoreUnavailable(
                    f"reading {subject} from stream {stream}: direct get has no responders "
                    "(server starting?)"
                ) from None
            no_direct.add(stream)
            log.info("stream %s has no direct get; reading through a consumer", stream)
    async for chunk in _consumer_batches(nc, stream, subject, start_seq, batch, wait_s):
        yield chunk


class _NoDirect(Exception):
    pass


async def _allows_direct(nc: NATS, stream: str, wait_s: float) -> bool:
    try:
        info = await nc.jetstream(timeout=wait_s).stream_info(stream)
    except nats.js.errors.NotFoundError:
        raise EventStoreError(f"stream {stream} not found") from None
    return bool(info.config.allow_direct)


async def _direct_batch(
    nc: NATS, stream: str, subject: str, start_seq: int, batch: int, wait_s: float
) -> list[RawMessage]:
    """One batched direct get: up to ``batch`` messages on ``subject`` from ``start_seq``."""
    # A batch answers with many messages on one reply subject: the connection's
    # shared reply subscription carries them (no SUB and UNSUB per read).
    replies = _client.replies(nc)
    await replies.ready()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    out: list[RawMessage] = []

    def on_msg(msg: Any) -> None:
        if done.done():
            return
        h = msg.headers or {}
        status = h.get("Status")
        if status:
            if status in ("204", "404"):  # end of batch / nothing there
                done.set_result(None)
            elif status == "503":  # no responders: the stream does not allow direct get
                done.set_exception(_NoDirect())
            else:
                desc = next((str(v) for k, v in h.items() if str(k).endswith("Description")), "")
                done.set_exception(
                    EventStoreError(f"reading {subject} from stream {stream}: {status} {desc}")
                )
            return
        out.append(
            RawMessage(
                subject=h.get("Nats-Subject", subject),
                seq=int(h.get("Nats-Sequence", "0")),
                headers=h,
                data=bytes(msg.data),
                pending=int(h.get("Nats-Num-Pending", "0") or 0),
            )
        )

    reply = replies.listen(on_msg)
    try:
        request = {"seq": start_seq, "next_by_subj": subject, "batch": batch}
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=reply)
        try:
            await asyncio.wait_for(done, wait_s)
        except TimeoutError:
            raise EventStoreUnavailable(
                f"reading {subject} from stream {stream}: no answer in {wait_s}s"
            ) from None
        return out
    finally:
        replies.forget(reply)


async def _consumer_batches(
    nc: NATS, stream: str, subject: str, start_seq: int, batch: int, wait_s: float
) -> typing.AsyncGenerator[list[RawMessage], None]:
    js = nc.jetstream(timeout=wait_s)
    try:
        psub = await js.pull_subscribe(
            subject,
            stream=stream,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=max(1, start_seq),
                ack_policy=api.AckPolicy.NONE,
                inactive_threshold=30.0,
                mem_storage=True,
            ),
        )
    except nats.js.errors.NotFoundError:
        raise EventStoreError(f"stream {stream} not found") from None
    try:
        info = await psub.consumer_info()
        if info.num_pending == 0:
            return
        while True:
            try:
                msgs = await psub.fetch(batch, timeout=min(wait_s, 1.0))
            except nats.errors.TimeoutError:
                return
            out = []
            for m in msgs:
                md = m.metadata
                out.append(
                    RawMessage(
                        subject=m.subject,
                        seq=int(md.sequence.stream),
                        headers=dict(m.headers or {}),
                        data=bytes(m.data),
                        pending=int(md.num_pending or 0),
                    )
                )
            if out:
                yield out
            if not out or out[-1].pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, (await psub.consumer_info()).name)
        with contextlib.suppress(Exception):
            await psub.unsubscribe()


# -- schema evolution -------------------------------------------------------

Upcast = Callable[[bytes], "bytes | tuple[str, bytes]"]


class Upcasters:
    """Turns old event versions into new ones at load.

    Register one function per (event type, schema version it reads); it returns
    the payload of the next version, or ``(new type name, payload)`` when the
    type was renamed. Functions chain until no function matches.
    """

    def __init__(self) -> None:
        self._table: dict[tuple[str, int], Upcast] = {}

    def register(self, event_type: str, from_version: int, fn: Upcast) -> None:
        """Upcast ``event_type`` events of schema ``from_version`` to ``from_version + 1``."""
        key = (event_type, from_version)
        if key in self._table:
            raise ValueError(f"an upcaster for {event_type} v{from_version} is already registered")
        self._table[key] = fn

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcast], Upcast]:
        """Decorator form of :meth:`register`."""

        def deco(fn: Upcast) -> Upcast:
            self.register(event_type, from_version, fn)
            return fn

        return deco

    def upcast(self, event: StoredEvent) -> StoredEvent:
        """``event`` brought to the newest schema the registered functions know."""
        seen = 0
        while (fn := self._table.get((event.event_type, event.schema_version))) is not None:
            out = fn(event.data)
            etype, data = out if isinstance(out, tuple) else (event.event_type, out)
            event = replace(
                event,
                event_type=etype,
                data=data,
                schema_version=event.schema_version + 1,
                envelope=replace(event.envelope, event_type=etype),
            )
            seen += 1
            if seen > 1000:
                raise EventStoreError(f"upcasters for {event.event_type} loop")
        return event


# -- aggregates -------------------------------------------------------------


class Appliers(Generic[A]):
    """The typed ``apply*`` methods of an aggregate class, by event type.

    An aggregate is any class; each method whose name starts with ``apply`` and
    whose one parameter is annotated with a protobuf message class handles that
    event type. This table is all the "framework" there is: print it to see it.
    """

    def __init__(self, cls: type[A]) -> None:
        self.cls = cls
        self.methods: dict[str, Callable[[A, Message], None]] = {}
        self.types: dict[str, type[Message]] = {}
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if not name.startswith("apply"):
                continue
            try:
                hints = typing.get_type_hints(fn)
            except NameError as exc:
                raise ConfigError(
                    f"{cls.__name__}.{name}",
                    f"cannot resolve its annotations ({exc}); event classes must be "
                    "importable from the module that defines the aggregate",
                ) from None
            params = [p for p in inspect.signature(fn).parameters if p != "self"]
            if len(params) != 1:
                continue
            hint = hints.get(params[0])
            if isinstance(hint, type) and issubclass(hint, Message):
                full = type_name(hint)
                if full in self.methods:
                    raise ConfigError(f"{cls.__name__}.{name}", f"a second apply method for {full}")
                self.methods[full] = fn
                self.types[full] = hint
        if not self.methods:
            raise ConfigError(
                cls.__name__, "no apply methods (def apply_x(self, event: SomeEvent) -> None)"
            )

    def apply(self, aggregate: A, event: Message) -> None:
        """Call the method for ``event``'s type."""
        fn = self.methods.get(type_name(event))
        if fn is None:
            raise EventStoreError(f"{self.cls.__name__} has no apply method for {type_name(event)}")
        fn(aggregate, event)

    def decode(self, event: StoredEvent) -> Message:
        t = self.types.get(event.event_type)
        if t is None:
            raise EventStoreError(
                f"{event.subject} v{event.version}: {self.cls.__name__} has no apply method "
                f"for {event.event_type} (schema {event.schema_version})"
            )
        return event.decode(t)

    def __repr__(self) -> str:
        rows = ", ".join(f"{k} -> {v.__name__}" for k, v in self.methods.items())
        return f"Appliers({self.cls.__name__}: {rows})"


@dataclass
class Loaded(Generic[A]):
    """An aggregate's state with the version it was loaded (or saved) at."""

    aggregate_id: str
    state: A
    version: Version
    snapshot_version: int | None = None
    replayed: int = 0


StateDump = Callable[[Any], bytes]
StateLoad = Callable[[str, bytes], Any]


@dataclass(frozen=True)
class StateCodec(Generic[A]):
    """How an aggregate's state becomes snapshot bytes and back.

    ``schema`` is the codec's version: a snapshot written with another schema is
    ignored (the aggregate is replayed instead), so changing the state's shape
    never needs a migration of snapshots.
    """

    dump: Callable[[A], bytes]
    load: Callable[[str, bytes], A]
    schema: int = 1


class Repository(Generic[A]):
    """Loads and saves one aggregate type through an :class:`EventStore`.

    ``factory(id)`` makes an empty aggregate. With ``snapshots`` and
    ``snapshot_every=N`` (and a ``codec``), every save that crosses a multiple of
    N events writes a snapshot, and loads start from the newest one.

    ``cache_size=N`` keeps the N aggregates :meth:`execute` wrote last in memory,
    so a command on one of them decides without reading it back. The append's
    expected-sequence check still guards it: when another process wrote in
    between, the append is refused and the command reloads and runs again. A
    command that decides nothing, or raises, on a cached state is run once more on
    the stored state, as a stale state may be the reason. Commands on one
    aggregate are then serialized within the process (no conflicts among them).
    A command works on a copy of the cached state (``copy.deepcopy``; an
    aggregate may define ``__deepcopy__`` to make it cheaper), so what an earlier
    command returned never changes.
    """

    def __init__(
        self,
        store: EventStore,
        aggregate_type: str,
        factory: Callable[[str], A],
        *,
        aggregate_class: type[A] | None = None,
        snapshots: Any = None,
        snapshot_every: int = 0,
        codec: StateCodec[A] | None = None,
        upcasters: Upcasters | None = None,
        cache_size: int = 0,
    ) -> None:
        if not _NAME.match(aggregate_type):
            raise ConfigError(
                "repository.aggregate_type", f"{aggregate_type!r} must match [A-Za-z0-9_-]+"
            )
        if snapshot_every < 0:
            raise ConfigError("repository.snapshot_every", f"{snapshot_every!r}: must be >= 0")
        if cache_size < 0:
            raise ConfigError("repository.cache_size", f"{cache_size!r}: must be >= 0")
        if snapshot_every and (snapshots is None or codec is None):
            raise ConfigError(
                "repository.snapshot_every", "snapshots need a snapshot store and a codec"
            )
        cls = aggregate_class or (factory if isinstance(factory, type) else None)
        if cls is None:
            raise ConfigError("repository.aggregate_class", "needed when factory is not the class")
        self.store = store
        self.aggregate_type = aggregate_type
        self.factory = factory
        self.appliers: Appliers[A] = Appliers(cls)
        self.snapshots = snapshots
        self.snapshot_every = snapshot_every
        self.codec = codec
        self.upcasters = upcasters or Upcasters()
        self.cache_size = cache_size
        self.cache_hits = 0
        self._cache: collections.OrderedDict[str, Loaded[A]] = collections.OrderedDict()
        self._locks = KeyedLocks()

    async def load(
        self,
        aggregate_id: str,
        *,
        version: int | None = None,
        as_of_ms: int | None = None,
        use_snapshots: bool = True,
        consistent: bool = False,
    ) -> Loaded[A]:
        """The aggregate now, or as of ``version`` / Unix time ``as_of_ms`` (time travel).

        ``consistent``: the state has every event the stream leader acknowledged
        before the call (checked with the leader after reading; see
        :meth:`catch_up`). Without it a replica that is behind may answer the read,
        which only a decision that writes nothing needs to care about (an append
        is checked by the leader anyway).
        """
        snap = None
        if use_snapshots and self.snapshots is not None and self.codec is not None:
            if version is None and as_of_ms is None:
                snap = await self.snapshots.get(self.aggregate_type, aggregate_id)
            else:
                snap = await self.snapshots.best(
                    self.aggregate_type, aggregate_id, version=version, as_of_ms=as_of_ms
                )
            if snap is not None and snap.schema != self.codec.schema:
                log.info(
                    "ignoring snapshot of %s/%s: schema %d, codec wants %d",
                    self.aggregate_type,
                    aggregate_id,
                    snap.schema,
                    self.codec.schema,
                )
                snap = None
        if snap is not None and self.codec is not None:
            state = self.codec.load(aggregate_id, snap.state)
            at = Version(snap.version, snap.seq)
        else:
            state = self.factory(aggregate_id)
            at = Version()
        events = await self.store.read(
            self.aggregate_type,
            aggregate_id,
            after=at if at.seq else None,
            to_version=version,
            until_ms=as_of_ms,
        )
        for ev in events:
            ev = self.upcasters.upcast(ev)
            self.appliers.apply(state, self.appliers.decode(ev))
            at = Version(ev.version, ev.seq)
        loaded = Loaded(
            aggregate_id,
            state,
            at,
            snapshot_version=snap.version if snap is not None else None,
            replayed=len(events),
        )
        if consistent and version is None and as_of_ms is None:
            await self.catch_up(loaded)
        return loaded

    async def catch_up(self, loaded: Loaded[A]) -> bool:
        """Apply to ``loaded`` what the stream leader has beyond it; True if anything.

        Reads on a replicated stream may be answered by a follower that has not
        applied the latest writes yet: the leader's last sequence for the aggregate
        says whether it did, and the missing events come from the leader.
        """
        last = await self.store.leader_version(self.aggregate_type, loaded.aggregate_id)
        if last.seq <= loaded.version.seq:
            return False
        tail = await self.store.read_from_leader(
            self.aggregate_type, loaded.aggregate_id, after=loaded.version, through_seq=last.seq
        )
        for ev in tail:
            self.appliers.apply(loaded.state, self.appliers.decode(self.upcasters.upcast(ev)))
            loaded.version = ev.version_at()
        loaded.replayed += len(tail)
        if tail:
            log.info(
                "%s/%s: a read missed %d event(s) the leader has (a replica behind); caught up",
                self.aggregate_type,
                loaded.aggregate_id,
                len(tail),
            )
        return bool(tail)

    async def save(
        self,
        loaded: Loaded[A],
        events: Sequence[Message],
        *,
        event_ids: Sequence[str] | None = None,
        saga_id: str = "",
        saga_type: str = "",
        causation_id: str = "",
        only_new: bool = False,
        saga_deadline_ms: int | None = None,
    ) -> Loaded[A]:
        """Append ``events`` at ``loaded.version``, apply them, snapshot when due.

        ``only_new``, ``saga_deadline_ms``: see :meth:`EventStore.append`.
        """
        if not events:
            return loaded
        result = await self.store.append(
            self.aggregate_type,
            loaded.aggregate_id,
            events,
            expected=loaded.version,
            event_ids=event_ids,
            saga_id=saga_id,
            saga_type=saga_type,
            causation_id=causation_id,
            only_new=only_new,
            saga_deadline_ms=saga_deadline_ms,
        )
        if result.duplicate and result.events[0].version != loaded.version.number + 1:
            # A retry whose events were stored by its first try, decided on a state
            # that already has them (or has moved on): the answer is the state right
            # after them, as the first try returned it, never them applied twice.
            if loaded.version == result.version:
                return loaded
            return await self.load(loaded.aggregate_id, version=result.version.number)
        for event in events:
            self.appliers.apply(loaded.state, event)
        old = loaded.version.number
        loaded = Loaded(loaded.aggregate_id, loaded.state, result.version, loaded.snapshot_version)
        every = self.snapshot_every
        if every and result.version.number // every > old // every:
            await self.snapshot(loaded)
        return loaded

    async def snapshot(self, loaded: Loaded[A]) -> None:
        """Write a snapshot of ``loaded`` now (best effort: failures are logged)."""
        if self.snapshots is None or self.codec is None:
            raise ConfigError("repository.snapshots", "no snapshot store or codec configured")
        from meshkit.saga.snapshots import Snapshot

        snap = Snapshot(
            aggregate_type=self.aggregate_type,
            aggregate_id=loaded.aggregate_id,
            version=loaded.version.number,
            seq=loaded.version.seq,
            timestamp_ms=_now_ms(),
            schema=self.codec.schema,
            state=self.codec.dump(loaded.state),
        )
        try:
            await self.snapshots.put(snap)
            loaded.snapshot_version = snap.version
        except Exception as exc:  # a missed snapshot only costs a longer load
            log.warning(
                "snapshot of %s/%s failed: %r", self.aggregate_type, loaded.aggregate_id, exc
            )

    async def execute(
        self,
        aggregate_id: str,
        decide: Callable[[A], Sequence[Message]],
        *,
        retries: int = 5,
        event_ids: Callable[[int], str] | None = None,
        saga_id: str = "",
        saga_type: str = "",
        causation_id: str = "",
        expect_new: bool = False,
        saga_deadline_ms: int | None = None,
    ) -> Loaded[A]:
        """Load, ``decide`` the new events from the state, save; reload and retry on conflict.

        ``decide`` must be free of side effects: it may run more than once.
        ``expect_new``: the aggregate is most likely new (a create), so decide on an
        empty one without reading; an append that finds any event there, this
        command's own earlier attempt included, is a conflict, and the command
        runs again on the loaded aggregate. ``saga_deadline_ms``: see :meth:`EventStore.append`.
        """
        # With a cache, commands on one aggregate take turns (no conflicts among them).
        turn = self._locks.hold(aggregate_id) if self.cache_size else contextlib.nullcontext()
        async with turn:
            # Out of the cache while the command runs: only a saved state goes back.
            cached = self._cache.pop(aggregate_id, None)
            loaded = await self._execute(
                aggregate_id,
                decide,
                retries,
                event_ids,
                saga_id,
                saga_type,
                causation_id,
                cached,
                expect_new and cached is None,
                saga_deadline_ms,
            )
            if self.cache_size:
                self._cache[aggregate_id] = loaded
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return loaded

    async def _execute(
        self,
        aggregate_id: str,
        decide: Callable[[A], Sequence[Message]],
        retries: int,
        event_ids: Callable[[int], str] | None,
        saga_id: str,
        saga_type: str,
        causation_id: str,
        cached: Loaded[A] | None = None,
        expect_new: bool = False,
        saga_deadline_ms: int | None = None,
    ) -> Loaded[A]:
        # A guess (an empty aggregate, a cached one) that fails costs one more attempt.
        last = retries + (1 if expect_new else 0)
        for attempt in range(last + 1):
            only_new = expect_new and attempt == 0
            if only_new:
                guess: Loaded[A] | None = Loaded(
                    aggregate_id, self.factory(aggregate_id), Version()
                )
            elif cached is not None:
                # A copy: the command applies its events to it, and the Loaded an
                # earlier command returned must not change under its caller.
                guess = Loaded(
                    aggregate_id,
                    copy.deepcopy(cached.state),
                    cached.version,
                    cached.snapshot_version,
                )
            else:
                guess = None
            cached = None
            if guess is not None:
                loaded = guess
                try:
                    events = list(decide(loaded.state))
                except Exception:
                    events = []
                if not events:  # maybe the guess is wrong: decide on the stored state
                    only_new = False
                    loaded, events = await self._decide_on_stored(aggregate_id, decide, attempt > 0)
                elif not only_new:
                    self.cache_hits += 1
            else:
                # After a conflict the read is confirmed with the leader: a replica
                # that is behind would only lead to the same conflict again.
                loaded, events = await self._decide_on_stored(aggregate_id, decide, attempt > 0)
            ids = [event_ids(i) for i in range(len(events))] if event_ids else None
            try:
                return await self.save(
                    loaded,
                    events,
                    event_ids=ids,
                    saga_id=saga_id,
                    saga_type=saga_type,
                    causation_id=causation_id,
                    only_new=only_new,
                    saga_deadline_ms=saga_deadline_ms,
                )
            except AggregateConflict:
                if attempt == last:
                    raise
                await asyncio.sleep(0)
        raise AssertionError("unreachable")

    async def _decide_on_stored(
        self, aggregate_id: str, decide: Callable[[A], Sequence[Message]], consistent: bool
    ) -> tuple[Loaded[A], list[Message]]:
        """Load (``consistent``: see :meth:`load`) and decide. A decision to write
        nothing (or a refusal) is taken only on a state the stream leader confirms:
        an append is checked by the leader, a no-op is not, so a read answered by a
        replica that is behind must not make one.
        """
        loaded = await self.load(aggregate_id, consistent=consistent)
        try:
            events = list(decide(loaded.state))
        except Exception:
            if not await self.catch_up(loaded):
                raise
            events = list(decide(loaded.state))
        if not events and await self.catch_up(loaded):
            events = list(decide(loaded.state))
        return loaded, events

    def handled_types(self) -> Iterable[str]:
        return self.appliers.methods.keys()


def _current_trace() -> tuple[str, str]:
    """The caller's W3C trace context, stored with its events so relays carry it on."""
    from opentelemetry import propagate, trace

    if not trace.get_current_span().get_span_context().is_valid:
        return "", ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000
