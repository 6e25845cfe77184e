"""The event bus: JetStream streams, publishing with dedupe, durable pull consumers.

::

    bus = await EventBus.connect("nats://127.0.0.1:4222", name="payment")
    await bus.ensure_stream(SHOP)                      # create or update, idempotent
    env = await bus.emit(SHOP, OrderCreated(...), saga_type="order")
    consumer = bus.consumer(SHOP, "payment", handle, filter_subjects=[...])
    await consumer.start()
    ...
    await consumer.stop()                              # drains in-flight work
    await bus.close()

Stream and consumer specs are in :mod:`meshkit.saga.streams`; the pull consumer
(:class:`~meshkit.saga.consumer.PullConsumer`: its own pull protocol, heartbeats and
recovery after a server restart) is in :mod:`meshkit.saga.consumer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

import meshkit.deadline
from meshkit.saga import _client, _telemetry, cluster
from meshkit.saga.consumer import PullConsumer
from meshkit.saga.envelope import Envelope
from meshkit.saga.eventstore import EventStore
from meshkit.saga.streams import ConsumerSpec, StreamSpec, _sources_key

__all__ = ["BatchHandler", "EventBus", "MessageHandler"]

log = logging.getLogger("meshkit.saga")

MessageHandler = Callable[[Msg], Awaitable[None]]
BatchHandler = Callable[[list[Msg]], Awaitable[None]]


_RETRYABLE_PUBLISH = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,  # JetStream not up yet after a restart
    asyncio.TimeoutError,
)


class EventBus:
    """A NATS connection with JetStream, publishing envelopes and running consumers."""

    def __init__(self, nc: NATS, *, source: str = "", publish_retry: float | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self._replies = _client.replies(nc)
        self.source = source
        # None: the library's retry window (MESHKIT_NATS_RETRY_WINDOW), read per publish.
        self.publish_retry = publish_retry
        self._listeners: list[Callable[[], None]] = []
        self._ensured: set[str] = set()
        self._consumers: list[PullConsumer] = []
        # Replicated streams with sources this bus ensured: their sources watched.
        self.source_watches: dict[str, cluster.SourceWatch] = {}

    @classmethod
    async def connect(
        cls,
        servers: str | Sequence[str],
        *,
        name: str = "meshkit",
        source: str | None = None,
        publish_retry: float | None = None,
        **options: Any,
    ) -> EventBus:
        """Connect (reconnecting forever) and return a bus publishing as ``source``.

        ``servers``: one URL, a list, or a cluster's servers in one comma-separated
        string (``"nats://a:4222,nats://b:4222"``, as ``NATS_URL`` holds it). nats-py
        tries them in turn, skipping dead ones, and learns the rest of the cluster
        from the server it reaches.
        """
        holder: list[EventBus] = []

        async def reconnected() -> None:
            log.info("%s reconnected to NATS", name)
            if holder:
                for listener in list(holder[0]._listeners):
                    listener()

        async def disconnected() -> None:
            log.info("%s disconnected from NATS", name)

        async def error(exc: Exception) -> None:
            log.debug("%s NATS error: %r", name, exc)

        opts: dict[str, Any] = {
            "name": name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "connect_timeout": 2,
            "ping_interval": 5,
            "max_outstanding_pings": 2,
            "reconnected_cb": reconnected,
            "disconnected_cb": disconnected,
            "error_cb": error,
        }
        opts.update(options)
        nc = await _client.connect(servers if isinstance(servers, str) else list(servers), **opts)
        bus = cls(nc, source=source if source is not None else name, publish_retry=publish_retry)
        holder.append(bus)
        return bus

    def on_reconnect(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after every reconnect; returns a function that unregisters it."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create the stream, or bring it up to ``spec``; safe to call from every process.

        An existing stream keeps what others gave it: subjects it has beyond the
        spec's stay, and replicas only go up (a spec leaving them to the default
        never scales a stream down; an explicit lower value is logged as a
        mismatch and not applied; see :func:`meshkit.saga.cluster.replicas_target`).
        The duplicate window, max age, direct gets and sources follow the spec.
        Lookups, creates and updates ride out cluster elections; a refusal (no
        placement for the replicas, say) raises
        :class:`~meshkit.saga.cluster.JetStreamAPIError` with the server's words.

        Hosted event stores (:class:`~meshkit.saga.streams.HostedStore`) are ensured
        once the stream has their subjects. The event stores it sources from are
        created first when missing: a source the server cannot find yet is retried
        only every few seconds. A replicated
        stream with sources is watched from then on until :meth:`close`
        (:class:`~meshkit.saga.cluster.SourceWatch`, ``MESHKIT_NATS_SOURCE_STALL``):
        a source left stalled by a leader election is nudged.
        """
        for source in spec.sources:
            await EventStore(self.nc, source.store).ensure()
        config = spec.to_config()
        info = await cluster.stream_info_or_none(self.js, spec.name)
        if info is None:
            if await cluster.add_stream(self.js, config):
                log.info(
                    "created stream %s (%s, replicas %d)",
                    spec.name,
                    ", ".join(spec.subjects),
                    config.num_replicas,
                )
                self._ensured.add(spec.name)
                self._watch_sources(spec, config.num_replicas or 1)
                await self._ensure_hosted(spec)
                return
            # Another process created it between our lookup and our create (its
            # group may not have a leader yet: "not found" for a moment).
            info = await cluster.stream_info_existing(self.js, spec.name)
        current = info.config
        subjects = list(current.subjects or [])
        subjects += [s for s in spec.subjects if s not in subjects]
        have = current.num_replicas or 1
        raised = cluster.replicas_target(f"stream {spec.name}", have, spec.replicas)
        for setting, now, wanted in (
            ("storage", current.storage, config.storage),
            ("retention", current.retention, config.retention),
        ):
            if now != wanted:
                log.warning(
                    "stream %s: %s is %s on the server, the spec wants %s; "
                    "JetStream cannot change it in place, left as is",
                    spec.name,
                    setting,
                    getattr(now, "value", now),
                    getattr(wanted, "value", wanted),
                )
        if (
            subjects != list(current.subjects or [])
            or current.duplicate_window != spec.duplicate_window
            or (current.max_age or 0) != (spec.max_age or 0)
            or raised is not None
            or bool(current.allow_direct) != spec.allow_direct
            or _sources_key(current.sources) != _sources_key(config.sources)
        ):
            sources = config.sources
            if config.sources or current.sources:
                sources = await self._resumed_sources(
                    spec.name, current.sources or [], config.sources or []
                )
            # From the server's config: whatever else someone set there stays.
            update = dataclasses.replace(
                current,
                subjects=subjects,
                duplicate_window=spec.duplicate_window,
                max_age=spec.max_age,
                num_replicas=raised or have,
                allow_direct=spec.allow_direct,
                sources=sources,
            )
            await cluster.update_stream(self.js, update, f"updated stream {spec.name}")
        self._ensured.add(spec.name)
        self._watch_sources(spec, raised or have)
        await self._ensure_hosted(spec)

    async def _ensure_hosted(self, spec: StreamSpec) -> None:
        """Each hosted store, ensured on the stream now holding its subjects (direct
        gets, atomic batches; events in an older layout refused)."""
        for hosted in spec.hosted_stores:
            await EventStore(self.nc, hosted.store).ensure()

    def _watch_sources(self, spec: StreamSpec, replicas: int) -> None:
        """Watch a replicated stream's sources (:class:`~meshkit.saga.cluster.SourceWatch`):
        after a leader election one can stay stalled for ~45 s; the watch nudges it."""
        if not spec.sources or replicas < 2 or spec.name in self.source_watches:
            return
        watch = cluster.SourceWatch(self.nc, spec.name)
        if watch.stalled_after > 0:
            self.source_watches[spec.name] = watch.start()

    async def _resumed_sources(
        self, stream: str, current: list[api.StreamSource], wanted: list[api.StreamSource]
    ) -> list[api.StreamSource] | None:
        """``wanted``, each source continuing where the server's copy of it stands.

        nats-server copies a source whose filters changed from the origin's first
        message again. A source it has as wanted is kept as it is; one whose types
        changed starts after the last message already copied from its origin (so the
        newly listed types are copied from then on, and nothing is copied twice).
        """
        by_key = {_sources_key([c])[0]: c for c in current}
        by_name = {c.name: c for c in current}
        out: list[api.StreamSource] = []
        for want in wanted:
            same = by_key.get(_sources_key([want])[0])
            if same is not None:
                out.append(same)
                continue
            before = by_name.get(want.name)
            if before is not None:
                last = await self._last_copied(stream, before)
                if last:
                    want = dataclasses.replace(want, opt_start_seq=last + 1)
                    log.info(
                        "stream %s: the source %s changed; copying from its seq %d on",
                        stream,
                        want.name,
                        last + 1,
                    )
            out.append(want)
        return out or None

    async def _last_copied(self, stream: str, source: api.StreamSource) -> int:
        """The origin sequence of the newest message ``stream`` holds from ``source`` (0: none).

        Copies carry ``Nats-Stream-Source: <origin> <origin seq> ...``; the newest
        one is the last message of one of the subjects the source writes to.
        """
        newest = 0
        for transform in source.subject_transforms or []:
            info = await self.js.stream_info(stream, subjects_filter=transform.dest)
            for subject in info.state.subjects or {}:
                try:
                    raw = await self.js.get_msg(stream, subject=subject)
                except nats.js.errors.NotFoundError:
                    continue
                origin = (raw.headers or {}).get("Nats-Stream-Source", "").split()
                if (
                    len(origin) >= 2
                    and origin[0].split(":")[0] == source.name
                    and origin[1].isdigit()
                ):
                    newest = max(newest, int(origin[1]))
        return newest

    async def publish_raw(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str],
        *,
        ack_timeout: float = 5.0,
    ) -> api.PubAck:
        """Publish to JetStream, retrying while the server is unreachable or electing a
        stream leader (up to ``publish_retry`` seconds; None: the library's window,
        :func:`meshkit.saga.cluster.retry_window`), then raising
        :class:`~meshkit.saga.cluster.JetStreamUnavailable`. A retry carries the same
        headers, so its ``Nats-Msg-Id`` makes the stream keep one copy."""
        return await cluster.retrying(
            f"publishing to {subject}",
            lambda: self._replies.jetstream_publish(subject, payload, headers, ack_timeout),
            window=self.publish_retry,
            transient=_RETRYABLE_PUBLISH,
        )

    async def publish_many(
        self,
        messages: Sequence[tuple[str, bytes, dict[str, str]]],
        *,
        ack_timeout: float = 5.0,
    ) -> list[Exception | None]:
        """:meth:`publish_raw` for each of ``messages`` (subject, payload, headers): all
        are sent before the first stream ack is awaited. For each, in order: None once
        the stream has it, or the error :meth:`publish_raw` would have raised for it
        (one whose first try met a transient error is retried alone, as
        :meth:`publish_raw` retries)."""
        results = await self._replies.jetstream_publish_many(messages, ack_timeout)
        for i, result in enumerate(results):
            if isinstance(result, _RETRYABLE_PUBLISH):
                subject, payload, headers = messages[i]
                try:
                    await self.publish_raw(subject, payload, headers, ack_timeout=ack_timeout)
                    results[i] = None
                except Exception as exc:
                    results[i] = exc
        return results

    async def publish(
        self, stream: StreamSpec, event: Message, env: Envelope, *, ack_timeout: float = 5.0
    ) -> api.PubAck:
        """Publish ``event`` with ``env`` as headers on the stream's subject for its type."""
        subject = stream.subject_for(env.event_type)
        payload = event.SerializeToString()
        with _telemetry.producer_span(subject, env, len(payload)) as traced:
            return await self.publish_raw(
                subject, payload, traced.to_headers(), ack_timeout=ack_timeout
            )

    async def emit(
        self,
        stream: StreamSpec,
        event: Message,
        *,
        saga_id: str | None = None,
        saga_type: str = "",
        event_id: str | None = None,
        saga_timeout: float | None = None,
        source: str | None = None,
    ) -> Envelope:
        """Publish an event that starts (or joins) a saga; returns its envelope.

        ``saga_timeout`` (seconds) sets the saga's deadline; the propagated request
        deadline (:mod:`meshkit.deadline`) goes into the headers when there is one.
        """
        left = meshkit.deadline.remaining()
        env = Envelope.new(
            event,
            event_id=event_id,
            saga_id=saga_id,
            source=self.source if source is None else source,
            saga_type=saga_type,
            deadline_ms=int(left * 1000) if left is not None else None,
        )
        if saga_timeout is not None:
            env = dataclasses.replace(
                env, saga_deadline_ms=env.timestamp_ms + int(saga_timeout * 1000)
            )
        await self.publish(stream, event, env)
        return env

    def consumer(
        self,
        stream: StreamSpec | str,
        durable: str,
        handler: MessageHandler | None = None,
        *,
        filter_subjects: Sequence[str] = (),
        spec: ConsumerSpec | None = None,
        batch_handler: BatchHandler | None = None,
    ) -> PullConsumer:
        """A durable pull consumer (not started) calling ``handler`` for each message,
        or ``batch_handler`` for the messages that arrived together.

        The handler acknowledges (``msg.ack()``, ``nak()``, ``term()``) itself; if it
        raises, the message (or each of the batch's) is nak'ed with the spec's backoff.
        """
        name = stream if isinstance(stream, str) else stream.name
        consumer = PullConsumer(
            self,
            name,
            durable,
            handler,
            tuple(filter_subjects),
            spec or ConsumerSpec(),
            batch_handler=batch_handler,
        )
        if isinstance(stream, StreamSpec):
            consumer.stream_spec = stream
        self._consumers.append(consumer)
        return consumer

    async def key_value(
        self,
        bucket: str,
        *,
        history: int = 1,
        storage: Literal["file", "memory"] = "file",
        replicas: int | None = None,
    ) -> Any:
        """The JetStream KV bucket, created when missing.

        ``replicas``: None takes ``MESHKIT_NATS_REPLICAS``; an existing bucket's
        replicas are raised to it, never lowered (:func:`meshkit.saga.cluster.ensure_key_value`).
        """
        return await cluster.ensure_key_value(
            self.js, bucket, history=history, storage=storage, replicas_=replicas
        )

    async def close(self) -> None:
        """Stop every consumer (draining in-flight work), then close the connection."""
        for watch in list(self.source_watches.values()):
            await watch.stop()
        self.source_watches.clear()
        for consumer in list(self._consumers):
            await consumer.stop()
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            with contextlib.suppress(Exception):
                await self.nc.close()
