"""The event envelope: the metadata every saga event carries as NATS headers.

The payload is the protobuf message alone; everything else travels in headers,
so tools can route, deduplicate and trace an event without decoding it:

====================== ============================================================
``Nats-Msg-Id``        unique id of this event: JetStream drops a duplicate within its window
``Meshkit-Envelope``   the rest of the envelope in one header, fields separated by ``;``:
                       ``1;<event type>;<saga id>;<saga type>;<causation id>;<timestamp
                       ms>;<source>[;<deadline ms>;<saga deadline ms>]``
``Meshkit-Event-Id``   the event id, where it differs from ``Nats-Msg-Id`` (a dead letter,
                       a replay); absent otherwise (:func:`event_id_of` reads either)
``traceparent``        W3C trace context (and ``tracestate``), under their own names
====================== ============================================================

The fields of ``Meshkit-Envelope``, in order: the version of this layout (``1``); the
protobuf full name (``shop.v1.OrderCreated``); the saga id (every event of one saga
carries the same); which saga definition it is (``order``); the id of the event whose
handler emitted this one; when it was published, Unix epoch milliseconds; the
participant or service that published it; then, when there is one, the remaining time
of the request that led here (ms) and when the whole saga times out (Unix epoch ms).
Empty fields stay empty; trailing ones are left off. Fields are only ever appended
(readers skip fields they do not know); another first field is a layout this
release does not read, refused with an error naming the header.

One header instead of one per field: every event is stored with its headers, handed
to every consumer and parsed there, and header names cost bytes and a lookup each
(a stock nats-py client parses this envelope in a third of the time it took as eight
headers). An event whose text fields hold a ``;`` is written with one header per field
instead (``Meshkit-Event-Type``, ``Meshkit-Saga-Id``, ``Meshkit-Saga-Type``,
``Meshkit-Causation-Id``, ``Meshkit-Timestamp``, ``Meshkit-Source``,
``Meshkit-Deadline-Ms``, ``Meshkit-Saga-Deadline``), the layout of earlier releases,
which readers keep reading: event stores and dead letters hold events written that way.

Output ids are deterministic (:func:`derive_event_id`): a handler that runs twice
for the same input emits events with the same ids, which JetStream deduplicates.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from google.protobuf.message import Message

from meshkit.errors import MeshkitError

__all__ = [
    "CAUSATION_ID",
    "DEADLINE",
    "ENVELOPE",
    "EVENT_ID",
    "EVENT_TYPE",
    "MSG_ID",
    "SAGA_DEADLINE",
    "SAGA_ID",
    "SAGA_TYPE",
    "SOURCE",
    "TIMESTAMP",
    "TRACEPARENT",
    "TRACESTATE",
    "Envelope",
    "EnvelopeError",
    "derive_event_id",
    "event_id_of",
    "event_type_of",
    "new_event_id",
    "pin_event_id",
    "saga_id_of",
    "type_name",
]

MSG_ID = "Nats-Msg-Id"
ENVELOPE = "Meshkit-Envelope"
EVENT_ID = "Meshkit-Event-Id"
EVENT_TYPE = "Meshkit-Event-Type"
SAGA_ID = "Meshkit-Saga-Id"
SAGA_TYPE = "Meshkit-Saga-Type"
CAUSATION_ID = "Meshkit-Causation-Id"
TIMESTAMP = "Meshkit-Timestamp"
SOURCE = "Meshkit-Source"
DEADLINE = "Meshkit-Deadline-Ms"
SAGA_DEADLINE = "Meshkit-Saga-Deadline"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# The per-field headers above (event type to saga deadline) are the layout of earlier
# releases, still read and still written for an event a ";" keeps out of ENVELOPE.

_KNOWN = frozenset(
    {
        MSG_ID,
        ENVELOPE,
        EVENT_ID,
        EVENT_TYPE,
        SAGA_ID,
        SAGA_TYPE,
        CAUSATION_ID,
        TIMESTAMP,
        SOURCE,
        DEADLINE,
        SAGA_DEADLINE,
        TRACEPARENT,
        TRACESTATE,
    }
)

# The first field of ENVELOPE: the layout of the fields after it.
_LAYOUT = "1"
_LAYOUT_TEXT = (
    "1;<event type>;<saga id>;<saga type>;<causation id>;<timestamp ms>;<source>"
    "[;<deadline ms>;<saga deadline ms>]"
)

# A fixed personalization so derived ids are the same in every process and release.
_PERSON = b"meshkit-event-id"


class EnvelopeError(MeshkitError, ValueError):
    """An event's headers are missing or malformed; ``header`` names the culprit."""

    code = "INVALID_ARGUMENT"

    def __init__(self, header: str, message: str) -> None:
        super().__init__(f"header {header}: {message}")
        self.header = header


