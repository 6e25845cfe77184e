"""The :class:`EventStore` (append to and read aggregates' events on one stream) and its
:class:`EventStoreConfig`.

The class decides (which version to expect, what a refusal means, when to retry);
its helpers do the legwork: ``_stream`` (the stream and its layout), ``_wire`` (the
events on the wire, one by one or as an atomic batch), ``_retries`` (what a retried
append's first try stored) and :mod:`~meshkit.saga.eventstore.reads` (direct and
leader gets, batched reads). The helpers call back through the store's own
``_request``, ``_publish``, ``_direct_get``... so one store is one connection, one
config, and one place to watch or stub its traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from opentelemetry import propagate
from opentelemetry.trace import get_current_span

from meshkit.errors import ConfigError
from meshkit.saga import _telemetry, cluster
from meshkit.saga.envelope import Envelope, new_event_id, now_ms, type_name
from meshkit.saga.eventstore import _retries, _stream, _wire, reads
from meshkit.saga.eventstore._wire import (
    _IN_FLIGHT_WAIT,
    MAX_BATCH,
    _Duplicate,
    _DuplicateInBatch,
    _InFlight,
    _server_version,
    _WrongLastSequence,
)
from meshkit.saga.eventstore.errors import (
    _UNAVAILABLE,
    AggregateConflict,
    EventStoreError,
    _riding,
    _riding_after,
)
from meshkit.saga.eventstore.events import (
    _ID,
    _NAME,
    _TOKEN,
    AGGREGATE_ID,
    AGGREGATE_TYPE,
    AGGREGATE_VERSION,
    SCHEMA_VERSION,
    AppendResult,
    StoredEvent,
    Version,
    _int_header,
    type_token,
)
from meshkit.saga.eventstore.reads import RawMessage, read_batches

log = logging.getLogger("meshkit.saga.eventstore")

# An append's span without an OpenTelemetry SDK: a stateless nullcontext serves all.
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext(None)
# Aggregate types that passed their checks: few, and checked on every append.
_CHECKED_AGGREGATE_TYPES: set[str] = set()


@dataclass(frozen=True)
class EventStoreConfig:
    """Where the events live.

    ``prefix``: subjects are ``<prefix>.<event type token>.<aggregate type>.<id>``
    (:func:`~meshkit.saga.eventstore.events.type_token`; default prefix: the stream
    name in lower case). ``atomic``: use atomic batch publish when the server has
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
        """``<prefix>.<aggregate type>.<id>``, its name in errors; ValueError for a bad one."""
        if aggregate_type not in _CHECKED_AGGREGATE_TYPES:
            if not _NAME.match(aggregate_type):
                raise ValueError(f"aggregate type {aggregate_type!r} must match [A-Za-z0-9_-]+")
            if len(_CHECKED_AGGREGATE_TYPES) < 4096:
                _CHECKED_AGGREGATE_TYPES.add(aggregate_type)
        if not _ID.match(aggregate_id):
            raise ValueError(f"aggregate id {aggregate_id!r} must match [A-Za-z0-9_=-]+")
        return f"{self.config.subject_prefix}.{aggregate_type}.{aggregate_id}"

    def aggregate_filter(self, aggregate_type: str, aggregate_id: str) -> str:
        """``<prefix>.*.<aggregate type>.<id>``, matching every event of one aggregate."""
        self.aggregate_name(aggregate_type, aggregate_id)  # checks both
        return self._filter(aggregate_type, aggregate_id)

    def _filter(self, aggregate_type: str, aggregate_id: str) -> str:
        return f"{self.config.subject_prefix}.*.{aggregate_type}.{aggregate_id}"

    def event_subject(self, aggregate_type: str, aggregate_id: str, event_type: str) -> str:
        """The subject one event of the aggregate is stored on."""
        token = type_token(event_type)
        # The prefix has no wildcard: the first is the event type's place.
        return self.aggregate_filter(aggregate_type, aggregate_id).replace("*", token, 1)

    async def aggregate_ids(self, aggregate_type: str) -> list[str]:
        """The ids of every aggregate of this type with at least one event, sorted."""
        if not _NAME.match(aggregate_type):
            raise ValueError(f"aggregate type {aggregate_type!r} must match [A-Za-z0-9_-]+")
        subjects = await self._subjects(f"{self.config.subject_prefix}.*.{aggregate_type}.*")
        return sorted({s.rsplit(".", 1)[1] for s in subjects})

    async def _subjects(self, subjects_filter: str) -> dict[str, int]:
        """The stream's subjects matching ``subjects_filter``, with their message counts."""
        return await reads.stream_subjects(
            self.nc, self.stream, subjects_filter, self.config.timeout
        )

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

        The stream's metadata records the subject layout. Raises
        :class:`EventStoreError` when the stream holds the store's events in an
        earlier layout (aggregate type first), which the store would not see:
        :meth:`upgrade_layout` moves them.
        """
        self._check_server()
        self._atomic = await _stream.create_or_update(self)
        await _stream.refuse_old_layout(self)

    async def upgrade_layout(self) -> int:
        """Move events stored in an earlier layout onto
        ``<prefix>.<event type token>.<aggregate type>.<id>``.

        Each aggregate's events are republished in order with their meshkit headers
        (the event id stays in ``Meshkit-Event-Id``; ``Nats-Msg-Id`` is left off, or
        JetStream would take each copy for its original), each expecting the
        aggregate's previous one; then the old subjects are purged and the stream's
        metadata records the layout. A second run, after a crash half way, skips
        what an aggregate already has. Returns how many events moved. Run it once,
        with no other writer on the stream. Consumers of the stream (a hosted
        store's participants, projections) see the moved events as new messages
        carrying their original event ids: inboxes drop them as duplicates; rebuild
        a projection that does not dedupe by event id.
        """
        self._check_server()
        return await _stream.upgrade_layout(self)

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
        where = self._filter(aggregate_type, aggregate_id)  # checked just above
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
        # No comprehension (see _envelopes); the names in it are checked: no braces.
        subject_of = where.replace("*", "{}", 1).format
        subjects = list(map(subject_of, map(type_token, types)))
        if _telemetry.tracing():
            token = type_token(types[0]) if len(set(types)) == 1 else "*"
            template = f"{self.config.subject_prefix}.{token}.{aggregate_type}.{{id}}"
            probe = Envelope(event_id=ids[0], event_type=types[0], saga_id=saga_id)
            span: Any = _telemetry.producer_span(
                subjects[0], probe, sum(map(len, payloads)), template=template, count=len(events)
            )
        else:
            span = _NO_SPAN
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
                            at = await _retries.seq_of_version(
                                self, aggregate_type, aggregate_id, expected + 1, current
                            )
                            done = await _retries.resume(
                                self, at, aggregate_type, aggregate_id, events, ids, atomic, **meta
                            )
                            if done is not None:
                                return done
                        raise AggregateConflict(name, expected, current.number)
                envs = self._envelopes(
                    types, ids, current.number, aggregate_type, aggregate_id, trace, meta
                )
                headers = [e.to_headers() for e in envs]
                _wire.check_sizes(self.nc, name, where, subjects, payloads, headers, types)
                args = (atomic, where, subjects, payloads, headers, current, only_new)
                try:
                    # Resent as it was while the cluster elects a leader: the same Nats-Msg-Id,
                    # so one stored but not acknowledged is acknowledged as a duplicate, not
                    # stored again. The first try is made here, without _riding's coroutines
                    # (and its clock read only if it fails: the loop's costs a getpid() call).
                    started = time.monotonic()
                    try:
                        seqs = await self._store(*args)
                        failed = None
                    except _UNAVAILABLE as exc:
                        failed = exc
                    if failed is not None:
                        store = functools.partial(self._store, *args)
                        start = asyncio.get_running_loop().time() - (time.monotonic() - started)
                        seqs = await _riding_after(f"append to {name}", store, start, failed)
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
                    done = await _retries.resume(
                        self, dup.seq, aggregate_type, aggregate_id, events, ids, atomic, **meta
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
                    at = await _retries.find_id(self, aggregate_type, aggregate_id, ids[0], current)
                    done = await _retries.resume(
                        self, at, aggregate_type, aggregate_id, events, ids, atomic, **meta
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
                        done = await _retries.resume(
                            self,
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
                            at = await _retries.ending_at(
                                self, aggregate_type, aggregate_id, ids, current
                            )
                            done = await _retries.resume(
                                self, at, aggregate_type, aggregate_id, events, ids, atomic, **meta
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
            stored = []
            for i, env in enumerate(envs):
                stored.append(
                    StoredEvent(
                        aggregate_type=aggregate_type,
                        aggregate_id=aggregate_id,
                        version=current.number + i + 1,
                        seq=seqs[i],
                        event_type=env.event_type,
                        schema_version=self.config.schema_versions.get(env.event_type, 1),
                        data=payloads[i],
                        envelope=env,
                        subject=subjects[i],
                        stream=self.stream,
                    )
                )
            return self._appended(
                AppendResult(Version(current.number + len(envs), seqs[-1]), tuple(stored), atomic)
            )

    def _envelopes(
        self,
        types: list[str],
        ids: list[str],
        number: int,
        aggregate_type: str,
        aggregate_id: str,
        trace: tuple[str, str],
        meta: dict[str, Any],
    ) -> list[Envelope]:
        """The envelopes of an append's events, after version ``number``.

        Plain loops, not comprehensions: those made ``append`` keep a dozen of its
        variables in cells, allocated on every call and walked by the collector."""
        traceparent, tracestate = trace
        timestamp_ms = meta["timestamp_ms"]
        envs = []
        for i, etype in enumerate(types):
            extra = {
                AGGREGATE_TYPE: aggregate_type,
                AGGREGATE_ID: aggregate_id,
                AGGREGATE_VERSION: str(number + i + 1),
            }
            schema = self.config.schema_versions.get(etype, 1)
            if schema != 1:  # 1 is what a reader takes when the header is not there
                extra[SCHEMA_VERSION] = str(schema)
            envs.append(
                Envelope._of(
                    ids[i],
                    etype,
                    meta["saga_id"],
                    meta["causation_id"],
                    now_ms() if timestamp_ms is None else timestamp_ms,
                    self.source,
                    meta["saga_type"],
                    None,
                    meta["saga_deadline_ms"],
                    traceparent,
                    tracestate,
                    extra,
                )
            )
        return envs

    async def _store(
        self,
        atomic: bool,
        where: str,
        subjects: list[str],
        payloads: list[bytes],
        headers: list[dict[str, str]],
        current: Version,
        only_new: bool,
    ) -> list[int]:
        """Publish the events expecting ``current`` on ``where``; their sequences.

        While another write to the aggregate is in flight on a replicated stream the
        server refuses ours (10164) without knowing yet whether the other one will
        land: ours is sent again (same ids, so nothing is stored twice) until the
        server can say, for up to ``_IN_FLIGHT_WAIT`` seconds. Then a lost race is
        the 10071 conflict it is on one node.
        """
        end = time.monotonic() + _IN_FLIGHT_WAIT
        delay = 0.002
        while True:
            try:
                if atomic:
                    # An atomic batch is stored as one contiguous run of sequences.
                    last_seq = await _wire.publish_batch(
                        self, where, subjects, payloads, headers, current, only_new
                    )
                    return list(range(last_seq - len(payloads) + 1, last_seq + 1))
                return await _wire.publish_chain(
                    self, where, subjects, payloads, headers, current, only_new
                )
            except _InFlight:
                if time.monotonic() + delay >= end:
                    raise
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 0.05)

    async def _publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        """Send one message of an append without waiting for an answer."""
        await _wire.publish(self.nc, subject, payload, headers)

    def _request(self, subject: str, payload: bytes, headers: dict[str, str]) -> Awaitable[bytes]:
        """Send one message of an append; the stream's answer (awaited: one coroutine
        fewer than an ``async def`` wrapping it)."""
        return _wire.request(self.nc, subject, payload, headers, self.config.timeout)

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
        return await reads.leader_get(self.nc, self.stream, request, self.config.timeout)

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
        return await reads.direct_get(self.nc, self.stream, request, self.config.timeout)

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


def _current_trace() -> tuple[str, str]:
    """The caller's W3C trace context, stored with its events so relays carry it on."""
    if not get_current_span().get_span_context().is_valid:
        return "", ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")
