"""Read model stores for CQRS projections.

A read model is a set of JSON documents, ``(collection, key) -> dict``, owned by
one projection, plus that projection's checkpoints (the last stream sequence it
applied, per source). :meth:`ReadModelStore.apply` runs a projection's updates
and moves its checkpoints in ONE transaction, and only if the checkpoints are
still where the caller read them (compare-and-set): a crash can never leave a
document updated without its checkpoint or the reverse, and two runners of one
projection can never both apply the same events.

Two stores ship: :class:`MemoryReadModelStore` (tests, caches) and
:class:`SqliteReadModelStore` (stdlib ``sqlite3``). A PostgreSQL store implements
the same protocol with two tables and ``SELECT ... FOR UPDATE`` on the checkpoint
row (see docs/event-sourcing.md).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from meshkit.errors import ConcurrencyError

__all__ = [
    "CheckpointMoved",
    "MemoryReadModelStore",
    "ReadModelStore",
    "ReadModelTx",
    "SqliteReadModelStore",
]

Doc = dict[str, Any]


class CheckpointMoved(ConcurrencyError):
    """Someone else moved (or reset) the projection's checkpoint since it was read."""

    def __init__(self, projection: str, source: str, expected: int, actual: int) -> None:
        super().__init__(
            f"projection {projection}: checkpoint of {source} is {actual}, expected {expected}"
        )
        self.projection = projection
        self.source = source
        self.expected = expected
        self.actual = actual


class ReadModelTx(Protocol):
    """The documents of one projection, inside a transaction."""

    def get(self, collection: str, key: str) -> Doc | None:
        """The document, or None."""
        ...

    def put(self, collection: str, key: str, doc: Doc) -> None:
        """Insert or replace the document."""
        ...

    def delete(self, collection: str, key: str) -> None: ...

    def find(self, collection: str, **equals: Any) -> list[Doc]:
        """Documents whose top-level fields equal ``equals`` (all of them when empty)."""
        ...


class ReadModelStore(Protocol):
    """Where projections keep documents and checkpoints."""

    def checkpoints(self, projection: str) -> dict[str, int]:
        """Last applied stream sequence per source; empty for a new projection."""
        ...

    def apply(
        self,
        projection: str,
        expected: Mapping[str, int],
        new: Mapping[str, int],
        work: Callable[[ReadModelTx], None],
    ) -> None:
        """Atomically: check checkpoints equal ``expected``, run ``work``, store ``new``.

        Raises :class:`CheckpointMoved` (and changes nothing) when they differ.
        """
        ...

    def reset(self, projection: str) -> None:
        """Drop the projection's documents and checkpoints (before a rebuild)."""
        ...

    def get(self, projection: str, collection: str, key: str) -> Doc | None:
        """Query side: one document."""
        ...

    def find(self, projection: str, collection: str, **equals: Any) -> list[Doc]:
        """Query side: documents matching ``equals``."""
        ...


class _MemoryTx:
    """Documents kept as JSON text, exactly what SQLite stores.

    Writes go straight to ``docs``; with ``undo`` each touched key's first value is
    kept there (None: absent) so a failed batch can be rolled back. Copying the
    whole read model per batch instead would make catch-up quadratic.
    """

    def __init__(
        self,
        docs: dict[tuple[str, str], str],
        undo: dict[tuple[str, str], str | None] | None = None,
    ) -> None:
        self.docs = docs
        self.undo = undo

    def _touch(self, k: tuple[str, str]) -> None:
        if self.undo is not None and k not in self.undo:
            self.undo[k] = self.docs.get(k)

    def rollback(self) -> None:
        for k, raw in (self.undo or {}).items():
            if raw is None:
                self.docs.pop(k, None)
            else:
                self.docs[k] = raw

    def get(self, collection: str, key: str) -> Doc | None:
        raw = self.docs.get((collection, key))
        return json.loads(raw) if raw is not None else None

    def put(self, collection: str, key: str, doc: Doc) -> None:
        self._touch((collection, key))
        self.docs[(collection, key)] = json.dumps(doc, sort_keys=True)

    def delete(self, collection: str, key: str) -> None:
        self._touch((collection, key))
        self.docs.pop((collection, key), None)

    def find(self, collection: str, **equals: Any) -> list[Doc]:
        out = []
        for (c, _), raw in sorted(self.docs.items()):
            if c != collection:
                continue
            d = json.loads(raw)
            if all(d.get(k) == v for k, v in equals.items()):
                out.append(d)
        return out


