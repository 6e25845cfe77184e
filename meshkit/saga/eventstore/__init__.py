"""The event store: aggregates that are their events, on JetStream.

Every event sits on ``<prefix>.<event type token>.<aggregate type>.<id>`` in one
stream (the token: the type with ``:`` for ``.``,
:func:`~meshkit.saga.eventstore.events.type_token`), so one aggregate is the
filter ``<prefix>.*.<aggregate type>.<id>``.
Appending sets ``Nats-Expected-Last-Subject-Sequence`` to the stream sequence of
the aggregate's last event as the writer saw it, checked against that filter
(``Nats-Expected-Last-Subject-Sequence-Subject``, nats-server >= 2.11), so of two
writers racing on one aggregate the server lets exactly one win; the other gets
an :class:`AggregateConflict` (a :class:`~meshkit.errors.ConcurrencyError`)
naming the aggregate, the version it expected and the version it found.

The event type in the subject lets consumers take only the types they handle,
and lets the server copy chosen types into a saga stream
(:class:`~meshkit.saga.EventStoreSource`): the store is then its own outbox,
with no relay.

Several events appended together are one atomic batch (ADR-50 headers
``Nats-Batch-Id``/``Nats-Batch-Sequence``/``Nats-Batch-Commit``, nats-server >=
2.12 with ``allow_atomic`` on the stream): all are stored or none. On an older
server the store falls back to one publish per event, each checked against the
previous one's sequence; no other writer can interleave, but a crash half way
leaves a prefix of the events stored (see docs/event-sourcing.md).

Loading reads only the aggregate's subjects with JetStream's batched direct get
(``next_by_subj``), starting after the snapshot when there is one, so its cost
is the number of events since the snapshot. Events are protobuf messages; their
metadata travels in the same headers as every saga event
(:class:`~meshkit.saga.envelope.Envelope`) plus the aggregate headers (:mod:`~meshkit.saga.eventstore.events`).

::

    store = EventStore(nc, EventStoreConfig(stream="ORDERS", prefix="orders"))
    await store.ensure()
    orders = Repository(store, "order", Order, snapshots=SnapshotStore(nc), snapshot_every=100,
                        codec=ORDER_CODEC)
    loaded = await orders.execute("o-1", lambda order: order.place(...))

The package, by concern:

- :mod:`~meshkit.saga.eventstore.store`: :class:`EventStore` (append, read) and
  :class:`EventStoreConfig`;
- :mod:`~meshkit.saga.eventstore.events`: :class:`Version`, :class:`StoredEvent`,
  :class:`AppendResult`, the aggregate headers;
- :mod:`~meshkit.saga.eventstore.errors`: what the store raises;
- :mod:`~meshkit.saga.eventstore.reads`: direct and leader gets, :func:`read_batches`;
- :mod:`~meshkit.saga.eventstore.repository`: :class:`Repository`, :class:`Loaded`,
  :class:`StateCodec`;
- :mod:`~meshkit.saga.eventstore.appliers`: an aggregate's ``apply*`` methods;
- :mod:`~meshkit.saga.eventstore.upcasters`: old event schemas brought up to date;
- the store's private helpers: ``_stream`` (creating and updating the stream, the
  layout before typed subjects), ``_wire`` (control headers, one-by-one and atomic
  batch publishes, acknowledgements, server versions) and ``_retries`` (what a
  retried append's first try stored).

Import from ``meshkit.saga.eventstore``: the names below are its public API.
"""

from meshkit.saga.eventstore.appliers import Appliers
from meshkit.saga.eventstore.errors import (
    AggregateConflict,
    EventStoreError,
    EventStoreUnavailable,
)
from meshkit.saga.eventstore.events import (
    AGGREGATE_ID,
    AGGREGATE_TYPE,
    AGGREGATE_VERSION,
    SCHEMA_VERSION,
    AppendResult,
    StoredEvent,
    Version,
)
from meshkit.saga.eventstore.reads import RawMessage as RawMessage
from meshkit.saga.eventstore.reads import read_batches as read_batches
from meshkit.saga.eventstore.repository import Loaded, Repository
from meshkit.saga.eventstore.repository import StateCodec as StateCodec
from meshkit.saga.eventstore.store import EventStore, EventStoreConfig
from meshkit.saga.eventstore.upcasters import Upcasters

__all__ = [
    "AGGREGATE_ID",
    "AGGREGATE_TYPE",
    "AGGREGATE_VERSION",
    "SCHEMA_VERSION",
    "AggregateConflict",
    "AppendResult",
    "Appliers",
    "EventStore",
    "EventStoreConfig",
    "EventStoreError",
    "EventStoreUnavailable",
    "Loaded",
    "Repository",
    "StoredEvent",
    "Upcasters",
    "Version",
]
