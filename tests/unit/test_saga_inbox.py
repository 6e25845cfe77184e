"""Inboxes run a handler's work once per key and hand back its outputs (SQLite, memory)."""

from __future__ import annotations

import contextlib
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


async def test_concurrent_events_share_a_commit_and_fail_alone() -> None:
    import asyncio

    conn = _db()
    inbox = SqliteInbox(conn, max_batch=64)

    def work_for(n: int):  # type: ignore[no-untyped-def]
        async def work(tx: sqlite3.Connection) -> list[Outbound]:
            tx.execute("INSERT INTO effects VALUES (?)", (n,))
            if n == 3:
                raise RuntimeError("handler 3 fails")
            return [Outbound("a.B", f"out-{n}", b"")]

        return work

    results = await asyncio.gather(
        *(inbox.run_once(f"p/e{n}", work_for(n)) for n in range(8)),
        inbox.run_once("p/e1", work_for(1)),  # the same event again, in the same batch
        return_exceptions=True,
    )
    assert isinstance(results[3], RuntimeError)
    assert results[1] == ([Outbound("a.B", "out-1", b"")], False)
    assert results[8] == ([Outbound("a.B", "out-1", b"")], True)
    effects = sorted(r[0] for r in conn.execute("SELECT n FROM effects"))
    assert effects == [0, 1, 2, 4, 5, 6, 7]  # 3 rolled back alone, 1 ran once
    assert inbox.processed() == 7
    assert inbox.commits == 1


async def test_max_batch_one_commits_every_event() -> None:
    import asyncio

    conn = _db()
    inbox = SqliteInbox(conn, max_batch=1)

    async def work(tx: sqlite3.Connection) -> list[Outbound]:
        return []

    await asyncio.gather(*(inbox.run_once(f"k{n}", work) for n in range(5)))
    assert inbox.commits == 5
    with pytest.raises(ValueError):
        SqliteInbox(conn, max_batch=0)


async def test_each_handler_sees_its_own_callers_context() -> None:
    import asyncio
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="none")
    conn = _db()
    inbox = SqliteInbox(conn)
    seen: dict[str, str] = {}

    def caller(name: str):  # type: ignore[no-untyped-def]
        async def work(tx: sqlite3.Connection) -> list[Outbound]:
            seen[name] = var.get()
            return []

        async def run() -> None:
            var.set(f"ctx-{name}")  # e.g. a propagated deadline or a consumer span
            await inbox.run_once(name, work)

        return run()

    await asyncio.gather(caller("a"), caller("b"), caller("c"))
    assert seen == {"a": "ctx-a", "b": "ctx-b", "c": "ctx-c"}
    assert inbox.commits == 1


async def test_a_failed_commit_rolls_back_and_the_inbox_keeps_working() -> None:
    # A deferred foreign key is checked at COMMIT: the commit fails and SQLite leaves
    # the transaction open unless the inbox rolls it back.
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute(
        "CREATE TABLE child (pid INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
    )
    inbox = SqliteInbox(conn, max_batch=1)

    async def orphan(tx: sqlite3.Connection) -> list[Outbound]:
        tx.execute("INSERT INTO child VALUES (99)")
        return []

    async def ok(tx: sqlite3.Connection) -> list[Outbound]:
        tx.execute("INSERT INTO parent VALUES (1)")
        tx.execute("INSERT INTO child VALUES (1)")
        return []

    with pytest.raises(sqlite3.IntegrityError):
        await inbox.run_once("p/e1", orphan)
    assert not conn.in_transaction
    assert inbox.processed() == 0 and inbox.commits == 0
    assert await inbox.run_once("p/e2", ok) == ([], False)
    assert conn.execute("SELECT pid FROM child").fetchall() == [(1,)]
    assert inbox.processed() == 1 and inbox.commits == 1


