"""An append's events on the wire: JetStream's control headers and error codes,
one publish per event each expecting the previous, or one atomic batch (ADR-50),
the server's acknowledgement read back, and which nats-server has which of these.

:func:`publish_chain` and :func:`publish_batch` send through an
:class:`~meshkit.saga.eventstore.store.EventStore`'s ``_request`` and ``_publish``
(:func:`request` and :func:`publish` on its connection).
"""

from __future__ import annotations

import contextlib
import json
import re
import typing
import uuid
from collections.abc import Mapping

import nats.errors
from nats.aio.client import Client as NATS

from meshkit.saga import _client
from meshkit.saga.eventstore.errors import EventStoreError, EventStoreUnavailable
from meshkit.saga.eventstore.events import Version

if typing.TYPE_CHECKING:
    from meshkit.saga.eventstore.store import EventStore


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


class _WrongLastSequence(Exception):
    """The server refused an append: the aggregate's last sequence is not the expected one."""


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


# What the store's control headers add to an event at most, but for the value of
# _EXPECTED_SUBJECT_SEQ_SUBJECT (the aggregate's subjects): see check_sizes.
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


# A plain acknowledgement (stored, not a duplicate, no error) as nats-server spells
# it: its sequence read without json.loads (~2 us of every append). Any other
# spelling (whitespace, a domain, a leading zero, an error) goes through json.
_PLAIN_ACK = re.compile(rb'\{"stream":"[A-Za-z0-9_-]+","seq":([1-9][0-9]*)\}')


def _ack_seq(raw: bytes, refuse_duplicate: bool = False) -> int:
    plain = _PLAIN_ACK.fullmatch(raw)
    if plain is not None:
        return int(plain[1])
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


async def publish_chain(
    store: EventStore,
    where: str,
    subjects: list[str],
    payloads: list[bytes],
    headers: list[dict[str, str]],
    current: Version,
    only_new: bool = False,
) -> list[int]:
    """Publish one by one, each expecting the previous; returns each one's sequence
    (not contiguous: other aggregates' events may land in between)."""
    if not len(subjects) == len(payloads) == len(headers):
        raise ValueError("publish_chain: subjects, payloads and headers differ in length")
    expected_seq = current.seq
    seqs: list[int] = []
    # By index, not zip: no iterator kept alive across the await for the collector.
    for i in range(len(subjects)):
        h = headers[i]
        h[_EXPECTED_SUBJECT_SEQ] = str(expected_seq)
        h[_EXPECTED_SUBJECT_SEQ_SUBJECT] = where
        ack = await store._request(subjects[i], payloads[i], h)
        try:
            expected_seq = _ack_seq(ack, only_new)
        except _Duplicate as dup:
            raise _Duplicate(dup.seq, len(seqs)) from None
        seqs.append(expected_seq)
    return seqs


async def publish_batch(
    store: EventStore,
    where: str,
    subjects: list[str],
    payloads: list[bytes],
    headers: list[dict[str, str]],
    current: Version,
    only_new: bool = False,
) -> int:
    """Publish the events as one atomic batch; returns the last one's sequence.

    A batch that fails before its commit is sent (the connection refuses a
    message, an answer does not come) is abandoned at once rather than left open
    on the server until its timeout: see :func:`abandon`.
    """
    batch_id = uuid.uuid4().hex
    n = len(payloads)
    opened = False
    for i, (subject, payload, h) in enumerate(zip(subjects, payloads, headers, strict=True), 1):
        h[_BATCH_ID] = batch_id
        h[_BATCH_SEQ] = str(i)
        if i == 1:
            h[_EXPECTED_SUBJECT_SEQ] = str(current.seq)
            h[_EXPECTED_SUBJECT_SEQ_SUBJECT] = where
        if i == n:
            h[_BATCH_COMMIT] = "1"
            return _ack_seq(await store._request(subject, payload, h), only_new)
        try:
            if i == 1:
                # A request for the first message: the server answers (empty) once
                # the batch is open, or with an error we can report precisely.
                opened = True
                reply = await store._request(subject, payload, h)
                if reply:
                    opened = False  # refused: no batch is open
                    _ack_seq(reply)
            else:
                await store._publish(subject, payload, h)
        except BaseException:
            if opened:
                await abandon(store.nc, subjects[0], batch_id, n)
            raise
    raise AssertionError("unreachable")


async def abandon(nc: NATS, subject: str, batch_id: str, n: int) -> None:
    """Close an open batch that will not be completed: a message numbered after
    a gap makes the server abandon it as incomplete (stored: nothing). Best
    effort: without it the server drops the batch after its timeout (10 s)."""
    with contextlib.suppress(Exception):
        await nc.publish(subject, b"", headers={_BATCH_ID: batch_id, _BATCH_SEQ: str(n + 2)})
        await nc.flush(timeout=1)


def check_sizes(
    nc: NATS,
    name: str,
    where: str,
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
    limit = nc.max_payload
    # The control headers' largest values; only the subject's depends on the call.
    control = _CONTROL_SIZE + len(where.encode())
    for i, (payload, h) in enumerate(zip(payloads, headers, strict=True)):
        # A character is at most 4 bytes in UTF-8: when even that bound fits (nearly
        # always), the exact size is not needed.
        chars = sum(map(len, h)) + sum(map(len, h.values()))
        if len(payload) + 12 + 4 * len(h) + 4 * chars + control <= limit:
            continue
        size = len(payload) + _header_size(h) + control
        if size > limit:
            raise EventStoreError(
                f"append to {name}: event {i + 1} of {len(payloads)} ({types[i]}, "
                f"{subjects[i]}) is {size} bytes with its headers; the server takes at "
                f"most {limit} (max_payload): nothing was sent"
            )


async def publish(nc: NATS, subject: str, payload: bytes, headers: dict[str, str]) -> None:
    """Send one message without waiting for an answer (a batch's middle messages)."""
    try:
        await nc.publish(subject, payload, headers=headers)
    except nats.errors.MaxPayloadError:
        raise EventStoreError(
            f"append to {subject}: {len(payload)} bytes is more than the server's "
            f"max_payload ({nc.max_payload})"
        ) from None


async def request(
    nc: NATS, subject: str, payload: bytes, headers: dict[str, str], wait_s: float
) -> bytes:
    """Send one message and wait for the stream's answer (its raw acknowledgement)."""
    try:
        msg = await _client.replies(nc).request(subject, payload, headers, wait_s)
    except nats.errors.NoRespondersError:
        raise EventStoreUnavailable(
            f"no stream takes {subject} (a leader election, or EventStore.ensure() was not called)"
        ) from None
    except nats.errors.TimeoutError:
        raise EventStoreUnavailable(f"append to {subject}: no answer in {wait_s}s") from None
    except nats.errors.MaxPayloadError:
        raise EventStoreError(
            f"append to {subject}: {len(payload)} bytes is more than the server's "
            f"max_payload ({nc.max_payload})"
        ) from None
    return bytes(msg.data)
