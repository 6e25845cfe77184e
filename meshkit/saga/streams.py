"""What a saga's streams and consumers look like: :class:`StreamSpec`,
:class:`ConsumerSpec`, :class:`EventStoreSource` (an event store whose events
nats-server copies into a stream) and :class:`HostedStore` (an event store kept in the
saga stream itself), each readable from a config mapping with errors that name the
key."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf.message import Message
from nats.js import api

from meshkit.errors import ConfigError
from meshkit.saga import cluster
from meshkit.saga.envelope import type_name
from meshkit.saga.eventstore import EventStoreConfig
from meshkit.saga.eventstore.events import type_filter

__all__ = ["ConsumerSpec", "EventStoreSource", "HostedStore", "StreamSpec"]

_NAME = re.compile(r"^[A-Za-z0-9_-]+\Z")
_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\Z")


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


def _type_names(types: Any, path: str) -> tuple[str, ...]:
    """Event types (full protobuf names or message classes) as names, checked."""
    if isinstance(types, (str, Mapping)) or not isinstance(types, Iterable):
        raise ConfigError(path, "expected a list of event types")
    names: list[str] = []
    for i, t in enumerate(types):
        if isinstance(t, type) and issubclass(t, Message):
            t = type_name(t)
        if not isinstance(t, str) or not _TOKEN.match(t):
            raise ConfigError(
                f"{path}[{i}]", f"{t!r}: expected an event type (dot-separated subject tokens)"
            )
        names.append(t)
    return tuple(names)


def _store_from_dict(doc: Mapping[str, Any], path: str) -> tuple[EventStoreConfig, tuple[str, ...]]:
    """An event store and event types from config (``{stream, prefix, types, storage,
    replicas, duplicate_window}``); errors name the key under ``path``."""
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
    names = _type_names(types, f"{path}.types")
    try:
        store = EventStoreConfig(
            stream=doc["stream"], prefix=doc.get("prefix") or "", **store_options
        )
    except ConfigError as exc:
        # EventStoreConfig names "eventstore.<key>": re-rooted at ``path``.
        raise ConfigError(
            path + exc.path[exc.path.index(".") :], str(exc).split(": ", 1)[1]
        ) from None
    return store, names


@dataclass(frozen=True)
class EventStoreSource:
    """An event store whose events nats-server copies into a stream (stream sourcing).

    Each event of the listed ``types`` (full protobuf names or message classes; every
    type when empty), stored on ``<store prefix>.<type token>.<aggregate>.<id>``, lands on
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
        object.__setattr__(self, "types", _type_names(self.types, "source.types"))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: str = "source") -> EventStoreSource:
        """A source in config: ``{stream: ORDERS, prefix: orders, types: [shop.v1.OrderCreated]}``.

        ``storage``, ``replicas`` and ``duplicate_window`` describe the store as its
        owner declares it, for when this side creates it first.
        """
        return cls(*_store_from_dict(doc, path))

    def to_source(self, prefix: str) -> api.StreamSource:
        """The JetStream source for a stream whose events sit under ``prefix``."""
        head = self.store.subject_prefix
        # A type's token back into its name: split on the ':' it put for each '.'.
        pairs = [(type_filter(head, t), f"{prefix}.{t}") for t in self.types] or [
            (f"{head}.*.*.*", f"{prefix}.{{{{split(1,:)}}}}")
        ]
        return api.StreamSource(
            name=self.store.stream,
            subject_transforms=[api.SubjectTransform(src=a, dest=b) for a, b in pairs],
        )


