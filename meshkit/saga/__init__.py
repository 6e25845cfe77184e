"""Choreographed sagas over NATS JetStream.

* :class:`EventBus` / :class:`StreamSpec` / :class:`ConsumerSpec` — streams, publishing
  with ``Nats-Msg-Id`` dedupe, durable pull consumers that survive server restarts;
  :class:`EventStoreSource` — an event store's events copied into a stream by the server;
  :class:`HostedStore` — an event store kept in the saga stream, its events consumed
  where they were appended.
* :class:`Envelope` — the headers every event carries (ids, saga, causation, trace, deadline).
* :class:`Participant` — ``@participant.on(Event)`` handlers and compensations; an
  :class:`Inbox` makes local effects exactly-once under redelivery.
* :class:`SagaTracker` / :class:`SagaDefinition` — saga state in JetStream KV, timeouts.
* :mod:`meshkit.saga.dlq` — the dead-letter subject; :mod:`meshkit.saga.graph` — the flow graph.
"""

from meshkit.saga.bus import EventBus
from meshkit.saga.consumer import PullConsumer
from meshkit.saga.dlq import DLQ_STREAM, dead_letter, list_dead_letters, replay_dead_letters
from meshkit.saga.envelope import Envelope, EnvelopeError, derive_event_id, new_event_id, type_name
from meshkit.saga.graph import FlowGraph, GraphReport, analyze, build_graph, to_mermaid
from meshkit.saga.inbox import (
    IdempotentInbox,
    Inbox,
    KvInbox,
    MemoryInbox,
    Outbound,
    SqliteInbox,
)
from meshkit.saga.participant import Context, Participant, PermanentError, RunningParticipant
from meshkit.saga.streams import ConsumerSpec, EventStoreSource, HostedStore, StreamSpec
from meshkit.saga.tracker import (
    FINAL_STATES,
    SagaDefinition,
    SagaStore,
    SagaTracker,
    advance,
    state_name,
)

__all__ = [
    "DLQ_STREAM",
    "FINAL_STATES",
    "ConsumerSpec",
    "Context",
    "Envelope",
    "EnvelopeError",
    "EventBus",
    "EventStoreSource",
    "FlowGraph",
    "GraphReport",
    "HostedStore",
    "IdempotentInbox",
    "Inbox",
    "KvInbox",
    "MemoryInbox",
    "Outbound",
    "Participant",
    "PermanentError",
    "PullConsumer",
    "RunningParticipant",
    "SagaDefinition",
    "SagaStore",
    "SagaTracker",
    "SqliteInbox",
    "StreamSpec",
    "advance",
    "analyze",
    "build_graph",
    "dead_letter",
    "derive_event_id",
    "list_dead_letters",
    "new_event_id",
    "replay_dead_letters",
    "state_name",
    "to_mermaid",
    "type_name",
]
