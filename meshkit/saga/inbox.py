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
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import nats.js.errors

from meshkit.saga._locks import KeyedLocks

__all__ = [
    "IdempotentInbox",
    "Inbox",
    "KvInbox",
    "MemoryInbox",
    "Outbound",
    "Result",
    "SqliteInbox",
    "run_many",
]


@dataclass(frozen=True, slots=True)
class Outbound:
    """An event a handler emitted: its type, its (deterministic) id and payload."""

    event_type: str
    event_id: str
    payload: bytes


Work = Callable[[Any], Awaitable[list[Outbound]]]
#: What :func:`run_many` gives back for each event: (outputs, was_duplicate), or the
#: exception its work raised.
Result = tuple[list[Outbound], bool] | Exception
# (key, work, its future, its context, whether to keep a record of it)
_Item = tuple[str, Work, "asyncio.Future[tuple[list[Outbound], bool]]", contextvars.Context, bool]

# Recorded outputs, binary (since #15): this byte, then per output three length-prefixed
# fields (type, id, payload; 4-byte big-endian lengths). Records written before are JSON
# (``[[type, id, base64 payload], ...]``, so they start with "[") and still decode.
_BINARY = b"\x01"
_LEN = struct.Struct(">I")


def encode_outputs(outputs: Sequence[Outbound]) -> bytes:
    """Outputs as an inbox record (binary; see ``_BINARY``)."""
    parts = [_BINARY]
    pack = _LEN.pack
    for o in outputs:
        etype = o.event_type.encode()
        eid = o.event_id.encode()
        parts += (pack(len(etype)), etype, pack(len(eid)), eid, pack(len(o.payload)), o.payload)
    return b"".join(parts)


def encode_outputs_json(outputs: Sequence[Outbound]) -> bytes:
    """Outputs in the JSON record format (what inboxes wrote before #15; the KV inbox's)."""
    return json.dumps(
        [[o.event_type, o.event_id, base64.b64encode(o.payload).decode()] for o in outputs]
    ).encode()


def decode_outputs(raw: bytes) -> list[Outbound]:
    """An inbox record's outputs, in either format (binary, or the older JSON)."""
    if not raw:
        return []
    raw = bytes(raw)
    if raw[:1] != _BINARY:
        return [Outbound(t, i, base64.b64decode(p)) for t, i, p in json.loads(raw)]
    out: list[Outbound] = []
    at, end = 1, len(raw)
    unpack = _LEN.unpack_from
    while at < end:
        fields: list[bytes] = []
        for _ in range(3):
            if at + 4 > end:
                raise ValueError("inbox record: truncated outputs")
            (n,) = unpack(raw, at)
            at += 4
            fields.append(raw[at : at + n])
            at += n
        if at > end:
            raise ValueError("inbox record: truncated outputs")
        out.append(Outbound(fields[0].decode(), fields[1].decode(), fields[2]))
    return out


