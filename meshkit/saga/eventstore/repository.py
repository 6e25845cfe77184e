"""Aggregates through the store: a :class:`Repository` loads one (from its newest
snapshot, then its events since), runs a command on it and saves the events the
command decided, retrying on conflicts; :class:`Loaded` is an aggregate with its
version, :class:`StateCodec` how its state becomes a snapshot."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from meshkit.errors import ConfigError
from meshkit.saga._locks import KeyedLocks
from meshkit.saga.envelope import now_ms
from meshkit.saga.eventstore.appliers import Appliers
from meshkit.saga.eventstore.errors import AggregateConflict
from meshkit.saga.eventstore.events import _NAME, Version
from meshkit.saga.eventstore.store import EventStore
from meshkit.saga.eventstore.upcasters import Upcasters

log = logging.getLogger("meshkit.saga.eventstore")

A = TypeVar("A")


@dataclass
class Loaded(Generic[A]):
    """An aggregate's state with the version it was loaded (or saved) at."""

    aggregate_id: str
    state: A
    version: Version
    snapshot_version: int | None = None
    replayed: int = 0


@dataclass(frozen=True)
class StateCodec(Generic[A]):
    """How an aggregate's state becomes snapshot bytes and back.

    ``schema`` is the codec's version: a snapshot written with another schema is
    ignored (the aggregate is replayed instead), so changing the state's shape
    never needs a migration of snapshots.
    """

    dump: Callable[[A], bytes]
    load: Callable[[str, bytes], A]
    schema: int = 1


