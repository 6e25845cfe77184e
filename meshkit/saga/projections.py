"""CQRS projections: read models that follow event streams.

A projection names its sources (a stream and a subject filter each) and handles
one :class:`~meshkit.saga.eventstore.StoredEvent` at a time, writing documents
through a :class:`~meshkit.saga.readmodels.ReadModelTx`. A :class:`Projector`
feeds it: it reads each source from its checkpoint with batched direct gets,
applies a batch of events and moves the checkpoint in one read-model
transaction, and then waits for more (a core-NATS subscription on the source
subjects wakes it; a slow poll covers missed wake-ups).

The checkpoint lives with the read model, not in a JetStream consumer, because
only then can it commit atomically with the documents. Events from one source
arrive in stream order; events from different sources interleave in no defined
order, so a projection over several streams must not depend on it.

``meshkit projection rebuild NAME`` (:meth:`Projector.rebuild`) drops the read
model and replays every source from the start; a projector running elsewhere
notices the checkpoint moved (compare-and-set) and carries on from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import nats.js.errors
from nats.aio.client import Client as NATS

from meshkit.errors import ConfigError
from meshkit.saga.eventstore import StoredEvent, Upcasters, read_batches
from meshkit.saga.readmodels import CheckpointMoved, ReadModelStore, ReadModelTx

__all__ = [
    "Projection",
    "ProjectionStatus",
    "Projector",
    "Source",
    "SourceStatus",
    "relay",
]

log = logging.getLogger("meshkit.saga.projections")


@dataclass(frozen=True)
class Source:
    """One stream (and subject filter within it) a projection follows."""

    stream: str
    subject: str = ">"

    @property
    def key(self) -> str:
        """The checkpoint's name: the stream, plus the filter when it is not ``>``."""
        return self.stream if self.subject == ">" else f"{self.stream}:{self.subject}"


class Projection(Protocol):
    """What a projector runs: a name, sources, and a handler of stored events."""

    name: str
    sources: Sequence[Source]

    def handle(self, event: StoredEvent, tx: ReadModelTx) -> None:
        """Update documents for ``event``; must be deterministic (rebuilds replay it)."""
        ...


@dataclass(frozen=True)
class SourceStatus:
    source: str
    checkpoint: int
    pending: int


@dataclass(frozen=True)
class ProjectionStatus:
    """Where a projection is: per-source checkpoint and pending (lag) in events."""

    name: str
    sources: tuple[SourceStatus, ...]
    last_error: str = ""

    @property
    def lag(self) -> int:
        return sum(s.pending for s in self.sources)


@dataclass
class ProjectorStats:
    applied: int = 0
    batches: int = 0
    passes: int = 0
    skipped: int = 0
    conflicts: int = 0
    errors: int = 0
    last_error: str = ""