async def test_the_shop_command_helper_runs_an_effect_once_per_command_id() -> None:
    from examples.shop.gen.shop.v1 import events_pb2
    from examples.shop.orchestration import _INBOXES, once
    from examples.shop.store import Store
    from meshkit.saga import Envelope
    from meshkit.saga.commands import CommandContext

    store = Store(":memory:", "CREATE TABLE effects (n INTEGER);")
    _INBOXES[store] = SqliteInbox(store.conn, store.lock)
    calls = 0

    def work(conn: sqlite3.Connection) -> events_pb2.StockReserved:
        nonlocal calls
        calls += 1
        conn.execute("INSERT INTO effects VALUES (1)")
        return events_pb2.StockReserved(order_id="o1", reservation_id=f"r{calls}")

    env = Envelope.new("shop.v1.ReserveStockRequest", event_id="cmd-1")
    ctx = CommandContext(env, "inventory", 1)
    first = await once(store, ctx, work)
    again = await once(store, CommandContext(env, "inventory", 2), work)
    other = await once(store, CommandContext(Envelope.new("x.Y", event_id="cmd-2"), "i", 1), work)
    assert first == again == events_pb2.StockReserved(order_id="o1", reservation_id="r1")
    assert isinstance(again, events_pb2.StockReserved)
    assert other == events_pb2.StockReserved(order_id="o1", reservation_id="r2")
    assert calls == 2
    assert store.query("SELECT COUNT(*) FROM effects") == [(2,)]


async def test_outputs_round_trip_in_both_record_formats() -> None:
    from meshkit.saga.inbox import decode_outputs, encode_outputs, encode_outputs_json

    outs = [Outbound("a.B", "id-1", b"\x00\x01[\xff"), Outbound("c.D", "id-2", b"")]
    assert encode_outputs(outs)[:1] == b"\x01"
    assert decode_outputs(encode_outputs(outs)) == outs
    assert decode_outputs(encode_outputs_json(outs)) == outs
    assert decode_outputs(encode_outputs([])) == [] and decode_outputs(b"") == []
    with pytest.raises(ValueError):
        decode_outputs(encode_outputs(outs)[:-1])


async def test_a_record_written_in_the_old_json_format_is_a_duplicate_with_its_outputs() -> None:
    # Databases recorded by earlier versions keep their rows: a redelivered event
    # finds its record and republishes the outputs stored there.
    from meshkit.saga.inbox import encode_outputs_json

    conn = _db()
    inbox = SqliteInbox(conn)
    old = [Outbound("a.B", "id-1", b"\x01\x02")]
    conn.execute(
        "INSERT INTO meshkit_inbox VALUES (?, ?, julianday('now'))",
        ("p/e1", encode_outputs_json(old)),
    )

    async def work(tx: sqlite3.Connection) -> list[Outbound]:
        raise AssertionError("a recorded event must not run again")

    assert await inbox.run_once("p/e1", work) == (old, True)


async def test_a_failing_handler_runs_once_and_the_others_commit_once() -> None:
    import asyncio

    conn = _db()
    inbox = SqliteInbox(conn)
    calls: dict[int, int] = {}

    def work_for(n: int):  # type: ignore[no-untyped-def]
        async def work(tx: sqlite3.Connection) -> list[Outbound]:
            calls[n] = calls.get(n, 0) + 1
            tx.execute("INSERT INTO effects VALUES (?)", (n,))
            if n == 2:
                raise RuntimeError("fails")
            return []

        return work

    results = await asyncio.gather(
        *(inbox.run_once(f"p/e{n}", work_for(n)) for n in range(5)), return_exceptions=True
    )
    assert isinstance(results[2], RuntimeError)
    assert calls[2] == 1  # not run again
    assert sorted(r[0] for r in conn.execute("SELECT n FROM effects")) == [0, 1, 3, 4]
    assert inbox.processed() == 4 and inbox.commits == 1


async def test_a_handler_that_awaits_keeps_its_callers_context() -> None:
    import asyncio
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="none")
    conn = _db()
    inbox = SqliteInbox(conn)
    seen: dict[str, tuple[str, str]] = {}

    def caller(name: str):  # type: ignore[no-untyped-def]
        async def wrapped(tx: sqlite3.Connection) -> list[Outbound]:
            before = var.get()
            await asyncio.sleep(0.001)  # suspends: the rest runs in a task
            tx.execute("INSERT INTO effects VALUES (1)")
            seen[name] = (before, var.get())
            return [Outbound("a.B", f"out-{name}", b"")]

        async def run() -> tuple[list[Outbound], bool]:
            var.set(f"ctx-{name}")
            return await inbox.run_once(name, wrapped)

        return run()

    results = await asyncio.gather(caller("a"), caller("b"))
    assert seen == {"a": ("ctx-a", "ctx-a"), "b": ("ctx-b", "ctx-b")}
    assert results[0] == ([Outbound("a.B", "out-a", b"")], False)
    assert conn.execute("SELECT COUNT(*) FROM effects").fetchone()[0] == 2


