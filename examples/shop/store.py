"""A tiny SQLite store shared by a service's gRPC handlers and its saga participant.

One connection per process, transactions serialized by an asyncio lock: the
shop's transactions never await inside, so the lock is held for microseconds.
The participant's inbox lives in the same database, so an event's effect and
the record that it was processed commit together (exactly-once local effects).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Store:
    """One SQLite database: ``tx()`` runs a serialized ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, path: str, schema: str) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
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
