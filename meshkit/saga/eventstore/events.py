"""What the store keeps and answers: an aggregate's :class:`Version`, an event as
stored (:class:`StoredEvent`), what an append stored (:class:`AppendResult`), the
aggregate headers every event carries and the rules for the names in its subject
(``<prefix>.<event type token>.<aggregate type>.<id>``, :func:`type_token`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import Message

from meshkit.saga.envelope import Envelope
from meshkit.saga.eventstore.errors import EventStoreError

AGGREGATE_TYPE = "Meshkit-Aggregate-Type"
AGGREGATE_ID = "Meshkit-Aggregate-Id"
AGGREGATE_VERSION = "Meshkit-Aggregate-Version"
# The event's payload schema version; absent when it is 1.
SCHEMA_VERSION = "Meshkit-Schema-Version"


# Names in subjects: a stream, an aggregate type, an aggregate id, an event type
# (dot-separated tokens).
_NAME = re.compile(r"^[A-Za-z0-9_-]+\Z")
_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\Z")
_ID = re.compile(r"^[A-Za-z0-9_=-]+\Z")

# The subject layout of the store, in a stream's metadata under LAYOUT_KEY + prefix.
LAYOUT_KEY = "meshkit.eventstore."
LAYOUT = "type-first"
# Event type -> its subject token: few types, one per append.
_TYPE_TOKENS: dict[str, str] = {}


def type_token(event_type: str) -> str:
    """The event type as one subject token: ``shop.v1.OrderCreated`` ->
    ``shop:v1:OrderCreated``.

    One token, so an aggregate's filter is ``<prefix>.*.<aggregate type>.<id>``
    whatever its types' names; ``:`` cannot be part of a type's own tokens, so no
    two types share a token. The type leads the aggregate in the subject because
    nats-server serves a backlog to a consumer mixing several filters at a cost
    that grows with the subjects its wildcards walk: ``<prefix>.<token>.*.*``
    walks only that type's subjects, where ``<prefix>.*.*.<type>`` walked every
    aggregate's (``bench/bench_hosted_filters.py``).
    """
    token = _TYPE_TOKENS.get(event_type)
    if token is None:
        if not _TOKEN.match(event_type):
            raise ValueError(f"event type {event_type!r} must be dot-separated subject tokens")
        token = event_type.replace(".", ":")
        if len(_TYPE_TOKENS) < 4096:
            _TYPE_TOKENS[event_type] = token
    return token


def type_filter(prefix: str, event_type: str) -> str:
    """The subject filter matching a store's events of one type, any aggregate."""
    return f"{prefix}.{type_token(event_type)}.*.*"


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """An aggregate's version: how many events it has, and the stream sequence of the last.

    ``Version(0, 0)`` is an aggregate with no events yet.
    """

    number: int = 0
    seq: int = 0


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
            # <prefix>.<event type token>.<aggregate type>.<id>.
            parts = subject.split(".")
            if prefix and subject.startswith(prefix + "."):
                parts = parts[prefix.count(".") + 1 :]
            agg_type, agg_id = (parts[-2], parts[-1]) if len(parts) >= 3 else ("", subject)
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
