"""The store's stream: created, or updated to what the store needs (its subjects,
direct gets, atomic batches, replicas, its layout in the metadata); events in an
earlier subject layout refused, or moved onto typed subjects.

Functions of an :class:`~meshkit.saga.eventstore.store.EventStore`.
"""

from __future__ import annotations

import contextlib
import logging
import typing
from dataclasses import replace

from nats.js import api

from meshkit.saga import cluster
from meshkit.saga.envelope import event_type_of, pin_event_id
from meshkit.saga.eventstore._wire import (
    _EXPECTED_SUBJECT_SEQ,
    _EXPECTED_SUBJECT_SEQ_SUBJECT,
    _ack_seq,
    _server_supports_atomic,
)
from meshkit.saga.eventstore.errors import EventStoreError
from meshkit.saga.eventstore.events import _TOKEN, AGGREGATE_TYPE, LAYOUT, LAYOUT_KEY, type_token
from meshkit.saga.eventstore.reads import read_batches

if typing.TYPE_CHECKING:
    from meshkit.saga.eventstore.store import EventStore

log = logging.getLogger("meshkit.saga.eventstore")


async def create_or_update(store: EventStore) -> bool:
    """Create the stream, or update it to what the store needs; whether appends of
    several events are atomic batches (the config asks for them and the server has
    them)."""
    atomic = store.config.atomic and _server_supports_atomic(store.nc)
    cfg = store.config
    subjects = [store.subjects]
    info = await cluster.stream_info_or_none(store.js, cfg.stream)
    if info is None:
        stream_cfg = api.StreamConfig(
            name=cfg.stream,
            subjects=subjects,
            storage=api.StorageType(cfg.storage),
            duplicate_window=cfg.duplicate_window,
            num_replicas=cluster.replicas(cfg.replicas),
            allow_direct=True,
            allow_atomic=True if atomic else None,
            metadata={LAYOUT_KEY + cfg.subject_prefix: LAYOUT},
        )
        if await cluster.add_stream(store.js, stream_cfg):
            log.info(
                "created event stream %s (%s, replicas %d)",
                cfg.stream,
                subjects[0],
                stream_cfg.num_replicas,
            )
        else:  # created by another process since our lookup
            info = await cluster.stream_info_existing(store.js, cfg.stream)
    if info is not None:
        await _update(store, info.config, atomic)
    return atomic


async def refuse_old_layout(store: EventStore) -> None:
    """Raise :class:`EventStoreError` when the stream holds the store's events in an
    earlier subject layout (:func:`upgrade_layout` moves them); record the layout in
    the stream's metadata when it holds none."""
    cfg = store.config
    # The stream exists now; just created on a cluster, its group may have no
    # leader yet and info answers "not found" for a moment.
    info = await cluster.retrying(
        f"looking up stream {cfg.stream}",
        lambda: store.js.stream_info(cfg.stream),
        transient=cluster.JUST_CREATED,
    )
    if _marked(store, info.config):
        return
    old = await old_layout_subjects(store, any_will_do=True)
    if old:
        raise EventStoreError(
            f"stream {cfg.stream} holds events of this store in an earlier layout "
            f"({sum(old.values())} on {len(old)} subjects found, e.g. {min(old)}: "
            "<prefix>.<aggregate type>.<id>[.<event type>]), where the store cannot see "
            "them: move them with `await EventStore(nc, config).upgrade_layout()`"
        )
    await _mark(store)


async def old_layout_subjects(store: EventStore, *, any_will_do: bool = False) -> dict[str, int]:
    """The stream's subjects holding the store's events in an earlier layout, with
    their counts: ``<prefix>.<aggregate type>.<id>`` and
    ``<prefix>.<aggregate type>.<id>.<event type>``. ``any_will_do``: stop looking
    once some are found (the subjects of one-token event types cost a read each)."""
    prefix = store.config.subject_prefix
    old = await store._subjects(f"{prefix}.*.*")
    # An event type of several tokens makes the subject longer than any typed one.
    old.update(await store._subjects(f"{prefix}.*.*.*.>"))
    for subject, count in (await store._subjects(f"{prefix}.*.*.*")).items():
        if old and any_will_do:
            break
        first, aggregate_type, _ = subject[len(prefix) + 1 :].split(".")
        if ":" in first:
            continue  # the token of an event type of several tokens: typed
        # A one-token event type: the subject reads the same in both layouts, the
        # headers tell them apart.
        last = await store._direct_last(subject)
        headers = last.headers if last is not None else {}
        etype = event_type_of(headers)
        typed = bool(_TOKEN.match(etype)) and type_token(etype) == first
        if not typed or headers.get(AGGREGATE_TYPE, aggregate_type) != aggregate_type:
            old[subject] = count
    return old


