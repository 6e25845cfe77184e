"""The event bus: JetStream streams, publishing with dedupe, durable pull consumers.

::

    bus = await EventBus.connect("nats://127.0.0.1:4222", name="payment")
    await bus.ensure_stream(SHOP)                      # create or update, idempotent
    env = await bus.emit(SHOP, OrderCreated(...), saga_type="order")
    consumer = bus.consumer(SHOP, "payment", handle, filter_subjects=[...])
    await consumer.start()
    ...
    await consumer.stop()                              # drains in-flight work
    await bus.close()

The pull consumer speaks JetStream's pull protocol itself rather than looping
on ``fetch()``: it keeps a window of outstanding pull requests with idle
heartbeats, hands each message to the handler as soon as it arrives, and when
heartbeats stop (a server restart silently loses pull requests, the known
nats-py weak spot) or the client reconnects, it re-creates the consumer if
needed and pulls again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

import meshkit.deadline
from meshkit.errors import ConfigError
from meshkit.saga import _client, _telemetry, cluster
from meshkit.saga.envelope import Envelope, type_name
from meshkit.saga.eventstore import EventStore, EventStoreConfig

__all__ = [
    "ConsumerSpec",
    "EventBus",
    "EventStoreSource",
    "MessageHandler",
    "PullConsumer",
    "StreamSpec",
]

log = logging.getLogger("meshkit.saga")

MessageHandler = Callable[[Msg], Awaitable[None]]

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")

_RETRYABLE_PUBLISH = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,  # JetStream not up yet after a restart
    asyncio.TimeoutError,
)


def _from_mapping(cls: Any, doc: Mapping[str, Any], path: str, durations: frozenset[str]) -> Any:
    """Build a spec from a config mapping; unknown keys and bad values name their path."""
    from meshkit.config import parse_duration

    if not isinstance(doc, Mapping):
        raise ConfigError(path, f"expected a mapping, got {type(doc).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in known:
            raise ConfigError(f"{path}.{key}", f"unknown key; expected one of {sorted(known)}")
        if isinstance(value, list):
            value = tuple(
                parse_duration(v, f"{path}.{key}[{i}]") if key in durations else v
                for i, v in enumerate(value)
            )
        elif key in durations and value is not None:
            value = parse_duration(value, f"{path}.{key}")
        kwargs[key] = value
    try:
        spec = cls(**kwargs)
    except ConfigError as exc:
        # The spec's own checks name "stream.x"/"consumer.x"; re-root them at ``path``.
        raise ConfigError(
            path + exc.path[exc.path.index(".") :], str(exc).split(": ", 1)[1]
        ) from None
    except TypeError as exc:
        raise ConfigError(path, str(exc)) from None
    return spec


@dataclass(frozen=True)
class EventStoreSource:
    """An event store whose events nats-server copies into a stream (stream sourcing).

    Each event of the listed ``types`` (full protobuf names or message classes; every
    type when empty), stored on ``<store prefix>.<aggregate>.<id>.<type>``, lands on
    the stream's ``<prefix>.<type>`` with its headers (ids, saga, trace) and in
    order, where participants consume it like any other event. The store is then
    its own outbox: an append is the only write, and the server forwards each
    event once, across restarts, with no relay to run. A new source copies the
    store from its first event (a stream a relay fed before would get those events
    again). When the listed types change, :meth:`EventBus.ensure_stream` has the
    copy go on from the last event it took, where the server alone would start
    over: newly listed types are copied from that point on. An event the server
    copies while the change is made may be copied twice; the stream's
    ``Nats-Msg-Id`` dedupe window drops such a copy.

    :meth:`EventBus.ensure_stream` creates a missing store with ``store``, so
    declare the store's own config here. Copies reach pull consumers (participants)
    at once; a projector that follows the stream through core subscriptions sees
    them at its next poll, as the server publishes no core message for a copy.
    """

    store: EventStoreConfig
    types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.types, (str, Mapping)) or not isinstance(self.types, Iterable):
            raise ConfigError("source.types", "expected a list of event types")
        names: list[str] = []
        for i, t in enumerate(self.types):
            if isinstance(t, type) and issubclass(t, Message):
                t = type_name(t)
            if not isinstance(t, str) or not _TOKEN.match(t):
                raise ConfigError(
                    f"source.types[{i}]",
                    f"{t!r}: expected an event type (dot-separated subject tokens)",
                )
            names.append(t)
        object.__setattr__(self, "types", tuple(names))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: str = "source") -> EventStoreSource:
        """A source in config: ``{stream: ORDERS, prefix: orders, types: [shop.v1.OrderCreated]}``.

        ``storage``, ``replicas`` and ``duplicate_window`` describe the store as its
        owner declares it, for when this side creates it first.
        """
        if not isinstance(doc, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(doc).__name__}")
        known = ("stream", "prefix", "types", "storage", "replicas", "duplicate_window")
        unknown = set(doc) - set(known)
        if unknown:
            raise ConfigError(
                f"{path}.{sorted(unknown)[0]}", f"unknown key; expected one of {', '.join(known)}"
            )
        if "stream" not in doc:
            raise ConfigError(f"{path}.stream", "required: the event store's stream")
        types = doc.get("types", ())
        if types is None:
            types = ()
        if isinstance(types, str) or not isinstance(types, Sequence):
            raise ConfigError(f"{path}.types", "expected a list of event types")
        for key in ("stream", "prefix"):
            if not isinstance(doc.get(key, ""), str):
                raise ConfigError(f"{path}.{key}", f"{doc[key]!r}: expected a string")
        store_options: dict[str, Any] = {}
        if "storage" in doc:
            store_options["storage"] = doc["storage"]
            if doc["storage"] not in ("file", "memory"):
                raise ConfigError(f"{path}.storage", f"{doc['storage']!r}: expected file or memory")
        if "replicas" in doc:
            cluster.check_replicas(doc["replicas"], f"{path}.replicas")
            store_options["replicas"] = doc["replicas"]
        if "duplicate_window" in doc:
            from meshkit.config import parse_duration

            store_options["duplicate_window"] = parse_duration(
                doc["duplicate_window"], f"{path}.duplicate_window"
            )
        try:
            store = EventStoreConfig(
                stream=doc["stream"], prefix=doc.get("prefix") or "", **store_options
            )
            return cls(store, tuple(types))
        except ConfigError as exc:
            raise ConfigError(
                path + exc.path[exc.path.index(".") :], str(exc).split(": ", 1)[1]
            ) from None

    def to_source(self, prefix: str) -> api.StreamSource:
        """The JetStream source for a stream whose events sit under ``prefix``."""
        head = f"{self.store.subject_prefix}.*.*"
        pairs = [(f"{head}.{t}", f"{prefix}.{t}") for t in self.types] or [
            (f"{head}.>", f"{prefix}.>")
        ]
        return api.StreamSource(
            name=self.store.stream,
            subject_transforms=[api.SubjectTransform(src=a, dest=b) for a, b in pairs],
        )


def _sources_key(
    sources: Sequence[api.StreamSource] | None,
) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """What identifies a stream's sources, to tell whether the server's differ."""
    return sorted(
        (
            s.name,
            tuple(sorted((t.src, t.dest) for t in (s.subject_transforms or []))),
        )
        for s in (sources or [])
    )


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream holding events under ``<prefix>.<event type>`` subjects.

    ``duplicate_window`` (seconds) is how long ``Nats-Msg-Id`` dedupe remembers an
    id; ``replicas`` > 1 needs a clustered deployment, and None (the default) means
    ``MESHKIT_NATS_REPLICAS`` (:mod:`meshkit.saga.cluster`), read when the stream is
    ensured. ``sources``: event stores whose events the server copies in
    (:class:`EventStoreSource`).
    """

    name: str
    prefix: str
    storage: Literal["file", "memory"] = "file"
    retention: Literal["limits", "interest", "workqueue"] = "limits"
    duplicate_window: float = 120.0
    replicas: int | None = None
    max_age: float | None = None
    max_msgs: int | None = None
    max_bytes: int | None = None
    extra_subjects: tuple[str, ...] = ()
    description: str = ""
    # Direct gets (ADR-31) let projections and the event store read by subject cheaply.
    allow_direct: bool = True
    sources: tuple[EventStoreSource, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.sources, (str, Mapping)) or not isinstance(self.sources, Iterable):
            raise ConfigError("stream.sources", "expected a list of event store sources")
        sources: list[EventStoreSource] = []
        for i, src in enumerate(self.sources):
            if isinstance(src, Mapping):
                src = EventStoreSource.from_dict(src, f"stream.sources[{i}]")
            elif not isinstance(src, EventStoreSource):
                raise ConfigError(
                    f"stream.sources[{i}]",
                    f"{src!r}: expected an event store source {{stream, prefix, types}}",
                )
            sources.append(src)
        object.__setattr__(self, "sources", tuple(sources))
        if not _NAME.match(self.name):
            raise ConfigError("stream.name", f"{self.name!r} must match [A-Za-z0-9_-]+")
        if not _TOKEN.match(self.prefix):
            raise ConfigError(
                "stream.prefix", f"{self.prefix!r} must be dot-separated tokens without wildcards"
            )
        if self.storage not in ("file", "memory"):
            raise ConfigError("stream.storage", f"{self.storage!r}: expected 'file' or 'memory'")
        if self.retention not in ("limits", "interest", "workqueue"):
            raise ConfigError(
                "stream.retention", f"{self.retention!r}: expected limits, interest or workqueue"
            )
        if not self.duplicate_window > 0:
            raise ConfigError(
                "stream.duplicate_window", f"{self.duplicate_window!r}: must be > 0 seconds"
            )
        cluster.check_replicas(self.replicas, "stream.replicas")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: str = "stream") -> StreamSpec:
        """A stream declared in config (``{name: SHOP, prefix: shop.events, duplicate_window: 2m}``)."""
        return _from_mapping(cls, doc, path, frozenset({"duplicate_window", "max_age"}))  # type: ignore[no-any-return]

    @property
    def subjects(self) -> tuple[str, ...]:
        return (f"{self.prefix}.>", *self.extra_subjects)

    def subject_for(self, event: Message | type[Message] | str) -> str:
        """The subject events of this type are published on."""
        name = event if isinstance(event, str) else type_name(event)
        return f"{self.prefix}.{name}"

    def to_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.name,
            description=self.description or None,
            subjects=list(self.subjects),
            retention=api.RetentionPolicy(self.retention),
            storage=api.StorageType(self.storage),
            duplicate_window=self.duplicate_window,
            num_replicas=cluster.replicas(self.replicas),
            max_age=self.max_age,
            max_msgs=self.max_msgs if self.max_msgs is not None else -1,
            max_bytes=self.max_bytes if self.max_bytes is not None else -1,
            allow_direct=self.allow_direct,
            sources=[src.to_source(self.prefix) for src in self.sources] or None,
        )