@dataclass(frozen=True)
class HostedStore:
    """An event store kept in the saga stream itself: its events are saga events with
    no copy to make.

    The store (its ``stream`` is the saga stream's name) appends on
    ``<store prefix>.<type token>.<aggregate>.<id>``, a subject space of the saga stream
    beside ``<prefix>.>``; participants of the events of the listed ``types`` (every
    type when empty) filter on those subjects too, and get each event straight from
    the append: no server-side copy (:class:`EventStoreSource`), so each event is
    stored once, without a ``Nats-Stream-Source`` header, and reaches its consumers
    without the copy's delay. The store is the outbox: an append is the only write.

    What it asks of the stream: limits retention and no age, count or size limit
    (an aggregate is its events; none may expire), and the store's storage. An
    event of a listed type published through the bus (a dead letter's replay, say)
    goes to ``<prefix>.<type>`` as any event, where the participants' filters find it
    as well. :meth:`EventBus.ensure_stream` gives the stream the store's subjects,
    then ensures the store (direct gets, atomic batches where the server has them).

    A cost to know: a participant's filters then mix literal saga subjects with the
    store's ``<prefix>.<type token>.*.*``, and nats-server serves a *backlog* to a
    consumer with several filters at a cost per message that grows with the subjects
    its wildcards walk: here the aggregates with events of the participant's types
    (``bench/bench_hosted_filters.py``; a caught-up consumer is not affected, and the
    type-first layout keeps the walk to those types' subjects). With very many
    aggregates and participants that may fall far behind, copy the store instead
    (:class:`EventStoreSource`).
    """

    store: EventStoreConfig
    types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "types", _type_names(self.types, "hosted_store.types"))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: str = "hosted_store") -> HostedStore:
        """A hosted store in config: ``{stream: SHOP, prefix: shop_orders, types: [...]}``."""
        return cls(*_store_from_dict(doc, path))

    @property
    def subjects(self) -> str:
        """Where the store's events are, in the saga stream."""
        return f"{self.store.subject_prefix}.>"

    def holds(self, event_type: str) -> bool:
        """Whether events of this type may come from the store."""
        return not self.types or event_type in self.types

    def filter_for(self, event_type: str) -> str:
        """The consumer filter for this type's events from the store, any aggregate."""
        return type_filter(self.store.subject_prefix, event_type)


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
    (:class:`EventStoreSource`). ``hosted_stores``: event stores kept in this stream
    (:class:`HostedStore`), whose events consumers filter on where the store put them.
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
    hosted_stores: tuple[HostedStore, ...] = ()

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
        object.__setattr__(self, "hosted_stores", self._check_hosted())
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

    def _check_hosted(self) -> tuple[HostedStore, ...]:
        value = self.hosted_stores
        if isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
            raise ConfigError("stream.hosted_stores", "expected a list of hosted event stores")
        hosted: list[HostedStore] = []
        for i, item in enumerate(value):
            path = f"stream.hosted_stores[{i}]"
            if isinstance(item, Mapping):
                item = HostedStore.from_dict(item, path)
            elif not isinstance(item, HostedStore):
                raise ConfigError(
                    path, f"{item!r}: expected a hosted store {{stream, prefix, types}}"
                )
            store = item.store
            if store.stream != self.name:
                raise ConfigError(
                    f"{path}.stream",
                    f"{store.stream!r}: a hosted store lives in this stream, {self.name!r}",
                )
            taken = [self.prefix, *(h.store.subject_prefix for h in hosted)]
            for other in taken:
                a, b = sorted((store.subject_prefix, other), key=len)
                if b == a or b.startswith(a + "."):
                    raise ConfigError(
                        f"{path}.prefix",
                        f"{store.subject_prefix!r} overlaps {other!r}: the store's subjects "
                        "must not be another's",
                    )
            if store.storage != self.storage:
                raise ConfigError(
                    f"{path}.storage",
                    f"{store.storage!r}: the stream's storage is {self.storage!r}",
                )
            hosted.append(item)
        if hosted and not self.allow_direct:
            raise ConfigError(
                "stream.allow_direct", "a stream hosting an event store needs direct gets"
            )
        if hosted:
            # An aggregate is its events: none may be dropped by a limit.
            if self.retention != "limits":
                raise ConfigError(
                    "stream.retention",
                    f"{self.retention!r}: a stream hosting an event store keeps every event "
                    "(limits retention, no limit set)",
                )
            for key in ("max_age", "max_msgs", "max_bytes"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"stream.{key}",
                        "a stream hosting an event store keeps every event; leave it unset",
                    )
        return tuple(hosted)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: str = "stream") -> StreamSpec:
        """A stream declared in config (``{name: SHOP, prefix: shop.events, duplicate_window: 2m}``)."""
        return _from_mapping(cls, doc, path, frozenset({"duplicate_window", "max_age"}))  # type: ignore[no-any-return]

    @property
    def subjects(self) -> tuple[str, ...]:
        return (
            f"{self.prefix}.>",
            *self.extra_subjects,
            *(h.subjects for h in self.hosted_stores),
        )

    @property
    def event_subjects(self) -> tuple[str, ...]:
        """Where this stream's saga events are: ``<prefix>.>`` and the hosted stores'."""
        return (f"{self.prefix}.>", *(h.subjects for h in self.hosted_stores))

    def subject_for(self, event: Message | type[Message] | str) -> str:
        """The subject events of this type are published on (through the bus)."""
        name = event if isinstance(event, str) else type_name(event)
        return f"{self.prefix}.{name}"

    def filters_for(self, event: Message | type[Message] | str) -> tuple[str, ...]:
        """The consumer filters that find every event of this type: its subject, and
        where a hosted store appends it."""
        name = event if isinstance(event, str) else type_name(event)
        return (
            f"{self.prefix}.{name}",
            *(h.filter_for(name) for h in self.hosted_stores if h.holds(name)),
        )

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
    ``batch_overlap`` (consumers with a batch handler, such as participants): a batch
    starts when the one before it ends, with every message that arrived meanwhile
    (fewer, larger batches: one transaction and one round of publishes for all of
    them); once a batch has run this many seconds, the next starts beside it, so a
    slow handler holds the others up for at most that long (0: no waiting).
    """

    ack_wait: float = 30.0
    max_deliver: int = 5
    nak_backoff: tuple[float, ...] = (0.2, 1.0, 3.0, 5.0)
    max_in_flight: int = 128
    max_ack_pending: int = 2000
    pull_expires: float = 30.0
    idle_heartbeat: float = 1.0
    deliver_new: bool = False
    batch_overlap: float = 0.02

    def __post_init__(self) -> None:
        if not self.ack_wait > 0:
            raise ConfigError("consumer.ack_wait", f"{self.ack_wait!r}: must be > 0 seconds")
        if self.max_deliver < 1:
            raise ConfigError("consumer.max_deliver", f"{self.max_deliver!r}: must be >= 1")
        if not self.nak_backoff or any(d < 0 for d in self.nak_backoff):
            raise ConfigError("consumer.nak_backoff", "expected one or more delays >= 0")
        if self.max_in_flight < 1:
            raise ConfigError("consumer.max_in_flight", f"{self.max_in_flight!r}: must be >= 1")
        if not self.batch_overlap >= 0:
            raise ConfigError(
                "consumer.batch_overlap", f"{self.batch_overlap!r}: must be >= 0 seconds"
            )
        if not 0 < self.idle_heartbeat < self.pull_expires:
            raise ConfigError(
                "consumer.idle_heartbeat", "must be > 0 and shorter than consumer.pull_expires"
            )

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: str = "consumer") -> ConsumerSpec:
        """Consumer settings from config (``{ack_wait: 30s, nak_backoff: [200ms, 1s]}``)."""
        durations = frozenset(
            {"ack_wait", "nak_backoff", "pull_expires", "idle_heartbeat", "batch_overlap"}
        )
        return _from_mapping(cls, doc, path, durations)  # type: ignore[no-any-return]

    def nak_delay(self, deliveries: int) -> float:
        """The redelivery delay after the ``deliveries``-th attempt failed."""
        return self.nak_backoff[min(max(deliveries, 1), len(self.nak_backoff)) - 1]
