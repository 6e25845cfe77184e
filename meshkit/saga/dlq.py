"""The dead-letter subject: messages a consumer gave up on, with the reason.

A permanently failing message (undecodable payload, invalid envelope, a
validation failure, a handler's :class:`~meshkit.saga.PermanentError`, or max
deliveries reached) is terminated on its stream and republished to
``meshkit.dlq.<stream>.<consumer>`` as a ``meshkit.v1.DeadLetter`` holding the
reason, the consumer, the original subject, sequence, headers and payload.
``meshkit saga dlq list`` shows them; ``meshkit saga dlq replay`` republishes
the originals (their event ids unchanged, so inboxes still deduplicate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg

from meshkit._pb.meshkit.v1 import event_pb2
from meshkit.saga.bus import EventBus
from meshkit.saga.envelope import (
    EVENT_ID,
    EVENT_TYPE,
    MSG_ID,
    SAGA_ID,
    event_id_of,
    event_type_of,
    now_ms,
    pin_event_id,
    saga_id_of,
)
from meshkit.saga.streams import StreamSpec

__all__ = [
    "DLQ_STREAM",
    "DeadLetterEntry",
    "dead_letter",
    "dlq_subject",
    "list_dead_letters",
    "replay_dead_letters",
]

log = logging.getLogger("meshkit.saga.dlq")

DLQ_STREAM = StreamSpec(
    name="MESHKIT_DLQ", prefix="meshkit.dlq", description="meshkit dead letters"
)
REASON = "Meshkit-Dlq-Reason"
CONSUMER = "Meshkit-Dlq-Consumer"


def dlq_subject(stream: str, consumer: str) -> str:
    """The dead-letter subject for messages ``consumer`` on ``stream`` gave up on."""
    return f"{DLQ_STREAM.prefix}.{stream}.{consumer}"


async def dead_letter(
    bus: EventBus, msg: Msg, *, reason: str, consumer: str, replay_subject: str = ""
) -> None:
    """Republish ``msg`` to the dead-letter subject with ``reason``, then terminate it.

    ``replay_subject``: where a replay is to publish it, when not on its own subject
    (an event store's event, read from the aggregate's subject: a replay goes to the
    saga subject of its type instead of appending to the aggregate)."""
    if DLQ_STREAM.name not in bus._ensured:
        await bus.ensure_stream(DLQ_STREAM)
    md: Any = None
    try:
        md = msg.metadata
    except Exception:  # not a JetStream message (tests publish core NATS too)
        md = None
    stream = md.stream if md is not None else ""
    seq = md.sequence.stream if md is not None else 0
    headers = dict(msg.headers or {})
    letter = event_pb2.DeadLetter(
        reason=reason,
        consumer=consumer,
        stream=stream,
        subject=msg.subject,
        stream_sequence=seq,
        deliveries=md.num_delivered if md is not None else 0,
        headers=headers,
        payload=msg.data,
        replay_subject=replay_subject if replay_subject != msg.subject else "",
    )
    letter.dead_at.FromMilliseconds(now_ms())
    out_headers = {
        MSG_ID: f"dlq-{stream}-{seq}-{consumer}",
        REASON: reason[:500].replace("\r", " ").replace("\n", " "),
        CONSUMER: consumer,
    }
    if event_id_of(headers):
        out_headers[EVENT_ID] = event_id_of(headers)
    # The dead letter's own headers name the event's type and saga one per header
    # (whatever layout its envelope had), so its stream can be filtered and read.
    for key, value in ((EVENT_TYPE, event_type_of(headers)), (SAGA_ID, saga_id_of(headers))):
        if value:
            out_headers[key] = value
    await bus.publish_raw(
        dlq_subject(stream or "unknown", consumer), letter.SerializeToString(), out_headers
    )
    log.warning("dead-lettered %s seq %s for %s: %s", msg.subject, seq, consumer, reason)
    if md is not None:
        await msg.term()


@dataclass(frozen=True)
class DeadLetterEntry:
    """One dead letter and its sequence in the dead-letter stream."""

    seq: int
    letter: Any  # meshkit.v1.DeadLetter

    @property
    def event_type(self) -> str:
        return event_type_of(self.letter.headers)

    @property
    def event_id(self) -> str:
        return event_id_of(self.letter.headers)


async def list_dead_letters(
    bus: EventBus, *, stream: str | None = None, consumer: str | None = None, limit: int = 1000
) -> list[DeadLetterEntry]:
    """Dead letters, oldest first, optionally for one stream and/or consumer."""
    try:
        info = await bus.js.stream_info(DLQ_STREAM.name)
    except nats.js.errors.NotFoundError:
        return []
    entries: list[DeadLetterEntry] = []
    if not info.state.messages:
        # A new, empty stream reports first_seq 0, and JetStream rejects a get of seq 0.
        return entries
    first, last = max(info.state.first_seq, 1), info.state.last_seq
    for seq in range(first, last + 1):
        if len(entries) >= limit:
            break
        try:
            raw = await bus.js.get_msg(DLQ_STREAM.name, seq)
        except nats.js.errors.NotFoundError:
            continue
        letter = event_pb2.DeadLetter()
        letter.ParseFromString(raw.data or b"")
        if stream and letter.stream != stream:
            continue
        if consumer and letter.consumer != consumer:
            continue
        entries.append(DeadLetterEntry(seq, letter))
    return entries


async def replay_dead_letters(
    bus: EventBus,
    *,
    seqs: list[int] | None = None,
    stream: str | None = None,
    consumer: str | None = None,
    delete: bool = True,
) -> list[DeadLetterEntry]:
    """Republish dead letters to their original subjects (an event store's event: to
    the saga subject of its type, its ``replay_subject``); returns those replayed.

    The original headers go out unchanged except the server's ``Nats-*`` ones: a new
    ``Nats-Msg-Id`` (the original would be dropped as a duplicate inside the window),
    and no ``Nats-Expected-*`` condition of the original publish or ``Nats-Stream-Source``
    stamp of a copy. Replayed letters are deleted from the dead-letter stream unless
    ``delete=False``.
    """
    entries = await list_dead_letters(bus, stream=stream, consumer=consumer)
    if seqs is not None:
        wanted = set(seqs)
        entries = [e for e in entries if e.seq in wanted]
    done: list[DeadLetterEntry] = []
    for entry in entries:
        letter = entry.letter
        # The replay's Nats-Msg-Id is new (the original would be dropped as a
        # duplicate): its event id, which inboxes dedupe on, goes in Meshkit-Event-Id.
        pinned = pin_event_id(dict(letter.headers))
        headers = {k: v for k, v in pinned.items() if not k.startswith("Nats-")}
        base = headers.get(EVENT_ID) or str(letter.stream_sequence)
        headers[MSG_ID] = f"{base}:replay:{entry.seq}"
        subject = letter.replay_subject or letter.subject
        await bus.publish_raw(subject, bytes(letter.payload), headers)
        if delete:
            await bus.js.delete_msg(DLQ_STREAM.name, entry.seq)
        done.append(entry)
    return done