def event_id_of(headers: Mapping[str, str]) -> str:
    """The id of the event with these headers: ``Meshkit-Event-Id``, else ``Nats-Msg-Id``
    (where the two are the same, only the latter is sent); "" when neither is there."""
    return headers.get(EVENT_ID) or headers.get(MSG_ID) or ""


def event_type_of(headers: Mapping[str, str]) -> str:
    """The event type named by these headers, in either layout; "" when there is none.
    Cheaper than :meth:`Envelope.from_headers` where only the type matters."""
    compact = headers.get(ENVELOPE)
    if compact is None:
        return headers.get(EVENT_TYPE, "")
    fields = compact.split(";", 3)
    return fields[1] if len(fields) > 2 and fields[0] == _LAYOUT else ""


def saga_id_of(headers: Mapping[str, str]) -> str:
    """The saga id named by these headers, in either layout; "" when there is none."""
    compact = headers.get(ENVELOPE)
    if compact is None:
        return headers.get(SAGA_ID, "")
    fields = compact.split(";", 4)
    return fields[2] if len(fields) > 3 and fields[0] == _LAYOUT else ""


def pin_event_id(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` with the event id in ``Meshkit-Event-Id``, before something replaces
    or drops their ``Nats-Msg-Id`` (a dead letter, a replay, a copy); returns them."""
    if not headers.get(EVENT_ID) and headers.get(MSG_ID):
        headers[EVENT_ID] = headers[MSG_ID]
    return headers


def new_event_id() -> str:
    """A fresh random event id (32 hex digits)."""
    return uuid.uuid4().hex


def derive_event_id(input_id: str, handler: str, index: int) -> str:
    """The id of output ``index`` of ``handler`` for input event ``input_id``.

    Deterministic, so a redelivered input yields outputs with the same ids and
    JetStream's duplicate window (and every consumer's inbox) drops the copies.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, not {index}")
    key = f"{input_id}\x1f{handler}\x1f{index}".encode()
    return hashlib.blake2b(key, digest_size=16, person=_PERSON).hexdigest()


def type_name(message: Message | type[Message]) -> str:
    """The protobuf full name of a message or message class (``shop.v1.OrderCreated``)."""
    return str(message.DESCRIPTOR.full_name)


def now_ms() -> int:
    """Wall-clock Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


_new = object.__new__
_set = object.__setattr__


@dataclass(frozen=True, slots=True)
class Envelope:
    """An event's metadata (everything but the payload)."""

    event_id: str
    event_type: str
    saga_id: str = ""
    causation_id: str = ""
    timestamp_ms: int = 0
    source: str = ""
    saga_type: str = ""
    deadline_ms: int | None = None
    saga_deadline_ms: int | None = None
    traceparent: str = ""
    tracestate: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def _of(
        cls,
        event_id: str,
        event_type: str,
        saga_id: str,
        causation_id: str,
        timestamp_ms: int,
        source: str,
        saga_type: str,
        deadline_ms: int | None,
        saga_deadline_ms: int | None,
        traceparent: str,
        tracestate: str,
        extra: Mapping[str, str],
    ) -> Envelope:
        """The dataclass's ``__init__`` by position, for the paths every event takes (a
        parse, a caused event): half its cost, which goes to a frozen dataclass's
        per-field ``object.__setattr__`` lookups and keyword passing. Every field,
        in order (tests/unit/test_saga_envelope.py holds it to the ``__init__``)."""
        env = _new(cls)
        _set(env, "event_id", event_id)
        _set(env, "event_type", event_type)
        _set(env, "saga_id", saga_id)
        _set(env, "causation_id", causation_id)
        _set(env, "timestamp_ms", timestamp_ms)
        _set(env, "source", source)
        _set(env, "saga_type", saga_type)
        _set(env, "deadline_ms", deadline_ms)
        _set(env, "saga_deadline_ms", saga_deadline_ms)
        _set(env, "traceparent", traceparent)
        _set(env, "tracestate", tracestate)
        _set(env, "extra", extra)
        return env

    @classmethod
    def new(
        cls,
        event: Message | type[Message] | str,
        *,
        event_id: str | None = None,
        saga_id: str | None = None,
        causation_id: str = "",
        source: str = "",
        saga_type: str = "",
        deadline_ms: int | None = None,
        saga_deadline_ms: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Envelope:
        """An envelope for a new event; a new saga id when none is given."""
        etype = event if isinstance(event, str) else type_name(event)
        eid = event_id or new_event_id()
        return cls(
            event_id=eid,
            event_type=etype,
            saga_id=saga_id or eid,
            causation_id=causation_id,
            timestamp_ms=now_ms() if timestamp_ms is None else timestamp_ms,
            source=source,
            saga_type=saga_type,
            deadline_ms=deadline_ms,
            saga_deadline_ms=saga_deadline_ms,
        )

    def caused(
        self,
        event: Message | type[Message] | str,
        *,
        event_id: str,
        source: str,
        deadline_ms: int | None = None,
    ) -> Envelope:
        """The envelope of an event emitted in reaction to this one.

        Correlation (saga id, saga type, saga deadline) and the trace context
        flow on; causation points at this event. With tracing on, the producer
        span replaces the trace context at publish time.
        """
        etype = event if isinstance(event, str) else type_name(event)
        return Envelope._of(
            event_id,
            etype,
            self.saga_id,
            self.event_id,
            now_ms(),
            source,
            self.saga_type,
            deadline_ms,
            self.saga_deadline_ms,
            self.traceparent,
            self.tracestate,
            {},
        )

    def with_trace(self, traceparent: str, tracestate: str = "") -> Envelope:
        if traceparent == self.traceparent and tracestate == self.tracestate:
            return self
        return replace(self, traceparent=traceparent, tracestate=tracestate)

    def remaining_deadline(self, now: int | None = None) -> float | None:
        """Seconds left of the propagated request deadline at ``now`` (epoch ms), or None."""
        if self.deadline_ms is None:
            return None
        elapsed = max(0, (now_ms() if now is None else now) - self.timestamp_ms)
        return max(0.0, (self.deadline_ms - elapsed) / 1000.0)

    def to_headers(self) -> dict[str, str]:
        """The NATS headers for this envelope, ``Nats-Msg-Id`` (the event id) included."""
        h = dict(self.extra) if self.extra else {}
        h[MSG_ID] = self.event_id
        if (
            ";"
            in f"{self.event_type}{self.saga_id}{self.saga_type}{self.causation_id}{self.source}"
        ):
            self._per_field_headers(h)
        else:
            value = (
                f"{_LAYOUT};{self.event_type};{self.saga_id};{self.saga_type};"
                f"{self.causation_id};{self.timestamp_ms};{self.source}"
            )
            if self.saga_deadline_ms is not None:
                deadline = "" if self.deadline_ms is None else self.deadline_ms
                value = f"{value};{deadline};{self.saga_deadline_ms}"
            elif self.deadline_ms is not None:
                value = f"{value};{self.deadline_ms}"
            h[ENVELOPE] = value
        if self.traceparent:
            h[TRACEPARENT] = self.traceparent
        if self.tracestate:
            h[TRACESTATE] = self.tracestate
        return h

    def _per_field_headers(self, h: dict[str, str]) -> None:
        """The earlier releases' layout, one header per field (into ``h``)."""
        h[EVENT_TYPE] = self.event_type
        h[TIMESTAMP] = str(self.timestamp_ms)
        if self.saga_id:
            h[SAGA_ID] = self.saga_id
        if self.saga_type:
            h[SAGA_TYPE] = self.saga_type
        if self.causation_id:
            h[CAUSATION_ID] = self.causation_id
        if self.source:
            h[SOURCE] = self.source
        if self.deadline_ms is not None:
            h[DEADLINE] = str(self.deadline_ms)
        if self.saga_deadline_ms is not None:
            h[SAGA_DEADLINE] = str(self.saga_deadline_ms)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None) -> Envelope:
        """Parse headers (either layout); raises :class:`EnvelopeError` naming the bad
        header."""
        if not headers:
            raise EnvelopeError(EVENT_ID, "missing (the message has no headers)")
        event_id = event_id_of(headers)
        if not event_id:
            raise EnvelopeError(EVENT_ID, "missing")
        # Most events carry no header of their own: a set difference finds that out
        # without building a dict.
        extra = (
            {k: v for k, v in headers.items() if k not in _KNOWN} if headers.keys() - _KNOWN else {}
        )
        compact = headers.get(ENVELOPE)
        if compact is not None:
            return cls._from_compact(compact, event_id, headers, extra)
        event_type = headers.get(EVENT_TYPE, "")
        if not event_type:
            raise EnvelopeError(EVENT_TYPE, "missing")
        return cls(
            event_id=event_id,
            event_type=event_type,
            saga_id=headers.get(SAGA_ID, ""),
            causation_id=headers.get(CAUSATION_ID, ""),
            timestamp_ms=_int(headers, TIMESTAMP, 0) or 0,
            source=headers.get(SOURCE, ""),
            saga_type=headers.get(SAGA_TYPE, ""),
            deadline_ms=_int(headers, DEADLINE, None),
            saga_deadline_ms=_int(headers, SAGA_DEADLINE, None),
            traceparent=headers.get(TRACEPARENT, ""),
            tracestate=headers.get(TRACESTATE, ""),
            extra=extra,
        )

    @classmethod
    def _from_compact(
        cls, value: str, event_id: str, headers: Mapping[str, str], extra: Mapping[str, str]
    ) -> Envelope:
        fields = value.split(";")
        if fields[0] != _LAYOUT:
            raise EnvelopeError(
                ENVELOPE,
                f"layout {fields[0]!r} is not one this release reads (it reads {_LAYOUT}: "
                f"{_LAYOUT_TEXT}), in {value!r}",
            )
        if len(fields) < 7:
            raise EnvelopeError(
                ENVELOPE, f"{len(fields)} fields, expected at least 7 ({_LAYOUT_TEXT}): {value!r}"
            )
        if not fields[1]:
            raise EnvelopeError(ENVELOPE, f"the event type (field 2) is empty: {value!r}")
        n = len(fields)
        return cls._of(
            event_id,
            fields[1],
            fields[2],
            fields[4],
            _field(fields, 5, "timestamp ms", value) or 0,
            fields[6],
            fields[3],
            _field(fields, 7, "deadline ms", value) if n > 7 else None,
            _field(fields, 8, "saga deadline ms", value) if n > 8 else None,
            headers.get(TRACEPARENT, ""),
            headers.get(TRACESTATE, ""),
            extra,
        )

    def to_metadata(self) -> Any:
        """This envelope as a ``meshkit.v1.EventMetadata`` message."""
        from meshkit._pb.meshkit.v1 import event_pb2

        md = event_pb2.EventMetadata(
            event_id=self.event_id,
            event_type=self.event_type,
            saga_id=self.saga_id,
            causation_id=self.causation_id,
            traceparent=self.traceparent,
            tracestate=self.tracestate,
            deadline_ms=self.deadline_ms or 0,
            source=self.source,
        )
        md.occurred_at.FromMilliseconds(self.timestamp_ms)
        return md


def _int(headers: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = headers.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise EnvelopeError(name, f"expected an integer, got {raw!r}") from None


def _field(fields: list[str], index: int, name: str, value: str) -> int | None:
    raw = fields[index]
    if raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise EnvelopeError(
            ENVELOPE, f"{name} (field {index + 1}): expected an integer, got {raw!r} in {value!r}"
        ) from None