class Repository(Generic[A]):
    """Loads and saves one aggregate type through an :class:`EventStore`.

    ``factory(id)`` makes an empty aggregate. With ``snapshots`` and
    ``snapshot_every=N`` (and a ``codec``), every save that crosses a multiple of
    N events writes a snapshot, and loads start from the newest one.

    ``cache_size=N`` keeps the N aggregates :meth:`execute` wrote last in memory,
    so a command on one of them decides without reading it back. The append's
    expected-sequence check still guards it: when another process wrote in
    between, the append is refused and the command reloads and runs again. A
    command that decides nothing, or raises, on a cached state is run once more on
    the stored state, as a stale state may be the reason. Commands on one
    aggregate are then serialized within the process (no conflicts among them).
    A command works on a copy of the cached state (``copy.deepcopy``; an
    aggregate may define ``__deepcopy__`` to make it cheaper), so what an earlier
    command returned never changes.
    """

    def __init__(
        self,
        store: EventStore,
        aggregate_type: str,
        factory: Callable[[str], A],
        *,
        aggregate_class: type[A] | None = None,
        snapshots: Any = None,
        snapshot_every: int = 0,
        codec: StateCodec[A] | None = None,
        upcasters: Upcasters | None = None,
        cache_size: int = 0,
    ) -> None:
        if not _NAME.match(aggregate_type):
            raise ConfigError(
                "repository.aggregate_type", f"{aggregate_type!r} must match [A-Za-z0-9_-]+"
            )
        if snapshot_every < 0:
            raise ConfigError("repository.snapshot_every", f"{snapshot_every!r}: must be >= 0")
        if cache_size < 0:
            raise ConfigError("repository.cache_size", f"{cache_size!r}: must be >= 0")
        if snapshot_every and (snapshots is None or codec is None):
            raise ConfigError(
                "repository.snapshot_every", "snapshots need a snapshot store and a codec"
            )
        cls = aggregate_class or (factory if isinstance(factory, type) else None)
        if cls is None:
            raise ConfigError("repository.aggregate_class", "needed when factory is not the class")
        self.store = store
        self.aggregate_type = aggregate_type
        self.factory = factory
        self.appliers: Appliers[A] = Appliers(cls)
        self.snapshots = snapshots
        self.snapshot_every = snapshot_every
        self.codec = codec
        self.upcasters = upcasters or Upcasters()
        self.cache_size = cache_size
        self.cache_hits = 0
        self._cache: collections.OrderedDict[str, Loaded[A]] = collections.OrderedDict()
        self._locks = KeyedLocks()

    async def load(
        self,
        aggregate_id: str,
        *,
        version: int | None = None,
        as_of_ms: int | None = None,
        use_snapshots: bool = True,
        consistent: bool = False,
    ) -> Loaded[A]:
        """The aggregate now, or as of ``version`` / Unix time ``as_of_ms`` (time travel).

        ``consistent``: the state has every event the stream leader acknowledged
        before the call (checked with the leader after reading; see
        :meth:`catch_up`). Without it a replica that is behind may answer the read,
        which only a decision that writes nothing needs to care about (an append
        is checked by the leader anyway).
        """
        snap = None
        if use_snapshots and self.snapshots is not None and self.codec is not None:
            if version is None and as_of_ms is None:
                snap = await self.snapshots.get(self.aggregate_type, aggregate_id)
            else:
                snap = await self.snapshots.best(
                    self.aggregate_type, aggregate_id, version=version, as_of_ms=as_of_ms
                )
            if snap is not None and snap.schema != self.codec.schema:
                log.info(
                    "ignoring snapshot of %s/%s: schema %d, codec wants %d",
                    self.aggregate_type,
                    aggregate_id,
                    snap.schema,
                    self.codec.schema,
                )
                snap = None
        if snap is not None and self.codec is not None:
            state = self.codec.load(aggregate_id, snap.state)
            at = Version(snap.version, snap.seq)
        else:
            state = self.factory(aggregate_id)
            at = Version()
        events = await self.store.read(
            self.aggregate_type,
            aggregate_id,
            after=at if at.seq else None,
            to_version=version,
            until_ms=as_of_ms,
        )
        for ev in events:
            ev = self.upcasters.upcast(ev)
            self.appliers.apply(state, self.appliers.decode(ev))
            at = Version(ev.version, ev.seq)
        loaded = Loaded(
            aggregate_id,
            state,
            at,
            snapshot_version=snap.version if snap is not None else None,
            replayed=len(events),
        )
        if consistent and version is None and as_of_ms is None:
            await self.catch_up(loaded)
        return loaded

    async def catch_up(self, loaded: Loaded[A]) -> bool:
        """Apply to ``loaded`` what the stream leader has beyond it; True if anything.

        Reads on a replicated stream may be answered by a follower that has not
        applied the latest writes yet: the leader's last sequence for the aggregate
        says whether it did, and the missing events come from the leader.
        """
        last = await self.store.leader_version(self.aggregate_type, loaded.aggregate_id)
        if last.seq <= loaded.version.seq:
            return False
        tail = await self.store.read_from_leader(
            self.aggregate_type, loaded.aggregate_id, after=loaded.version, through_seq=last.seq
        )
        for ev in tail:
            self.appliers.apply(loaded.state, self.appliers.decode(self.upcasters.upcast(ev)))
            loaded.version = ev.version_at()
        loaded.replayed += len(tail)
        if tail:
            log.info(
                "%s/%s: a read missed %d event(s) the leader has (a replica behind); caught up",
                self.aggregate_type,
                loaded.aggregate_id,
                len(tail),
            )
        return bool(tail)

    async def save(
        self,
        loaded: Loaded[A],
        events: Sequence[Message],
        *,
        event_ids: Sequence[str] | None = None,
        saga_id: str = "",
        saga_type: str = "",
        causation_id: str = "",
        only_new: bool = False,
        saga_deadline_ms: int | None = None,
    ) -> Loaded[A]:
        """Append ``events`` at ``loaded.version``, apply them, snapshot when due.

        ``only_new``, ``saga_deadline_ms``: see :meth:`EventStore.append`.
        """
        if not events:
            return loaded
        result = await self.store.append(
            self.aggregate_type,
            loaded.aggregate_id,
            events,
            expected=loaded.version,
            event_ids=event_ids,
            saga_id=saga_id,
            saga_type=saga_type,
            causation_id=causation_id,
            only_new=only_new,
            saga_deadline_ms=saga_deadline_ms,
        )
        if result.duplicate and result.events[0].version != loaded.version.number + 1:
            # A retry whose events were stored by its first try, decided on a state
            # that already has them (or has moved on): the answer is the state right
            # after them, as the first try returned it, never them applied twice.
            if loaded.version == result.version:
                return loaded
            return await self.load(loaded.aggregate_id, version=result.version.number)
        for event in events:
            self.appliers.apply(loaded.state, event)
        old = loaded.version.number
        loaded = Loaded(loaded.aggregate_id, loaded.state, result.version, loaded.snapshot_version)
        every = self.snapshot_every
        if every and result.version.number // every > old // every:
            await self.snapshot(loaded)
        return loaded

    async def snapshot(self, loaded: Loaded[A]) -> None:
        """Write a snapshot of ``loaded`` now (best effort: failures are logged)."""
        if self.snapshots is None or self.codec is None:
            raise ConfigError("repository.snapshots", "no snapshot store or codec configured")
        from meshkit.saga.snapshots import Snapshot

        snap = Snapshot(
            aggregate_type=self.aggregate_type,
            aggregate_id=loaded.aggregate_id,
            version=loaded.version.number,
            seq=loaded.version.seq,
            timestamp_ms=now_ms(),
            schema=self.codec.schema,
            state=self.codec.dump(loaded.state),
        )
        try:
            await self.snapshots.put(snap)
            loaded.snapshot_version = snap.version
        except Exception as exc:  # a missed snapshot only costs a longer load
            log.warning(
                "snapshot of %s/%s failed: %r", self.aggregate_type, loaded.aggregate_id, exc
            )

    async def execute(
        self,
        aggregate_id: str,
        decide: Callable[[A], Sequence[Message]],
        *,
        retries: int = 5,
        event_ids: Callable[[int], str] | None = None,
        saga_id: str = "",
        saga_type: str = "",
        causation_id: str = "",
        expect_new: bool = False,
        saga_deadline_ms: int | None = None,
    ) -> Loaded[A]:
        """Load, ``decide`` the new events from the state, save; reload and retry on conflict.

        ``decide`` must be free of side effects: it may run more than once.
        ``expect_new``: the aggregate is most likely new (a create), so decide on an
        empty one without reading; an append that finds any event there, this
        command's own earlier attempt included, is a conflict, and the command
        runs again on the loaded aggregate. ``saga_deadline_ms``: see :meth:`EventStore.append`.
        """
        # With a cache, commands on one aggregate take turns (no conflicts among them).
        turn = self._locks.hold(aggregate_id) if self.cache_size else contextlib.nullcontext()
        async with turn:
            # Out of the cache while the command runs: only a saved state goes back.
            cached = self._cache.pop(aggregate_id, None)
            loaded = await self._execute(
                aggregate_id,
                decide,
                retries,
                event_ids,
                saga_id,
                saga_type,
                causation_id,
                cached,
                expect_new and cached is None,
                saga_deadline_ms,
            )
            if self.cache_size:
                self._cache[aggregate_id] = loaded
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return loaded

    async def _execute(
        self,
        aggregate_id: str,
        decide: Callable[[A], Sequence[Message]],
        retries: int,
        event_ids: Callable[[int], str] | None,
        saga_id: str,
        saga_type: str,
        causation_id: str,
        cached: Loaded[A] | None = None,
        expect_new: bool = False,
        saga_deadline_ms: int | None = None,
    ) -> Loaded[A]:
        # A guess (an empty aggregate, a cached one) that fails costs one more attempt.
        last = retries + (1 if expect_new else 0)
        for attempt in range(last + 1):
            only_new = expect_new and attempt == 0
            if only_new:
                guess: Loaded[A] | None = Loaded(
                    aggregate_id, self.factory(aggregate_id), Version()
                )
            elif cached is not None:
                # A copy: the command applies its events to it, and the Loaded an
                # earlier command returned must not change under its caller.
                guess = Loaded(
                    aggregate_id,
                    _copied(cached.state),
                    cached.version,
                    cached.snapshot_version,
                )
            else:
                guess = None
            cached = None
            if guess is not None:
                loaded = guess
                try:
                    events = list(decide(loaded.state))
                except Exception:
                    events = []
                if not events:  # maybe the guess is wrong: decide on the stored state
                    only_new = False
                    loaded, events = await self._decide_on_stored(aggregate_id, decide, attempt > 0)
                elif not only_new:
                    self.cache_hits += 1
            else:
                # After a conflict the read is confirmed with the leader: a replica
                # that is behind would only lead to the same conflict again.
                loaded, events = await self._decide_on_stored(aggregate_id, decide, attempt > 0)
            ids = [event_ids(i) for i in range(len(events))] if event_ids else None
            try:
                return await self.save(
                    loaded,
                    events,
                    event_ids=ids,
                    saga_id=saga_id,
                    saga_type=saga_type,
                    causation_id=causation_id,
                    only_new=only_new,
                    saga_deadline_ms=saga_deadline_ms,
                )
            except AggregateConflict:
                if attempt == last:
                    raise
                await asyncio.sleep(0)
        raise AssertionError("unreachable")

    async def _decide_on_stored(
        self, aggregate_id: str, decide: Callable[[A], Sequence[Message]], consistent: bool
    ) -> tuple[Loaded[A], list[Message]]:
        """Load (``consistent``: see :meth:`load`) and decide. A decision to write
        nothing (or a refusal) is taken only on a state the stream leader confirms:
        an append is checked by the leader, a no-op is not, so a read answered by a
        replica that is behind must not make one.
        """
        loaded = await self.load(aggregate_id, consistent=consistent)
        try:
            events = list(decide(loaded.state))
        except Exception:
            if not await self.catch_up(loaded):
                raise
            events = list(decide(loaded.state))
        if not events and await self.catch_up(loaded):
            events = list(decide(loaded.state))
        return loaded, events


def _copied(state: Any) -> Any:
    """``copy.deepcopy(state)``; a class's own ``__deepcopy__`` is called directly (the
    copy module's memo and dispatch cost more than a small aggregate's copy)."""
    own = getattr(type(state), "__deepcopy__", None)
    return own(state, {}) if own is not None else copy.deepcopy(state)
