"""The store's stream: created, or updated to what the store needs (its subjects,
direct gets, atomic batches, replicas); events in the layout before the event type
joined the subject refused, or moved onto typed subjects.

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
from meshkit.saga.eventstore.events import _TOKEN
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
    """Raise :class:`EventStoreError` when the stream holds events on
    ``<prefix>.<type>.<id>`` (:func:`upgrade_layout` moves them)."""
    cfg = store.config
    # The stream exists now; just created on a cluster, its group may have no
    # leader yet and info answers "not found" for a moment.
    old = await cluster.retrying(
        f"looking up the subjects of stream {cfg.stream}",
        lambda: store._subjects(f"{store.config.subject_prefix}.*.*"),
        transient=cluster.JUST_CREATED,
    )
    if old:
        raise EventStoreError(
            f"stream {cfg.stream} holds {sum(old.values())} events of {len(old)} "
            f"aggregates on <prefix>.<aggregate type>.<id> subjects (e.g. {min(old)}), "
            "the layout before the event type joined the subject; the store cannot see "
            "them: move them with `await EventStore(nc, config).upgrade_layout()`"
        )


async def upgrade_layout(store: EventStore) -> int:
    """Move events stored on ``<prefix>.<type>.<id>`` onto typed subjects; returns
    how many moved (:meth:`EventStore.upgrade_layout` says how)."""
    old_filter = f"{store.config.subject_prefix}.*.*"
    moved = 0
    # Per aggregate: the seq of its last event on typed subjects, and how many of
    # its old events are still to skip (moved by an earlier run).
    last: dict[str, int] = {}
    skip: dict[str, int] = {}
    reader = read_batches(
        store.nc, store.stream, old_filter, 1, store.config.read_batch, store.config.timeout
    )
    async with contextlib.aclosing(reader):
        async for chunk in reader:
            for m in chunk:
                etype = event_type_of(m.headers or {})
                if not _TOKEN.match(etype):
                    raise EventStoreError(
                        f"{m.subject} seq {m.seq}: no usable event type in its headers "
                        f"({etype!r}); cannot place it on a typed subject"
                    )
                agg = m.subject + ".>"
                if agg not in last:
                    last[agg] = (await store._last_seq(agg)) or 0
                    skip[agg] = sum((await store._subjects(agg)).values()) if last[agg] else 0
                if skip[agg]:
                    skip[agg] -= 1
                    continue
                # Nats-Msg-Id is left off (the stream would drop the copy as a
                # duplicate of its original): the event id goes in Meshkit-Event-Id.
                headers = {
                    k: v
                    for k, v in pin_event_id(dict(m.headers)).items()
                    if not str(k).startswith("Nats-")
                }
                headers[_EXPECTED_SUBJECT_SEQ] = str(last[agg])
                headers[_EXPECTED_SUBJECT_SEQ_SUBJECT] = agg
                ack = await store._request(f"{m.subject}.{etype}", m.data, headers)
                last[agg] = _ack_seq(ack)
                moved += 1
    if last:
        await store.js.purge_stream(store.stream, subject=old_filter)
    return moved


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
