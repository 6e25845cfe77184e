"""Aggregate snapshots in JetStream KV.

One key per aggregate, ``<aggregate type>.<id>``; the bucket keeps a few
revisions (``history``) so a load as of a past version or time can start from an
older snapshot. A value is one line of JSON metadata, a newline, then the state
bytes the repository's :class:`~meshkit.saga.eventstore.StateCodec` produced:
readable with ``nats kv get`` and free of any code execution on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import nats.js.errors
from nats.aio.client import Client as NATS

from meshkit.errors import ConfigError
from meshkit.saga import cluster

__all__ = ["Snapshot", "SnapshotStore"]


@dataclass(frozen=True)
class Snapshot:
    """An aggregate's state after ``version`` events (the last at stream ``seq``)."""

    aggregate_type: str
    aggregate_id: str
    version: int
    seq: int
    timestamp_ms: int
    schema: int
    state: bytes

    def encode(self) -> bytes:
        meta = {
            "type": self.aggregate_type,
            "id": self.aggregate_id,
            "version": self.version,
            "seq": self.seq,
            "ts": self.timestamp_ms,
            "schema": self.schema,
        }
        return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + self.state

    @classmethod
    def decode(cls, raw: bytes) -> Snapshot:
        head, sep, state = raw.partition(b"\n")
        if not sep:
            raise ValueError("snapshot value has no metadata line")
        meta = json.loads(head)
        return cls(
            aggregate_type=str(meta["type"]),
            aggregate_id=str(meta["id"]),
            version=int(meta["version"]),
            seq=int(meta["seq"]),
            timestamp_ms=int(meta["ts"]),
            schema=int(meta["schema"]),
            state=state,
        )


class SnapshotStore:
    """Snapshots of aggregates, in KV bucket ``bucket`` (created on first use).

    ``replicas``: the bucket's; None takes ``MESHKIT_NATS_REPLICAS``
    (:mod:`meshkit.saga.cluster`).
    """

    def __init__(
        self,
        nc: NATS,
        *,
        bucket: str = "meshkit_snapshots",
        history: int = 8,
        storage: Literal["file", "memory"] = "file",
        replicas: int | None = None,
    ) -> None:
        if not 1 <= history <= 64:
            raise ConfigError("snapshots.history", f"{history!r}: expected 1..64 (a KV limit)")
        cluster.check_replicas(replicas, "snapshots.replicas")
        self.replicas = replicas
        self.js = nc.jetstream()
        self.bucket = bucket
        self.history = history
        self.storage = storage
        self._kv: Any = None

    async def kv(self) -> Any:
        if self._kv is None:
            self._kv = await cluster.ensure_key_value(
                self.js,
                self.bucket,
                history=self.history,
                storage=self.storage,
                replicas_=self.replicas,
            )
        return self._kv

    @staticmethod
    def key(aggregate_type: str, aggregate_id: str) -> str:
        return f"{aggregate_type}.{aggregate_id}"

    async def put(self, snapshot: Snapshot) -> None:
        """Store ``snapshot`` unless a newer one is already there."""
        kv = await self.kv()
        current = await self.get(snapshot.aggregate_type, snapshot.aggregate_id)
        if current is not None and current.version >= snapshot.version:
            return
        key, data = self.key(snapshot.aggregate_type, snapshot.aggregate_id), snapshot.encode()
        # Safe to repeat (the same bytes under the same key); rides out an election.
        await cluster.retrying(f"snapshot put {key}", lambda: kv.put(key, data))

    async def get(self, aggregate_type: str, aggregate_id: str) -> Snapshot | None:
        """The newest snapshot, or None."""
        kv = await self.kv()
        key = self.key(aggregate_type, aggregate_id)
        try:
            entry = await cluster.retrying(f"snapshot get {key}", lambda: kv.get(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return Snapshot.decode(entry.value)

    async def best(
        self,
        aggregate_type: str,
        aggregate_id: str,
        *,
        version: int | None = None,
        as_of_ms: int | None = None,
    ) -> Snapshot | None:
        """The newest kept snapshot at or before ``version`` and ``as_of_ms``."""
        kv = await self.kv()
        key = self.key(aggregate_type, aggregate_id)
        try:
            entries = await cluster.retrying(f"snapshot history {key}", lambda: kv.history(key))
        except nats.js.errors.NoKeysError:
            return None
        best: Snapshot | None = None
        for entry in entries:
            if not entry.value:
                continue
            snap = Snapshot.decode(entry.value)
            if version is not None and snap.version > version:
                continue
            if as_of_ms is not None and snap.timestamp_ms > as_of_ms:
                continue
            if best is None or snap.version > best.version:
                best = snap
        return best

    async def delete(self, aggregate_type: str, aggregate_id: str) -> None:
        kv = await self.kv()
        key = self.key(aggregate_type, aggregate_id)
        await cluster.retrying(f"snapshot purge {key}", lambda: kv.purge(key))