@dataclass(frozen=True)
class ConsumerSpec:
    """How a durable pull consumer receives and redelivers.

    ``ack_wait``: seconds before an unacknowledged message is redelivered (handlers
    that run longer send progress acks). ``max_deliver``: deliveries before a
    failing message is dead-lettered. ``nak_backoff``: delays before redelivery
    after the 1st, 2nd, ... handler error (the last one repeats).
    ``max_in_flight``: messages handled concurrently by this process.
    """

    ack_wait: float = 30.0
    max_deliver: int = 5
    nak_backoff: tuple[float, ...] = (0.2, 1.0, 3.0, 5.0)
    max_in_flight: int = 128
    max_ack_pending: int = 2000
    pull_expires: float = 30.0
    idle_heartbeat: float = 1.0
    deliver_new: bool = False

    def __post_init__(self) -> None:
        if not self.ack_wait > 0:
            raise ConfigError("consumer.ack_wait", f"{self.ack_wait!r}: must be > 0 seconds")
        if self.max_deliver < 1:
            raise ConfigError("consumer.max_deliver", f"{self.max_deliver!r}: must be >= 1")
        if not self.nak_backoff or any(d < 0 for d in self.nak_backoff):
            raise ConfigError("consumer.nak_backoff", "expected one or more delays >= 0")
        if self.max_in_flight < 1:
            raise ConfigError("consumer.max_in_flight", f"{self.max_in_flight!r}: must be >= 1")
        if not 0 < self.idle_heartbeat < self.pull_expires:
            raise ConfigError(
                "consumer.idle_heartbeat", "must be > 0 and shorter than consumer.pull_expires"
            )

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: str = "consumer") -> ConsumerSpec:
        """Consumer settings from config (``{ack_wait: 30s, nak_backoff: [200ms, 1s]}``)."""
        durations = frozenset({"ack_wait", "nak_backoff", "pull_expires", "idle_heartbeat"})
        return _from_mapping(cls, doc, path, durations)  # type: ignore[no-any-return]

    def nak_delay(self, deliveries: int) -> float:
        """The redelivery delay after the ``deliveries``-th attempt failed."""
        return self.nak_backoff[min(max(deliveries, 1), len(self.nak_backoff)) - 1]


