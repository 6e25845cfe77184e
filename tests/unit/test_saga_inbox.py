"""Inboxes run a handler's work once per key and hand back its outputs (SQLite, memory)."""

from __future__ import annotations

import sqlite3

import pytest

from meshkit.saga import MemoryInbox, Outbound, SqliteInbox

pytestmark = pytest.mark.unit


def _db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE effects (n INTEGER)")
    return conn


async def test_sqlite_inbox_commits_effect_and_record_together() -> None:
    conn = _db()
    inbox = SqliteInbox(conn)
    calls = 0

    async def work(tx: sqlite3.Connection) -> list[Outbound]:
        nonlocal calls
        calls += 1
        tx.execute("INSERT INTO effects VALUES (1)")
        return [Outbound("a.B", "id-1", b"\x01\x02")]

    first = await inbox.run_once("p/e1", work)
    second = await inbox.run_once("p/e1", work)
    assert first == ([Outbound("a.B", "id-1", b"\x01\x02")], False)
    assert second == ([Outbound("a.B", "id-1", b"\x01\x02")], True)
    assert calls == 1
    assert conn.execute("SELECT COUNT(*) FROM effects").fetchone()[0] == 1
    assert inbox.processed() == 1


async def test_sqlite_inbox_rolls_back_the_effect_when_the_handler_fails() -> None:
    conn = _db()
    inbox = SqliteInbox(conn)

    async def boom(tx: sqlite3.Connection) -> list[Outbound]:
        tx.execute("INSERT INTO effects VALUES (1)")
        raise RuntimeError("crash mid-handler")

    with pytest.raises(RuntimeError):
        await inbox.run_once("p/e1", boom)
    assert conn.execute("SELECT COUNT(*) FROM effects").fetchone()[0] == 0
    assert inbox.processed() == 0

    async def ok(tx: sqlite3.Connection) -> list[Outbound]:
        tx.execute("INSERT INTO effects VALUES (1)")
        return []

    assert await inbox.run_once("p/e1", ok) == ([], False)  # the retry does the work once
    assert conn.execute("SELECT COUNT(*) FROM effects").fetchone()[0] == 1


async def test_memory_inbox() -> None:
    inbox = MemoryInbox()
    n = 0

    async def work(_: object) -> list[Outbound]:
        nonlocal n
        n += 1
        return []

    await inbox.run_once("k", work)
    assert (await inbox.run_once("k", work))[1] is True
    assert n == 1


def test_sqlite_inbox_rejects_odd_table_names() -> None:
    with pytest.raises(ValueError):
        SqliteInbox(_db(), table="x; DROP TABLE y")