class _Rest:
    """The rest of a coroutine that suspended on its first step, awaitable by a task."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Any:
        return _resume(self.coro, self.first)


def _resume(coro: Any, first: Any) -> Any:
    # Hand the task what the coroutine waits on; when it is done, go on with the
    # coroutine (``yield from`` forwards sends, throws and cancellation from then on).
    try:
        yield first
    except BaseException as exc:
        try:
            nxt = coro.throw(exc)
        except StopIteration as stop:
            return stop.value
        return (yield from _resume(coro, nxt))
    return (yield from coro.__await__())


async def _finish(coro: Any, first: Any) -> Any:
    return await _Rest(coro, first)


async def _inline(work: Work, handle: Any, ctx: contextvars.Context) -> list[Outbound]:
    """``await work(handle)`` in ``ctx`` (the caller's context), without a task when the
    work never suspends (the common case: SQLite work is synchronous); work that does
    suspend goes on in a task running in ``ctx``."""
    coro: Any = work(handle)
    if not hasattr(coro, "send"):  # an awaitable that is not a coroutine
        return await coro  # type: ignore[no-any-return]
    try:
        first = ctx.run(coro.send, None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    return await asyncio.get_running_loop().create_task(_finish(coro, first), context=ctx)  # type: ignore[no-any-return]


def _fail(batch: list[_Item], exc: BaseException) -> None:
    """Settle every unsettled future of a batch that failed as a whole: cancelled when
    the batch was (a waiter then sees CancelledError, and an abandoned future logs
    nothing), else with the exception."""
    cancelled = isinstance(exc, asyncio.CancelledError)
    for _, _, fut, _, _ in batch:
        if fut.done():
            continue
        if cancelled:
            fut.cancel()
        else:
            fut.set_exception(exc)


class _Failed(Exception):
    """A handler of a batch raised ``exc`` (the batch's ``index``-th event)."""

    def __init__(self, index: int, exc: Exception) -> None:
        super().__init__(index, exc)
        self.index = index
        self.exc = exc


class Inbox(Protocol):
    """Runs a handler's work at most once per key and remembers its outputs."""

    async def run_once(self, key: str, work: Work) -> tuple[list[Outbound], bool]:
        """Run ``work(handle)`` unless ``key`` was done; returns (outputs, was_duplicate)."""
        ...


async def run_many(
    inbox: Inbox, items: Sequence[tuple[str, Work, contextvars.Context, bool]]
) -> list[Result]:
    """``inbox.run_once(key, work)`` for each (key, work, context, idempotent),
    concurrently, each in its context.

    An inbox with its own ``run_many`` (:class:`SqliteInbox`) takes them all at once,
    with no task per item, and keeps no record of the items marked idempotent (their
    work runs on every delivery; see ``Participant.on``); any other :class:`Inbox`
    gets a task per item and records every one, as ``run_once`` does.
    """
    own = getattr(inbox, "run_many", None)
    if own is not None:
        return await own(items)  # type: ignore[no-any-return]
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(inbox.run_once(key, work), context=ctx) for key, work, ctx, _ in items
    ]
    if len(tasks) == 1:  # the common batch under light load: no gather to set up
        try:
            return [await tasks[0]]
        except Exception as exc:
            return [exc]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    for result in done:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result
    return done  # type: ignore[return-value]


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
    ``max_batch`` of them): one select finds which of them were recorded before,
    the new ones' handlers run one after the other (inline, each in its caller's
    context; a handler that awaits something goes on in a task), and one
    ``executemany`` records them. Nobody's outputs are published or input
    acknowledged before the commit that holds their effect. When a handler raises,
    the transaction is rolled back and the batch done again with each event in its
    own savepoint, so a failing handler rolls back only its own writes (the others
    run a second time; the failed one does not). The commit is most of a small
    transaction's cost, so under load this multiplies what one process can handle;
    ``max_batch=1`` gives one transaction per event. :meth:`run_many` with nothing
    else pending commits its items in the caller's own task (a flusher task and the
    two loop turns around it cost ~15 µs per batch, measured); whatever arrives
    meanwhile goes to a flusher task.

    Records hold the outputs in a binary format; records in the JSON format inboxes
    wrote before still read (a database written by this version is not readable
    by older ones).
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
        self._inline = False  # a run_many caller is committing its own batch
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
        self._pending.append((key, work, fut, contextvars.copy_context(), True))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def run_many(
        self, items: Sequence[tuple[str, Work, contextvars.Context, bool]]
    ) -> list[Result]:
        """:meth:`run_once` for each (key, work, context, idempotent), the work run in
        its context; each one's result or exception, in order. They join the same group
        commit. An idempotent item's work runs in the transaction with no record looked
        up or kept (it is never a duplicate)."""
        loop = asyncio.get_running_loop()
        futures = []
        for key, work, ctx, idempotent in items:
            fut: asyncio.Future[tuple[list[Outbound], bool]] = loop.create_future()
            self._pending.append((key, work, fut, ctx, not idempotent))
            futures.append(fut)
        if self._flusher is None or self._flusher.done():
            if self._inline:
                self._flusher = asyncio.create_task(self._flush())
            else:
                await self._flush_own()
        results: list[Result] = []
        for fut in futures:
            try:
                results.append(await fut)
            except Exception as exc:
                results.append(exc)
        return results

    async def _flush_own(self) -> None:
        """The first batch of what is pending, in the caller's task: nothing else was
        pending and no flusher ran, so the batch is the caller's own items (no task,
        and no loop turn before the commit nor after it). What arrives meanwhile goes
        to a flusher task, so cancelling this caller fails its own batch only."""
        self._inline = True
        try:
            await self._run_next()
        finally:
            self._inline = False
            if self._pending and (self._flusher is None or self._flusher.done()):
                self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            await self._run_next()

    async def _run_next(self) -> None:
        """Commit the next batch of what is pending; a batch that fails as a whole
        settles its own futures (a cancellation goes on up)."""
        batch = self._pending[: self.max_batch]
        del self._pending[: self.max_batch]
        try:
            await self._run_batch(batch)
        except BaseException as exc:
            _fail(batch, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _run_batch(self, batch: list[_Item]) -> None:
        results: list[tuple[asyncio.Future[tuple[list[Outbound], bool]], Any, bool]] = []
        async with self.lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                keys = list(dict.fromkeys(item[0] for item in batch if item[4]))
                recorded: dict[str, list[Outbound]] = {}
                if keys:
                    for key, raw in conn.execute(
                        f"SELECT key, outputs FROM {self.table} WHERE key IN "
                        f"({','.join('?' * len(keys))})",
                        keys,
                    ):
                        recorded[key] = decode_outputs(raw)
                try:
                    # No savepoints while nothing fails: the whole batch is one unit.
                    records = await self._run_all(batch, recorded, results)
                except _Failed as failed:
                    # A handler failed: its writes went into the shared transaction.
                    # Start it again, each event in its own savepoint this time (those
                    # before the failure run again; the failed one does not).
                    conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    results.clear()
                    records = await self._run_each(batch, recorded, results, failed)
                if records:
                    conn.executemany(
                        f"INSERT INTO {self.table} VALUES (?, ?, julianday('now'))", records
                    )
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

    async def _run_all(
        self,
        batch: list[_Item],
        recorded: dict[str, list[Outbound]],
        results: list[tuple[asyncio.Future[tuple[list[Outbound], bool]], Any, bool]],
    ) -> list[tuple[str, bytes]]:
        """Every new event's work, one after the other; :class:`_Failed` at the first
        that raises. Returns the records to insert."""
        conn = self.conn
        seen: dict[str, list[Outbound]] = {}
        records: list[tuple[str, bytes]] = []
        for index, (key, work, fut, ctx, record) in enumerate(batch):
            if record:
                done = recorded.get(key)
                if done is None:
                    done = seen.get(key)  # the same event twice in one batch
                if done is not None:
                    results.append((fut, (done, True), True))
                    continue
            try:
                outputs = await _inline(work, conn, ctx)
            except Exception as exc:
                raise _Failed(index, exc) from None
            if record:
                seen[key] = outputs
                records.append((key, encode_outputs(outputs)))
            results.append((fut, (outputs, False), True))
        return records

    async def _run_each(
        self,
        batch: list[_Item],
        recorded: dict[str, list[Outbound]],
        results: list[tuple[asyncio.Future[tuple[list[Outbound], bool]], Any, bool]],
        failed: _Failed,
    ) -> list[tuple[str, bytes]]:
        """The batch again, each event in a savepoint: a failing one rolls back alone."""
        conn = self.conn
        seen: dict[str, list[Outbound]] = {}
        records: list[tuple[str, bytes]] = []
        for index, (key, work, fut, ctx, record) in enumerate(batch):
            done = None
            if record:
                done = recorded.get(key)
                if done is None:
                    done = seen.get(key)
            if done is not None:
                results.append((fut, (done, True), True))
                continue
            if index == failed.index:
                results.append((fut, failed.exc, False))
                continue
            conn.execute("SAVEPOINT meshkit_event")
            try:
                outputs = await _inline(work, conn, ctx)
            except Exception as exc:
                conn.execute("ROLLBACK TO meshkit_event")
                conn.execute("RELEASE meshkit_event")
                results.append((fut, exc, False))
                continue
            conn.execute("RELEASE meshkit_event")
            if record:
                seen[key] = outputs
                records.append((key, encode_outputs(outputs)))
            results.append((fut, (outputs, False), True))
        return records

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
            await self.kv.put(k, encode_outputs_json(outputs))
            return outputs, False