class EventBus:
    """A NATS connection with JetStream, publishing envelopes and running consumers."""

    def __init__(self, nc: NATS, *, source: str = "", publish_retry: float | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self._replies = _client.replies(nc)
        self.source = source
        # None: the library's retry window (MESHKIT_NATS_RETRY_WINDOW), read per publish.
        self.publish_retry = publish_retry
        self._listeners: list[Callable[[], None]] = []
        self._ensured: set[str] = set()
        self._consumers: list[PullConsumer] = []
        # Replicated streams with sources this bus ensured: their sources watched.
        self.source_watches: dict[str, cluster.SourceWatch] = {}

    @classmethod
    async def connect(
        cls,
        servers: str | Sequence[str],
        *,
        name: str = "meshkit",
        source: str | None = None,
        publish_retry: float | None = None,
        **options: Any,
    ) -> EventBus:
        """Connect (reconnecting forever) and return a bus publishing as ``source``.

        ``servers``: one URL, a list, or a cluster's servers in one comma-separated
        string (``"nats://a:4222,nats://b:4222"``, as ``NATS_URL`` holds it). nats-py
        tries them in turn, skipping dead ones, and learns the rest of the cluster
        from the server it reaches.
        """
        holder: list[EventBus] = []

        async def reconnected() -> None:
            log.info("%s reconnected to NATS", name)
            if holder:
                for listener in list(holder[0]._listeners):
                    listener()

        async def disconnected() -> None:
            log.info("%s disconnected from NATS", name)

        async def error(exc: Exception) -> None:
            log.debug("%s NATS error: %r", name, exc)

        opts: dict[str, Any] = {
            "name": name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "connect_timeout": 2,
            "ping_interval": 5,
            "max_outstanding_pings": 2,
            "reconnected_cb": reconnected,
            "disconnected_cb": disconnected,
            "error_cb": error,
        }
        opts.update(options)
        nc = await _client.connect(servers if isinstance(servers, str) else list(servers), **opts)
        bus = cls(nc, source=source if source is not None else name, publish_retry=publish_retry)
        holder.append(bus)
        return bus

    def on_reconnect(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after every reconnect; returns a function that unregisters it."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create the stream, or bring it up to ``spec``; safe to call from every process.

        An existing stream keeps what others gave it: subjects it has beyond the
        spec's stay, and replicas only go up (a spec leaving them to the default
        never scales a stream down; an explicit lower value is logged as a
        mismatch and not applied; see :func:`meshkit.saga.cluster.replicas_target`).
        The duplicate window, max age, direct gets and sources follow the spec.
        Lookups, creates and updates ride out cluster elections; a refusal (no
        placement for the replicas, say) raises
        :class:`~meshkit.saga.cluster.JetStreamAPIError` with the server's words.

        The event stores it sources from are created first when missing: a source
        the server cannot find yet is retried only every few seconds. A replicated
        stream with sources is watched from then on until :meth:`close`
        (:class:`~meshkit.saga.cluster.SourceWatch`, ``MESHKIT_NATS_SOURCE_STALL``):
        a source left stalled by a leader election is nudged.
        """
        for source in spec.sources:
            await EventStore(self.nc, source.store).ensure()
        config = spec.to_config()
        info = await cluster.stream_info_or_none(self.js, spec.name)
        if info is None:
            if await cluster.add_stream(self.js, config):
                log.info(
                    "created stream %s (%s, replicas %d)",
                    spec.name,
                    ", ".join(spec.subjects),
                    config.num_replicas,
                )
                self._ensured.add(spec.name)
                self._watch_sources(spec, config.num_replicas or 1)
                return
            # Another process created it between our lookup and our create (its
            # group may not have a leader yet: "not found" for a moment).
            info = await cluster.stream_info_existing(self.js, spec.name)
        current = info.config
        subjects = list(current.subjects or [])
        subjects += [s for s in spec.subjects if s not in subjects]
        have = current.num_replicas or 1
        raised = cluster.replicas_target(f"stream {spec.name}", have, spec.replicas)
        for setting, now, wanted in (
            ("storage", current.storage, config.storage),
            ("retention", current.retention, config.retention),
        ):
            if now != wanted:
                log.warning(
                    "stream %s: %s is %s on the server, the spec wants %s; "
                    "JetStream cannot change it in place, left as is",
                    spec.name,
                    setting,
                    getattr(now, "value", now),
                    getattr(wanted, "value", wanted),
                )
        if (
            subjects != list(current.subjects or [])
            or current.duplicate_window != spec.duplicate_window
            or (current.max_age or 0) != (spec.max_age or 0)
            or raised is not None
            or bool(current.allow_direct) != spec.allow_direct
            or _sources_key(current.sources) != _sources_key(config.sources)
        ):
            sources = config.sources
            if config.sources or current.sources:
                sources = await self._resumed_sources(
                    spec.name, current.sources or [], config.sources or []
                )
            # From the server's config: whatever else someone set there stays.
            update = dataclasses.replace(
                current,
                subjects=subjects,
                duplicate_window=spec.duplicate_window,
                max_age=spec.max_age,
                num_replicas=raised or have,
                allow_direct=spec.allow_direct,
                sources=sources,
            )
            await cluster.update_stream(self.js, update, f"updated stream {spec.name}")
        self._ensured.add(spec.name)
        self._watch_sources(spec, raised or have)

    def _watch_sources(self, spec: StreamSpec, replicas: int) -> None:
        """Watch a replicated stream's sources (:class:`~meshkit.saga.cluster.SourceWatch`):
        after a leader election one can stay stalled for ~45 s; the watch nudges it."""
        if not spec.sources or replicas < 2 or spec.name in self.source_watches:
            return
        watch = cluster.SourceWatch(self.nc, spec.name)
        if watch.stalled_after > 0:
            self.source_watches[spec.name] = watch.start()

    async def _resumed_sources(
        self, stream: str, current: list[api.StreamSource], wanted: list[api.StreamSource]
    ) -> list[api.StreamSource] | None:
        """``wanted``, each source continuing where the server's copy of it stands.

        nats-server copies a source whose filters changed from the origin's first
        message again. A source it has as wanted is kept as it is; one whose types
        changed starts after the last message already copied from its origin (so the
        newly listed types are copied from then on, and nothing is copied twice).
        """
        by_key = {_sources_key([c])[0]: c for c in current}
        by_name = {c.name: c for c in current}
        out: list[api.StreamSource] = []
        for want in wanted:
            same = by_key.get(_sources_key([want])[0])
            if same is not None:
                out.append(same)
                continue
            before = by_name.get(want.name)
            if before is not None:
                last = await self._last_copied(stream, before)
                if last:
                    want = dataclasses.replace(want, opt_start_seq=last + 1)
                    log.info(
                        "stream %s: the source %s changed; copying from its seq %d on",
                        stream,
                        want.name,
                        last + 1,
                    )
            out.append(want)
        return out or None

    async def _last_copied(self, stream: str, source: api.StreamSource) -> int:
        """The origin sequence of the newest message ``stream`` holds from ``source`` (0: none).

        Copies carry ``Nats-Stream-Source: <origin> <origin seq> ...``; the newest
        one is the last message of one of the subjects the source writes to.
        """
        newest = 0
        for transform in source.subject_transforms or []:
            info = await self.js.stream_info(stream, subjects_filter=transform.dest)
            for subject in info.state.subjects or {}:
                try:
                    raw = await self.js.get_msg(stream, subject=subject)
                except nats.js.errors.NotFoundError:
                    continue
                origin = (raw.headers or {}).get("Nats-Stream-Source", "").split()
                if (
                    len(origin) >= 2
                    and origin[0].split(":")[0] == source.name
                    and origin[1].isdigit()
                ):
                    newest = max(newest, int(origin[1]))
        return newest

    async def publish_raw(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str],
        *,
        ack_timeout: float = 5.0,
    ) -> api.PubAck:
        """Publish to JetStream, retrying while the server is unreachable or electing a
        stream leader (up to ``publish_retry`` seconds; None: the library's window,
        :func:`meshkit.saga.cluster.retry_window`), then raising
        :class:`~meshkit.saga.cluster.JetStreamUnavailable`. A retry carries the same
        headers, so its ``Nats-Msg-Id`` makes the stream keep one copy."""
        return await cluster.retrying(
            f"publishing to {subject}",
            lambda: self._replies.jetstream_publish(subject, payload, headers, ack_timeout),
            window=self.publish_retry,
            transient=_RETRYABLE_PUBLISH,
        )

    async def publish(
        self, stream: StreamSpec, event: Message, env: Envelope, *, ack_timeout: float = 5.0
    ) -> api.PubAck:
        """Publish ``event`` with ``env`` as headers on the stream's subject for its type."""
        subject = stream.subject_for(env.event_type)
        payload = event.SerializeToString()
        with _telemetry.producer_span(subject, env, len(payload)) as traced:
            return await self.publish_raw(
                subject, payload, traced.to_headers(), ack_timeout=ack_timeout
            )

    async def emit(
        self,
        stream: StreamSpec,
        event: Message,
        *,
        saga_id: str | None = None,
        saga_type: str = "",
        event_id: str | None = None,
        saga_timeout: float | None = None,
        source: str | None = None,
    ) -> Envelope:
        """Publish an event that starts (or joins) a saga; returns its envelope.

        ``saga_timeout`` (seconds) sets the saga's deadline; the propagated request
        deadline (:mod:`meshkit.deadline`) goes into the headers when there is one.
        """
        left = meshkit.deadline.remaining()
        env = Envelope.new(
            event,
            event_id=event_id,
            saga_id=saga_id,
            source=self.source if source is None else source,
            saga_type=saga_type,
            deadline_ms=int(left * 1000) if left is not None else None,
        )
        if saga_timeout is not None:
            env = dataclasses.replace(
                env, saga_deadline_ms=env.timestamp_ms + int(saga_timeout * 1000)
            )
        await self.publish(stream, event, env)
        return env

    def consumer(
        self,
        stream: StreamSpec | str,
        durable: str,
        handler: MessageHandler,
        *,
        filter_subjects: Sequence[str] = (),
        spec: ConsumerSpec | None = None,
    ) -> PullConsumer:
        """A durable pull consumer (not started) calling ``handler`` for each message.

        The handler acknowledges (``msg.ack()``, ``nak()``, ``term()``) itself; if it
        raises, the message is nak'ed with the spec's backoff.
        """
        name = stream if isinstance(stream, str) else stream.name
        consumer = PullConsumer(
            self, name, durable, handler, tuple(filter_subjects), spec or ConsumerSpec()
        )
        if isinstance(stream, StreamSpec):
            consumer.stream_spec = stream
        self._consumers.append(consumer)
        return consumer

    async def key_value(
        self,
        bucket: str,
        *,
        history: int = 1,
        storage: Literal["file", "memory"] = "file",
        replicas: int | None = None,
    ) -> Any:
        """The JetStream KV bucket, created when missing.

        ``replicas``: None takes ``MESHKIT_NATS_REPLICAS``; an existing bucket's
        replicas are raised to it, never lowered (:func:`meshkit.saga.cluster.ensure_key_value`).
        """
        return await cluster.ensure_key_value(
            self.js, bucket, history=history, storage=storage, replicas_=replicas
        )

    async def close(self) -> None:
        """Stop every consumer (draining in-flight work), then close the connection."""
        for watch in list(self.source_watches.values()):
            await watch.stop()
        self.source_watches.clear()
        for consumer in list(self._consumers):
            await consumer.stop()
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            with contextlib.suppress(Exception):
                await self.nc.close()


@dataclass
class ConsumerStats:
    """Counters of one pull consumer (for tests, the CLI and the bench)."""

    delivered: int = 0
    handled: int = 0
    errors: int = 0
    pulls: int = 0
    backoffs: int = 0
    recoveries: int = 0
    last_error: str = ""


class PullConsumer:
    """A durable JetStream pull consumer with a window of in-flight messages.

    See the module docstring for how it survives server restarts.
    """

    def __init__(
        self,
        bus: EventBus,
        stream: str,
        durable: str,
        handler: MessageHandler,
        filter_subjects: tuple[str, ...],
        spec: ConsumerSpec,
    ) -> None:
        if not _NAME.match(durable):
            raise ConfigError("consumer.durable", f"{durable!r} must match [A-Za-z0-9_-]+")
        self.bus = bus
        self.stream = stream
        # Known when built from a StreamSpec: a stream lost with a memory-storage
        # server is then declared again on recovery.
        self.stream_spec: StreamSpec | None = None
        self.durable = durable
        self.handler = handler
        self.filter_subjects = filter_subjects
        self.spec = spec
        self.stats = ConsumerStats()
        self._credits = 0
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None
        self._inbox = ""
        self._stopping = False
        self._started = False
        self._last_activity = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._recovering: asyncio.Task[None] | None = None
        self._remove_listener: Callable[[], None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # After a pull ends with an error status (503 while the consumer's leader is
        # elected, 409s), the next pull waits: doubling from 50 ms to 2 s, reset by
        # the next delivered message. Without it every 503 starts the next pull at
        # once (thousands of pulls and log lines a second).
        self._backoff = 0.0
        self._not_before = 0.0
        self._retry_handle: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _config(self) -> api.ConsumerConfig:
        subjects = list(self.filter_subjects)
        return api.ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.spec.ack_wait,
            max_deliver=self.spec.max_deliver,
            max_ack_pending=max(self.spec.max_ack_pending, self.spec.max_in_flight),
            deliver_policy=api.DeliverPolicy.NEW
            if self.spec.deliver_new
            else api.DeliverPolicy.ALL,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
        )

    async def ensure(self, *, window: float | None = 0.0) -> None:
        """Create or update the durable consumer on the server.

        ``window``: how long to ride out an election (None: the library's window,
        :func:`meshkit.saga.cluster.retry_window`; 0: one try). A refusal is a
        :class:`~meshkit.saga.cluster.JetStreamAPIError` with the server's description,
        except a missing stream (nats' ``NotFoundError``, which recovery handles).
        """
        what = f"creating consumer {self.durable} on stream {self.stream}"
        try:
            await cluster.retrying(
                what,
                lambda: self.bus.js.add_consumer(self.stream, self._config()),
                window=window,
            )
        except nats.js.errors.APIError as exc:
            if isinstance(exc, (nats.js.errors.NotFoundError, *cluster.TRANSIENT)):
                raise
            raise cluster.api_error(what, exc) from None

    async def start(self) -> PullConsumer:
        """Create the consumer if needed and start pulling."""
        if self._started:
            return self
        await self.ensure(window=None)
        self._inbox = self.bus.nc.new_inbox()
        self._sub = await self.bus.nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=-1)
        self._remove_listener = self.bus.on_reconnect(self._on_reconnect)
        self._started = True
        self._last_activity = time.monotonic()
        await self._pull()
        self._watchdog = asyncio.create_task(self._watch(), name=f"meshkit-watch-{self.durable}")
        log.debug("consumer %s on %s started", self.durable, self.stream)
        return self

    async def _pull(self) -> None:
        if self._stopping or not self._started or time.monotonic() < self._not_before:
            return
        limit = self.spec.max_in_flight
        want = limit - self._credits - self._in_flight
        # Ask in chunks of at least half the window, so requests stay few.
        if want <= 0 or (self._credits > 0 and want < max(1, limit // 2)):
            return
        request = {
            "batch": want,
            "expires": int(self.spec.pull_expires * 1e9),
            "idle_heartbeat": int(self.spec.idle_heartbeat * 1e9),
        }
        self._credits += want
        self.stats.pulls += 1
        try:
            await self.bus.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
                json.dumps(request).encode(),
                reply=self._inbox,
            )
        except Exception as exc:  # disconnected: the watchdog pulls again
            self._credits -= want
            log.debug("pull for %s failed: %r", self.durable, exc)

    async def _on_msg(self, msg: Msg) -> None:
        self._last_activity = time.monotonic()
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status:
            if status == "100":  # idle heartbeat
                return
            pending = headers.get("Nats-Pending-Messages") if headers else None
            if status in ("404", "408") and pending:
                self._credits = max(0, self._credits - int(pending))
            else:
                self._credits = 0
                if status not in ("404", "408"):
                    # Once per series of failed pulls: a leaderless consumer answers
                    # every pull at once, and each would be a log line.
                    log.log(
                        logging.DEBUG if self._backoff else logging.INFO,
                        "consumer %s: pull ended with %s %s",
                        self.durable,
                        status,
                        headers.get("Description", "") if headers else "",
                    )
                    if status == "409" and headers and "Deleted" in headers.get("Description", ""):
                        self._schedule_recover()
                        return
                    self._back_off()
                    return
            await self._pull()
            return
        self._backoff = 0.0
        self._credits = max(0, self._credits - 1)
        self.stats.delivered += 1
        if self._stopping:
            # Hand it back at once so another instance (or our next start) gets it.
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        self._in_flight += 1
        self._idle.clear()
        task = asyncio.create_task(self._run(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, msg: Msg) -> None:
        try:
            await self.handler(msg)
            self.stats.handled += 1
        except Exception as exc:
            self.stats.errors += 1
            self.stats.last_error = repr(exc)
            deliveries = 1
            with contextlib.suppress(Exception):
                deliveries = msg.metadata.num_delivered
            if deliveries >= self.spec.max_deliver:
                # The server will not deliver it again: say so loudly. Handlers that
                # must not lose a message dead-letter it themselves (participants do).
                log.error(
                    "consumer %s: handler failed on the last of %d deliveries of %s; "
                    "the message is dropped: %r",
                    self.durable,
                    deliveries,
                    msg.subject,
                    exc,
                )
            else:
                log.warning("consumer %s: handler failed: %r", self.durable, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.spec.nak_delay(deliveries))
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            await self._pull()

    def _back_off(self) -> None:
        """Pull again later, not at once (see ``_backoff``)."""
        self._backoff = min(self._backoff * 2 if self._backoff else 0.05, 2.0)
        self.stats.backoffs += 1
        self._not_before = time.monotonic() + self._backoff
        if self._retry_handle is None and not self._stopping:
            self._retry_handle = asyncio.get_running_loop().call_later(
                self._backoff, self._pull_later
            )

    def _pull_later(self) -> None:
        self._retry_handle = None
        if self._stopping:
            return
        task = asyncio.create_task(self._pull())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_reconnect(self) -> None:
        self._schedule_recover()

    def _schedule_recover(self) -> None:
        if self._stopping or (self._recovering is not None and not self._recovering.done()):
            return
        self._recovering = asyncio.create_task(self._recover())

    async def _recover(self) -> None:
        """Pull requests do not survive a server restart: re-create the consumer and pull again."""
        self.stats.recoveries += 1
        self._credits = 0
        try:
            try:
                await self.ensure()
            except nats.js.errors.NotFoundError:
                if self.stream_spec is None:
                    raise
                self.bus._ensured.discard(self.stream_spec.name)
                await self.bus.ensure_stream(self.stream_spec)
                await self.ensure()
        except Exception as exc:
            log.info("consumer %s: cannot re-create yet (%r); will retry", self.durable, exc)
            self._last_activity = time.monotonic()
            return
        self._last_activity = time.monotonic()
        await self._pull()

    async def _watch(self) -> None:
        hb = self.spec.idle_heartbeat
        while not self._stopping:
            await asyncio.sleep(hb)
            if self._stopping:
                return
            if self._credits == 0:
                await self._pull()
                continue
            if time.monotonic() - self._last_activity > 3 * hb:
                log.info(
                    "consumer %s: no heartbeat for %.1fs; re-issuing its pull", self.durable, 3 * hb
                )
                await self._recover()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop pulling, finish in-flight messages (up to ``grace`` seconds), unsubscribe."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._recovering is not None:
            self._recovering.cancel()
        if self._remove_listener is not None:
            self._remove_listener()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self._tasks:
            for task in list(self._tasks):
                task.cancel()
        with contextlib.suppress(Exception):
            await self.bus.nc.flush(timeout=2)  # the acks of drained work leave now
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        with contextlib.suppress(ValueError):
            self.bus._consumers.remove(self)
        log.debug("consumer %s stopped", self.durable)