class MemoryReadModelStore:
    """Documents and checkpoints in a dict; a failed ``work`` leaves no trace."""

    def __init__(self) -> None:
        self._docs: dict[str, dict[tuple[str, str], str]] = {}
        self._checkpoints: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def checkpoints(self, projection: str) -> dict[str, int]:
        with self._lock:
            return dict(self._checkpoints.get(projection, {}))

    def apply(
        self,
        projection: str,
        expected: Mapping[str, int],
        new: Mapping[str, int],
        work: Callable[[ReadModelTx], None],
    ) -> None:
        with self._lock:
            current = self._checkpoints.get(projection, {})
            for source, seq in expected.items():
                if current.get(source, 0) != seq:
                    raise CheckpointMoved(projection, source, seq, current.get(source, 0))
            tx = _MemoryTx(self._docs.setdefault(projection, {}), {})
            try:
                work(tx)
            except BaseException:
                tx.rollback()
                raise
            self._checkpoints[projection] = {**current, **new}

    def reset(self, projection: str) -> None:
        with self._lock:
            self._docs.pop(projection, None)
            self._checkpoints.pop(projection, None)

    def get(self, projection: str, collection: str, key: str) -> Doc | None:
        with self._lock:
            return _MemoryTx(self._docs.get(projection, {})).get(collection, key)

    def find(self, projection: str, collection: str, **equals: Any) -> list[Doc]:
        with self._lock:
            return _MemoryTx(self._docs.get(projection, {})).find(collection, **equals)

    def dump(self, projection: str) -> dict[tuple[str, str], Doc]:
        """Every document of ``projection`` (tests compare rebuilds with this)."""
        with self._lock:
            return {k: json.loads(v) for k, v in self._docs.get(projection, {}).items()}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meshkit_documents (
    projection TEXT NOT NULL,
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (projection, collection, key)
);
CREATE TABLE IF NOT EXISTS meshkit_checkpoints (
    projection TEXT NOT NULL,
    source TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (projection, source)
);
"""


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection, projection: str) -> None:
        self.conn = conn
        self.projection = projection

    def get(self, collection: str, key: str) -> Doc | None:
        row = self.conn.execute(
            "SELECT doc FROM meshkit_documents WHERE projection=? AND collection=? AND key=?",
            (self.projection, collection, key),
        ).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, collection: str, key: str, doc: Doc) -> None:
        self.conn.execute(
            "INSERT INTO meshkit_documents (projection, collection, key, doc) VALUES (?,?,?,?) "
            "ON CONFLICT (projection, collection, key) DO UPDATE SET doc=excluded.doc",
            (self.projection, collection, key, json.dumps(doc, sort_keys=True)),
        )

    def delete(self, collection: str, key: str) -> None:
        self.conn.execute(
            "DELETE FROM meshkit_documents WHERE projection=? AND collection=? AND key=?",
            (self.projection, collection, key),
        )

    def find(self, collection: str, **equals: Any) -> list[Doc]:
        sql = "SELECT doc FROM meshkit_documents WHERE projection=? AND collection=?"
        args: list[Any] = [self.projection, collection]
        for field, value in equals.items():
            if not field.isidentifier():
                raise ValueError(f"find: field name {field!r} is not an identifier")
            sql += f" AND json_extract(doc, '$.{field}') = ?"
            args.append(value)
        sql += " ORDER BY key"
        return [json.loads(r[0]) for r in self.conn.execute(sql, args)]


class SqliteReadModelStore:
    """Documents and checkpoints in one SQLite database (WAL mode).

    The checkpoint row and the documents change in the same transaction, so the
    read model is always exactly the result of the events up to its checkpoint.
    Safe to share between threads (one connection behind a lock); other
    processes may read the file concurrently.
    """

    def __init__(self, path: str = ":memory:") -> None:
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            if path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The raw connection, for projections that keep their own tables (hold no lock)."""
        return self._conn

    def checkpoints(self, projection: str) -> dict[str, int]:
        with self._lock:
            return self._checkpoints_in(self._conn, projection)

    @staticmethod
    def _checkpoints_in(conn: sqlite3.Connection, projection: str) -> dict[str, int]:
        rows = conn.execute(
            "SELECT source, seq FROM meshkit_checkpoints WHERE projection=?", (projection,)
        ).fetchall()
        return {str(s): int(q) for s, q in rows}

    def apply(
        self,
        projection: str,
        expected: Mapping[str, int],
        new: Mapping[str, int],
        work: Callable[[ReadModelTx], None],
    ) -> None:
        with self._lock, self._transaction() as conn:
            current = self._checkpoints_in(conn, projection)
            for source, seq in expected.items():
                if current.get(source, 0) != seq:
                    raise CheckpointMoved(projection, source, seq, current.get(source, 0))
            work(_SqliteTx(conn, projection))
            conn.executemany(
                "INSERT INTO meshkit_checkpoints (projection, source, seq) VALUES (?,?,?) "
                "ON CONFLICT (projection, source) DO UPDATE SET seq=excluded.seq",
                [(projection, s, q) for s, q in new.items()],
            )

    def _transaction(self) -> _Tx:
        return _Tx(self._conn)

    def reset(self, projection: str) -> None:
        with self._lock, self._transaction() as conn:
            conn.execute("DELETE FROM meshkit_documents WHERE projection=?", (projection,))
            conn.execute("DELETE FROM meshkit_checkpoints WHERE projection=?", (projection,))

    def get(self, projection: str, collection: str, key: str) -> Doc | None:
        with self._lock:
            return _SqliteTx(self._conn, projection).get(collection, key)

    def find(self, projection: str, collection: str, **equals: Any) -> list[Doc]:
        with self._lock:
            return _SqliteTx(self._conn, projection).find(collection, **equals)

    def dump(self, projection: str) -> dict[tuple[str, str], Doc]:
        """Every document of ``projection``."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT collection, key, doc FROM meshkit_documents WHERE projection=?",
                (projection,),
            ).fetchall()
        return {(str(c), str(k)): json.loads(d) for c, k, d in rows}


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
