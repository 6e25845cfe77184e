"""An append retried after its first try was stored (a lost answer, a crash before
the caller heard back): finding that try's events in the aggregate, by their event
ids, so the retry answers with them instead of a conflict, and completes a
one-by-one append that was cut short.

Functions of an :class:`~meshkit.saga.eventstore.store.EventStore`: they read
through its direct gets, and :func:`resume` appends the rest of a cut-short run
with it.
"""

from __future__ import annotations

import contextlib
import functools
import typing
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from meshkit.saga.eventstore.errors import _riding
from meshkit.saga.eventstore.events import (
    AGGREGATE_VERSION,
    AppendResult,
    StoredEvent,
    Version,
    _int_header,
)
from meshkit.saga.eventstore.reads import read_batches

if typing.TYPE_CHECKING:
    from meshkit.saga.eventstore.store import EventStore


async def resume(
    store: EventStore,
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
    mine = await _run_from(store, aggregate_type, aggregate_id, seq, ids)
    if not mine:
        return None
    stored = store._appended(_replayed(mine, atomic))
    if len(mine) == len(ids):
        return stored
    rest = await store.append(
        aggregate_type,
        aggregate_id,
        events[len(mine) :],
        expected=mine[-1].version_at(),
        event_ids=ids[len(mine) :],
        **meta,
    )
    return AppendResult(rest.version, (*mine, *rest.events), rest.atomic)


async def _run_from(
    store: EventStore, aggregate_type: str, aggregate_id: str, seq: int, ids: list[str]
) -> list[StoredEvent]:
    """The aggregate's events from stream sequence ``seq`` on, as long as their ids
    are ``ids[0]``, ``ids[1]``, ... (at most ``len(ids)`` events)."""
    subject = store.aggregate_filter(aggregate_type, aggregate_id)

    async def collect() -> list[StoredEvent]:
        out: list[StoredEvent] = []
        reader = read_batches(
            store.nc, store.stream, subject, seq, len(ids) + 1, store.config.timeout
        )
        async with contextlib.aclosing(reader):
            async for chunk in reader:
                for m in chunk:
                    ev = StoredEvent.from_msg(
                        m.subject,
                        m.data,
                        m.headers,
                        m.seq,
                        store.stream,
                        store.config.subject_prefix,
                    )
                    if len(out) == len(ids) or ev.event_id != ids[len(out)]:
                        return out
                    out.append(ev)
        return out

    return await _riding(f"reading {subject}", collect)


async def seq_of_version(
    store: EventStore, aggregate_type: str, aggregate_id: str, version: int, last: Version
) -> int:
    """The stream sequence of the aggregate's event at ``version`` (0: none);
    ``last`` is the aggregate's latest version.

    Found by bisecting the stream sequences up to ``last.seq`` with direct gets
    (each answers the aggregate's first event at or after a sequence): a few
    small reads, however long the aggregate.
    """
    subject = store.aggregate_filter(aggregate_type, aggregate_id)
    lo, hi = 1, last.seq
    while lo <= hi:
        mid = (lo + hi) // 2
        m = await _riding(
            f"reading {subject}",
            functools.partial(store._direct_get, {"seq": mid, "next_by_subj": subject}),
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


async def ending_at(
    store: EventStore, aggregate_type: str, aggregate_id: str, ids: list[str], at: Version
) -> int:
    """The stream sequence of ``ids[0]`` if the aggregate's event at ``at`` is
    ``ids[-1]`` (0 otherwise): one direct get, then a bisection for a batch."""
    if not at.seq:
        return 0
    last = await _riding(
        f"reading {store.stream} seq {at.seq}",
        functools.partial(store._direct_get, {"seq": at.seq}),
    )
    if (
        last is None
        or not _holds(store, last.subject, aggregate_type, aggregate_id)
        or last.headers.get("Nats-Msg-Id") != ids[-1]
    ):
        return 0
    if len(ids) == 1:
        return last.seq
    first = _int_header(last.headers, AGGREGATE_VERSION, 0) - len(ids) + 1
    return await seq_of_version(store, aggregate_type, aggregate_id, first, at)


async def find_id(
    store: EventStore, aggregate_type: str, aggregate_id: str, event_id: str, last: Version
) -> int:
    """The stream sequence of the aggregate's event ``event_id`` at or before
    ``last`` (0: none).

    Searched backwards from ``last.seq`` in windows growing 16-fold: a retry the
    stream deduplicates comes within its duplicate window, so near the end.
    """
    subject = store.aggregate_filter(aggregate_type, aggregate_id)
    width = 1024
    while True:
        lo = max(1, last.seq - width + 1)
        found = await _riding(
            f"reading {subject}", functools.partial(_first_with_id, store, subject, lo, event_id)
        )
        if found or lo == 1:
            return found
        width *= 16


async def _first_with_id(store: EventStore, subject: str, start_seq: int, event_id: str) -> int:
    """The sequence of the first message on ``subject`` from ``start_seq`` whose
    ``Nats-Msg-Id`` is ``event_id`` (0: none)."""
    reader = read_batches(
        store.nc, store.stream, subject, start_seq, store.config.read_batch, store.config.timeout
    )
    async with contextlib.aclosing(reader):
        async for chunk in reader:
            for m in chunk:
                if m.headers.get("Nats-Msg-Id") == event_id:
                    return m.seq
    return 0


def _replayed(mine: Sequence[StoredEvent], atomic: bool) -> AppendResult:
    """The answer to an append whose events were all stored before: those events."""
    return AppendResult(mine[-1].version_at(), tuple(mine), atomic, duplicate=True)


def _holds(store: EventStore, subject: str, aggregate_type: str, aggregate_id: str) -> bool:
    """Whether ``subject`` is one of the aggregate's."""
    prefix = store.config.subject_prefix
    return (
        subject.startswith(prefix + ".")
        and subject.endswith(f".{aggregate_type}.{aggregate_id}")
        and subject.count(".") == prefix.count(".") + 3
    )