async def upgrade_layout(store: EventStore) -> int:
    """Move the store's events in an earlier layout onto typed subjects; returns how
    many moved (:meth:`EventStore.upgrade_layout` says how)."""
    info = await store.js.stream_info(store.stream)
    if _marked(store, info.config):
        return 0
    prefix = store.config.subject_prefix
    old = await old_layout_subjects(store)
    moved = 0
    # Per aggregate: the seq of its last event on typed subjects, and how many of
    # its old events are still to skip (moved by an earlier run).
    last: dict[str, int] = {}
    skip: dict[str, int] = {}
    reader = read_batches(
        store.nc, store.stream, f"{prefix}.>", 1, store.config.read_batch, store.config.timeout
    )
    async with contextlib.aclosing(reader):
        async for chunk in reader:
            for m in chunk:
                if m.subject not in old:
                    continue  # moved by an earlier run
                etype = event_type_of(m.headers or {})
                if not _TOKEN.match(etype):
                    raise EventStoreError(
                        f"{m.subject} seq {m.seq}: no usable event type in its headers "
                        f"({etype!r}); cannot place it on a typed subject"
                    )
                aggregate_type, aggregate_id = m.subject[len(prefix) + 1 :].split(".")[:2]
                where = store.aggregate_filter(aggregate_type, aggregate_id)
                if where not in last:
                    last[where] = (await store._last_seq(where)) or 0
                    skip[where] = sum((await store._subjects(where)).values()) if last[where] else 0
                if skip[where]:
                    skip[where] -= 1
                    continue
                # Nats-Msg-Id is left off (the stream would drop the copy as a
                # duplicate of its original): the event id goes in Meshkit-Event-Id.
                headers = {
                    k: v
                    for k, v in pin_event_id(dict(m.headers)).items()
                    if not str(k).startswith("Nats-")
                }
                headers[_EXPECTED_SUBJECT_SEQ] = str(last[where])
                headers[_EXPECTED_SUBJECT_SEQ_SUBJECT] = where
                subject = store.event_subject(aggregate_type, aggregate_id, etype)
                ack = await store._request(subject, m.data, headers)
                last[where] = _ack_seq(ack)
                moved += 1
    # What no typed subject can match in one filter each; the one-token types' old
    # subjects, which read like typed ones, one by one.
    for subject in (f"{prefix}.*.*", f"{prefix}.*.*.*.>"):
        await store.js.purge_stream(store.stream, subject=subject)
    for subject in old:
        if subject.count(".") == prefix.count(".") + 3:
            await store.js.purge_stream(store.stream, subject=subject)
    await _mark(store)
    return moved


def _marked(store: EventStore, config: api.StreamConfig) -> bool:
    return (config.metadata or {}).get(LAYOUT_KEY + store.config.subject_prefix) == LAYOUT


async def _mark(store: EventStore) -> None:
    """Record the store's layout in the stream's metadata."""
    info = await store.js.stream_info(store.stream)
    metadata = dict(info.config.metadata or {})
    metadata[LAYOUT_KEY + store.config.subject_prefix] = LAYOUT
    await cluster.update_stream(
        store.js,
        replace(info.config, metadata=metadata),
        f"recorded the subject layout of event store {store.config.subject_prefix} "
        f"in stream {store.stream}",
    )


async def _update(store: EventStore, current: api.StreamConfig, atomic: bool) -> None:
    subjects = list(current.subjects or [])
    have = current.num_replicas or 1
    raised = cluster.replicas_target(
        f"event stream {store.config.stream}", have, store.config.replicas
    )
    changed = raised is not None
    if store.subjects not in subjects:
        subjects.append(store.subjects)
        changed = True
    if not current.allow_direct:
        changed = True
    if atomic and not current.allow_atomic:
        changed = True
    if changed:
        await cluster.update_stream(
            store.js,
            replace(
                current,
                subjects=subjects,
                allow_direct=True,
                allow_atomic=True if atomic else current.allow_atomic,
                num_replicas=raised or have,
            ),
            f"updated event stream {store.config.stream}",
        )
