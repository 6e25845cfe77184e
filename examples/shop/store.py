"""A tiny SQLite store shared by a service's gRPC handlers and its saga participant.

One connection per process, transactions serialized by an asyncio lock: the
shop's transactions never await inside, so the lock is held for microseconds.
The participant's inbox lives in the same database, so an event's effect and
the record that it was processed commit together (exactly-once local effects).

Several processes of one service (instances on one host) may share the file:
it is in WAL mode (readers never block, one writer at a time), every write is a
``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so a
transaction never fails half-way on another process's lock), and a process that
finds the lock held waits up to :data:`BUSY_TIMEOUT` for it (SQLite's busy
handler) instead of failing at once. Across hosts SQLite is not an option: see
docs/operations.md.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

# Seconds a write waits for another process's transaction on the same file.
BUSY_TIMEOUT = 10.0


class Store:
    """One SQLite database: ``tx()`` runs a serialized ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, path: str, schema: str) -> None:
        self.path = path
        self.conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
        )
        self.conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(schema)
        self.lock = asyncio.Lock()

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[sqlite3.Connection]:
        async with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                # Inside the try: a failed COMMIT leaves the transaction open otherwise.
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """A read outside any transaction (WAL readers never block)."""
        return list(self.conn.execute(sql, params).fetchall())

    def close(self) -> None:
        self.conn.close()