class Projector:
    """Runs one projection against one read model store."""

    def __init__(
        self,
        nc: NATS,
        projection: Projection,
        store: ReadModelStore,
        *,
        batch: int = 500,
        poll_interval: float = 1.0,
        timeout: float = 5.0,
        upcasters: Upcasters | None = None,
        before_commit: Callable[[list[StoredEvent]], Awaitable[None]] | None = None,
        follow: bool = True,
    ) -> None:
        if not projection.sources:
            raise ConfigError(f"projection {projection.name}", "needs at least one source")
        if not 1 <= batch <= 10_000:
            raise ConfigError("projector.batch", f"{batch!r}: expected 1..10000")
        self.nc = nc
        self.projection = projection
        self.store = store
        self.batch = batch
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.upcasters = upcasters
        self.before_commit = before_commit
        self.follow = follow
        self.stats = ProjectorStats()
        # Events offered by a writer in this process, by stream and sequence; only for
        # sources that see every subject of their stream, where sequences have no gaps.
        self._offered: dict[str, dict[int, StoredEvent]] = {}
        self._whole: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subs: list[Any] = []
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.projection.name

    async def catch_up(self) -> int:
        """Apply every event available now; returns how many were applied."""
        async with self._lock:
            total = 0
            for source in self.projection.sources:
                total += await self._catch_up_source(source)
            return total

    async def _catch_up_source(self, source: Source) -> int:
        applied = 0
        while True:
            checkpoint = self.store.checkpoints(self.name).get(source.key, 0)
            events: list[StoredEvent] = []
            last = checkpoint
            pending = 0
            offered = self._offered.get(source.stream) if source.stream in self._whole else None
            if offered and checkpoint + 1 in offered:
                while last + 1 in offered and len(events) < self.batch:
                    last += 1
                    ev = offered.pop(last)
                    if self.upcasters is not None:
                        ev = self.upcasters.upcast(ev)
                    events.append(ev)
                # Offers left past a gap: what lies between is read on the next turn.
                pending = len(offered)
            else:
                last, pending = await self._read_batch(source, checkpoint, events)
                if offered:
                    for seq in [s for s in offered if s <= last]:
                        del offered[seq]
            if last == checkpoint:
                return applied

            def work(tx: ReadModelTx, events: list[StoredEvent] = events) -> None:
                for ev in events:
                    self.projection.handle(ev, tx)

            if self.before_commit is not None and events:
                # Side effects (a relay's publishes) happen before the checkpoint moves:
                # at least once, so they must be idempotent (event ids as Nats-Msg-Id).
                await self.before_commit(events)
            try:
                self.store.apply(self.name, {source.key: checkpoint}, {source.key: last}, work)
            except CheckpointMoved as exc:
                # A rebuild or another runner moved it: carry on from where it is now.
                self.stats.conflicts += 1
                log.info("%s", exc)
                continue
            applied += len(events)
            self.stats.applied += len(events)
            self.stats.batches += 1
            if pending == 0:
                return applied

    async def _read_batch(
        self, source: Source, checkpoint: int, events: list[StoredEvent]
    ) -> tuple[int, int]:
        """Read one batch after ``checkpoint`` into ``events``; returns (last seq, pending)."""
        last, pending = checkpoint, 0
        reader = read_batches(
            self.nc, source.stream, source.subject, checkpoint + 1, self.batch, self.timeout
        )
        async with contextlib.aclosing(reader):
            async for chunk in reader:
                for m in chunk:
                    last, pending = m.seq, m.pending
                    try:
                        ev = StoredEvent.from_msg(
                            m.subject, m.data, m.headers, m.seq, source.stream
                        )
                    except Exception as exc:  # not a meshkit event: skip it, count it
                        self.stats.skipped += 1
                        log.warning(
                            "projection %s: skipping %s seq %d: %s",
                            self.name,
                            source.stream,
                            m.seq,
                            exc,
                        )
                        continue
                    if self.upcasters is not None:
                        ev = self.upcasters.upcast(ev)
                    events.append(ev)
                break  # one batch per transaction
        return last, pending

    def offer(self, events: Sequence[StoredEvent]) -> None:
        """Hand over events just stored by this process, so following them needs no read.

        Pass it to :meth:`EventStore.on_append`. Offers are used only for sources
        that cover their whole stream (so sequence numbers have no gaps) and only
        in order: an event missing from the offers (another writer's, a lost
        answer) is read from the stream as usual.
        """
        for ev in events:
            if ev.stream not in self._whole:
                continue
            offered = self._offered.setdefault(ev.stream, {})
            if len(offered) >= 10 * self.batch:  # not being taken: reads will do
                offered.clear()
            offered[ev.seq] = ev
        self._wake.set()

    async def rebuild(self) -> int:
        """Drop the read model and replay every source from the start."""
        async with self._lock:
            self.store.reset(self.name)
        log.info("projection %s: rebuilding", self.name)
        return await self.catch_up()

    async def status(self) -> ProjectionStatus:
        """Checkpoints and lag, asking the server how many events wait after each checkpoint."""
        checkpoints = self.store.checkpoints(self.name)
        rows = []
        for source in self.projection.sources:
            cp = checkpoints.get(source.key, 0)
            pending = 0
            reader = read_batches(self.nc, source.stream, source.subject, cp + 1, 1, self.timeout)
            async with contextlib.aclosing(reader):
                async for chunk in reader:
                    pending = chunk[0].pending + 1
                    break
            rows.append(SourceStatus(source.key, cp, pending))
        return ProjectionStatus(self.name, tuple(rows), self.stats.last_error)

    # -- following --------------------------------------------------------

    async def start(self) -> Projector:
        """Catch up in the background and keep following new events."""
        if self._task is not None:
            return self
        for source in self.projection.sources:
            try:
                info = await self.nc.jetstream().stream_info(source.stream)
                stream_subjects = list(info.config.subjects or [])
            except nats.js.errors.NotFoundError:  # not created yet: read and poll it
                stream_subjects = []
            subjects = [source.subject]
            if source.subject == ">" or stream_subjects == [source.subject]:
                self._whole.add(source.stream)
                # The whole stream: wake on its subjects, not on every subject of the server.
                subjects = stream_subjects
            if self.follow:
                for subject in subjects:
                    self._subs.append(await self.nc.subscribe(subject, cb=self._on_wake))
        self._task = asyncio.create_task(self._run(), name=f"meshkit-projection-{self.name}")
        return self

    async def _on_wake(self, msg: Any) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.catch_up()
                self.stats.last_error = ""
                self.stats.passes += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failing handler must not skip events: retry later
                self.stats.errors += 1
                self.stats.last_error = repr(exc)
                log.error(
                    "projection %s: %r; retrying in %.1fs", self.name, exc, self.poll_interval
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def wait_caught_up(self, within: float = 10.0) -> ProjectionStatus:
        """Wait until no source has pending events (for tests and tools)."""
        end = time.monotonic() + within
        while True:
            status = await self.status()
            if status.lag == 0:
                return status
            if time.monotonic() > end:
                raise TimeoutError(f"projection {self.name} still {status.lag} events behind")
            self._wake.set()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class _Relay:
    """A projection with no documents: it only carries a checkpoint."""

    def __init__(self, name: str, sources: Sequence[Source]) -> None:
        self.name = name
        self.sources: Sequence[Source] = tuple(sources)

    def handle(self, event: StoredEvent, tx: ReadModelTx) -> None:
        return None


def relay(
    nc: NATS,
    name: str,
    sources: Sequence[Source],
    store: ReadModelStore,
    publish: Callable[[StoredEvent], Awaitable[None]],
    *,
    types: Sequence[str] = (),
    batch: int = 200,
    follow: bool = True,
) -> Projector:
    """Forward stored events (e.g. an aggregate stream) to the saga bus, at least once.

    The event store is then its own outbox: an aggregate's append is the only
    write, and this relay publishes each event (``types``: only these full names)
    with ``publish``, which must set ``Nats-Msg-Id`` to the event id so JetStream
    drops the copies a crash between publish and checkpoint can cause. Example,
    with the saga bus: ``publish=lambda ev: bus.publish_raw(stream.subject_for(
    ev.event_type), ev.data, ev.envelope.to_headers())``.

    Events of one aggregate are published in order, different aggregates'
    concurrently. In the writing process, ``store.on_append(projector.offer)``
    hands appends over without a read; ``follow=False`` then also drops the
    subscription that wakes the relay for other writers' events, which wait for
    the next poll instead.
    """
    wanted = frozenset(types)

    async def in_order(events: list[StoredEvent]) -> None:
        for ev in events:
            await publish(ev)

    async def forward(events: list[StoredEvent]) -> None:
        # One chain per aggregate (its subjects differ by event type).
        chains: dict[tuple[str, str, str], list[StoredEvent]] = {}
        for ev in events:
            if not wanted or ev.event_type in wanted:
                key = (ev.stream, ev.aggregate_type, ev.aggregate_id)
                chains.setdefault(key, []).append(ev)
        if len(chains) == 1:
            await in_order(next(iter(chains.values())))
        elif chains:
            await asyncio.gather(*(in_order(chain) for chain in chains.values()))

    return Projector(
        nc, _Relay(name, sources), store, batch=batch, before_commit=forward, follow=follow
    )