async def test_idempotent_items_run_in_the_transaction_with_no_record() -> None:
    import contextvars

    from meshkit.saga.inbox import run_many

    conn = _db()
    conn.execute("CREATE TABLE marks (key TEXT PRIMARY KEY)")
    inbox = SqliteInbox(conn)
    runs: dict[str, int] = {}

    def work_for(key: str, *, fail: bool = False):  # type: ignore[no-untyped-def]
        async def work(tx: sqlite3.Connection) -> list[Outbound]:
            runs[key] = runs.get(key, 0) + 1
            tx.execute("INSERT OR IGNORE INTO marks VALUES (?)", (key,))  # its own dedupe
            if fail:
                raise RuntimeError(f"{key} fails")
            return [Outbound("a.B", f"out-{key}", b"")]

        return work

    ctx = contextvars.copy_context()
    first = await run_many(
        inbox, [("p/rec", work_for("rec"), ctx, False), ("p/idem", work_for("idem"), ctx, True)]
    )
    assert first == [
        ([Outbound("a.B", "out-rec", b"")], False),
        ([Outbound("a.B", "out-idem", b"")], False),
    ]
    assert inbox.commits == 1  # one transaction for both
    # Only the recorded one has a record; the idempotent one's effect committed with it.
    assert [r[0] for r in conn.execute("SELECT key FROM meshkit_inbox")] == ["p/rec"]
    assert sorted(r[0] for r in conn.execute("SELECT key FROM marks")) == ["idem", "rec"]

    # Delivered again: the recorded one is a duplicate (not run), the idempotent one
    # runs again and finds its effect done.
    again = await run_many(
        inbox, [("p/rec", work_for("rec"), ctx, False), ("p/idem", work_for("idem"), ctx, True)]
    )
    assert again == [
        ([Outbound("a.B", "out-rec", b"")], True),
        ([Outbound("a.B", "out-idem", b"")], False),
    ]
    assert runs == {"rec": 1, "idem": 2}
    assert inbox.processed() == 1

    # A failing idempotent item rolls back alone; a recorded one beside it commits.
    mixed = await run_many(
        inbox,
        [
            ("p/bad", work_for("bad", fail=True), ctx, True),
            ("p/rec2", work_for("rec2"), ctx, False),
        ],
    )
    assert isinstance(mixed[0], RuntimeError) and mixed[1] == (
        [Outbound("a.B", "out-rec2", b"")],
        False,
    )
    assert runs["bad"] == 1 and runs["rec2"] == 1
    assert "bad" not in {r[0] for r in conn.execute("SELECT key FROM marks")}
    assert inbox.processed() == 2


async def test_inboxes_without_run_many_record_idempotent_items_too() -> None:
    import contextvars

    from meshkit.saga.inbox import run_many

    inbox = MemoryInbox()
    runs = 0

    async def work(tx: object) -> list[Outbound]:
        nonlocal runs
        runs += 1
        return []

    ctx = contextvars.copy_context()
    assert await run_many(inbox, [("p/e", work, ctx, True)]) == [([], False)]
    assert await run_many(inbox, [("p/e", work, ctx, True)]) == [([], True)]
    assert runs == 1  # recorded as run_once does: still exactly once


async def test_run_many_commits_its_own_batch_and_a_cancel_fails_only_that_batch() -> None:
    import asyncio
    import contextvars

    from meshkit.saga.inbox import run_many

    conn = _db()
    inbox = SqliteInbox(conn)
    release = asyncio.Event()

    def work_for(n: int, *, wait: bool = False):  # type: ignore[no-untyped-def]
        async def work(tx: sqlite3.Connection) -> list[Outbound]:
            tx.execute("INSERT INTO effects VALUES (?)", (n,))
            if wait:
                await release.wait()  # suspends inside the first caller's transaction
            return []

        return work

    ctx = contextvars.copy_context()
    # Alone, a caller's batch commits in its own task: no flusher task is started.
    assert await run_many(inbox, [("p/0", work_for(0), ctx, False)]) == [([], False)]
    assert inbox._flusher is None and inbox.commits == 1

    first = asyncio.create_task(run_many(inbox, [("p/1", work_for(1, wait=True), ctx, False)]))
    await asyncio.sleep(0.01)  # the first caller is inside its batch, waiting
    second = asyncio.create_task(run_many(inbox, [("p/2", work_for(2), ctx, False)]))
    await asyncio.sleep(0.01)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    # The second caller's event went to a flusher task and commits on its own.
    assert await asyncio.wait_for(second, 5) == [([], False)]
    assert sorted(r[0] for r in conn.execute("SELECT n FROM effects")) == [0, 2]
    assert sorted(r[0] for r in conn.execute("SELECT key FROM meshkit_inbox")) == ["p/0", "p/2"]
