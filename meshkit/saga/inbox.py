"""Inboxes: exactly-once local effects under redelivery.

A participant runs each handler through :meth:`Inbox.run_once` with the
event's key. The inbox records the key together with the handler's output
events; a redelivered event finds the record, skips the handler, and gets the
recorded outputs back to publish again (their deterministic ids make
JetStream drop the copies).

* :class:`SqliteInbox` stores the record in the same SQLite transaction as the
  handler's own writes: the effect and "processed" commit together or not at all.
* :class:`KvInbox` stores it in JetStream KV, for participants whose effects live
  elsewhere; there the effect and the record are not atomic, so the effect must
  itself be idempotent (a crash between them repeats it once).
* :class:`IdempotentInbox` records nothing, for handlers whose effects already
  deduplicate themselves (an event-store append with deterministic event ids):
  a redelivered event runs its handler again, which finds the work done.
* :class:`MemoryInbox` is for tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import nats.js.errors

from meshkit.saga._locks import KeyedLocks

__all__ = ["IdempotentInbox", "Inbox", "KvInbox", "MemoryInbox", "Outbound", "SqliteInbox"]


@dataclass(frozen=True, slots=True)
class Outbound:
    """An event a handler emitted: its type, its (deterministic) id and payload."""

    event_type: str
    event_id: str
    payload: bytes


Work = Callable[[Any], Awaitable[list[Outbound]]]
_Item = tuple[str, Work, "asyncio.Future[tuple[list[Outbound], bool]]", contextvars.Context]


async def _call(work: Work, handle: Any) -> list[Outbound]:
    return await work(handle)


def encode_outputs(outputs: Sequence[Outbound]) -> bytes:
    return json.dumps(
        [[o.event_type, o.event_id, base64.b64encode(o.payload).decode()] for o in outputs]
    ).encode()


def decode_outputs(raw: bytes) -> list[Outbound]:
    return [Outbound(t, i, base64.b64decode(p)) for t, i, p in json.loads(raw or b"[]")]


class Inbox(Protocol):
    """Runs a handler's work at most once per key and remembers its outputs."""

    async def run_once(self, key: str, work: Work) -> tuple[list[Outbound], bool]:
        """Run ``work(handle)`` unless ``key`` was done; returns (outputs, was_duplicate)."""
        ...


class MemoryInbox:
    """A process-local inbox (tests, or effects that are themselves in memory)."""

    def __init__(self) -> None:
        self.done: dict[str, list[Outbound]] = {}
        self._lock = asyncio.Lock()

    async def run_once(self, key: str, work: Work) -> tuple[list[Outbound], bool]:
        async with self._lock:
            if key in self.done:
                return self.done[key], True
            outputs = await work(None)
            self.done[key] = outputs
            return outputs, False


class IdempotentInbox:
    """No record at all: for handlers that are idempotent by construction.

    The handler runs on every delivery, concurrently for different keys and one at
    a time per key, with no store of its own (``work`` gets None). Use it when
    the handler's only effect is a write that recognises its own repeat, such as
    :meth:`~meshkit.saga.eventstore.Repository.execute` with ``event_ids``
    derived from the event id. Its outputs must be the same on every run: their
    deterministic ids make JetStream drop the repeats.
    """

    def __init__(self) -> None:
        self._locks = KeyedLocks()

    async def run_once(self, key: str, work: Work) -> tuple[list[Outbound], bool]:
        async with self._locks.hold(key):
            return await work(None), False


class SqliteInbox:
    """The inbox inside the participant's own SQLite database, with group commit.

    ``work`` gets the connection inside an open transaction and must do its writes
    there (and must not wait on anything that needs the same connection). Pass the
    same ``lock`` the rest of the process uses around that connection.

    Events handled concurrently share one ``BEGIN IMMEDIATE ... COMMIT`` (up to
    ``max_batch`` of them), each inside its own savepoint: a failing handler rolls
    back only its own writes, and nobody's outputs are published or input
    acknowledged before the commit that holds their effect. The commit is most of a
    small transaction's cost, so under load this multiplies what one process can
    handle; ``max_batch=1`` gives one transaction per event.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        lock: asyncio.Lock | None = None,
        *,
        table: str = "meshkit_inbox",
        max_batch: int = 64,
    ) -> None:
        if not table.replace("_", "").isalnum():
            raise ValueError(f"table name {table!r} must be alphanumeric or _")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        self.conn = conn
        self.lock = lock or asyncio.Lock()
        self.table = table
        self.max_batch = max_batch
        self.commits = 0
        self._pending: list[_Item] = []
        self._flusher: asyncio.Task[None] | None = None
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} ("
            " key TEXT PRIMARY KEY, outputs BLOB NOT NULL, processed_at REAL NOT NULL)"
        )

    async def run_once(self, key: str, work: Work) -> tuple[list[Outbound], bool]:
        fut: asyncio.Future[tuple[list[Outbound], bool]] = (
            asyncio.get_running_loop().create_future()
        )
        # The handler runs in the flusher's task but must see the caller's context
        # (its propagated deadline, its consumer span).
        self._pending.append((key, work, fut, contextvars.copy_context()))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                await self._run_batch(batch)
            except BaseException as exc:
                for _, _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

    async def _run_batch(self, batch: list[_Item]) -> None:
        results: list[tuple[asyncio.Future[tuple[list[Outbound], bool]], Any, bool]] = []
        seen: dict[str, list[Outbound]] = {}
        async with self.lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                for key, work, fut, ctx in batch:
                    if key in seen:  # the same event twice in one batch
                        results.append((fut, (seen[key], True), True))
                        continue
                    row = conn.execute(
                        f"SELECT outputs FROM {self.table} WHERE key = ?", (key,)
                    ).fetchone()
                    if row is not None:
                        results.append((fut, (decode_outputs(row[0]), True), True))
                        continue
                    conn.execute("SAVEPOINT meshkit_event")
                    try:
                        outputs = await asyncio.create_task(_call(work, conn), context=ctx)
                        conn.execute(
                            f"INSERT INTO {self.table} VALUES (?, ?, julianday('now'))",
                            (key, encode_outputs(outputs)),
                        )
                    except Exception as exc:
                        conn.execute("ROLLBACK TO meshkit_event")
                        conn.execute("RELEASE meshkit_event")
                        results.append((fut, exc, False))
                        continue
                    conn.execute("RELEASE meshkit_event")
                    seen[key] = outputs
                    results.append((fut, (outputs, False), True))
                # Inside the try: a failed COMMIT (disk full, I/O error) leaves the
                # transaction open, and every later BEGIN would fail on it.
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.commits += 1
        for fut, value, ok in results:
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def processed(self) -> int:
        """How many events this inbox has recorded."""
        return int(self.conn.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0])


class KvInbox:
    """The inbox in a JetStream KV bucket (see the module docstring for its guarantee)."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self._locks = KeyedLocks()

    @staticmethod
    def _key(key: str) -> str:
        # KV keys allow [-/_=.a-zA-Z0-9]; event keys use '/' and hex.
        return "".join(c if c.isalnum() or c in "-_=." else "." for c in key)

    async def run_once(self, key: str, work: Work) -> tuple[list[Outbound], bool]:
        k = self._key(key)
        async with self._locks.hold(k):
            try:
                entry = await self.kv.get(k)
                return decode_outputs(entry.value or b""), True
            except nats.js.errors.KeyNotFoundError:
                pass
            outputs = await work(None)
            await self.kv.put(k, encode_outputs(outputs))
            return outputs, False
