"""IdempotentInbox: no record, one run at a time per key, different keys concurrently."""

from __future__ import annotations

import asyncio

import pytest

from meshkit.saga import IdempotentInbox, Outbound

pytestmark = pytest.mark.unit


async def test_same_key_runs_one_at_a_time() -> None:
    inbox = IdempotentInbox()
    first_in = asyncio.Event()
    release_first = asyncio.Event()
    order: list[str] = []

    async def first(handle: object) -> list[Outbound]:
        order.append("first start")
        first_in.set()
        await release_first.wait()
        order.append("first end")
        return [Outbound("a.B", "id-1", b"1")]

    async def second(handle: object) -> list[Outbound]:
        order.append("second start")
        return [Outbound("a.B", "id-2", b"2")]

    t1 = asyncio.create_task(inbox.run_once("k", first))
    await asyncio.wait_for(first_in.wait(), 2)
    t2 = asyncio.create_task(inbox.run_once("k", second))
    # Give the second run every chance to start while the first holds the key.
    for _ in range(20):
        await asyncio.sleep(0)
    assert order == ["first start"]
    assert not t2.done()
    release_first.set()
    r1, r2 = await asyncio.wait_for(asyncio.gather(t1, t2), 2)
    assert order == ["first start", "first end", "second start"]
    assert r1 == ([Outbound("a.B", "id-1", b"1")], False)
    assert r2 == ([Outbound("a.B", "id-2", b"2")], False)


async def test_different_keys_run_concurrently() -> None:
    inbox = IdempotentInbox()
    started = {k: asyncio.Event() for k in ("a", "b", "c")}

    def work_for(key: str) -> object:
        async def work(handle: object) -> list[Outbound]:
            started[key].set()
            # Finishes only once every key's work has started: a serialized inbox
            # would never get there (the wait_for below would time out).
            for ev in started.values():
                await ev.wait()
            return [Outbound("x.Y", f"id-{key}", key.encode())]

        return work

    results = await asyncio.wait_for(
        asyncio.gather(*(inbox.run_once(k, work_for(k)) for k in started)),  # type: ignore[arg-type]
        2,
    )
    assert [r[0][0].event_id for r in results] == ["id-a", "id-b", "id-c"]
    assert all(r[1] is False for r in results)


async def test_records_nothing_a_repeat_runs_again_and_gets_no_handle() -> None:
    inbox = IdempotentInbox()
    handles: list[object] = []

    async def work(handle: object) -> list[Outbound]:
        handles.append(handle)
        return [Outbound("a.B", "same", b"x")]

    first = await inbox.run_once("p/e1", work)
    second = await inbox.run_once("p/e1", work)
    assert first == second == ([Outbound("a.B", "same", b"x")], False)
    assert handles == [None, None]  # ran twice, no store handle


async def test_a_failing_run_releases_its_key() -> None:
    inbox = IdempotentInbox()

    async def boom(handle: object) -> list[Outbound]:
        raise RuntimeError("handler failed")

    async def ok(handle: object) -> list[Outbound]:
        return []

    with pytest.raises(RuntimeError, match="handler failed"):
        await inbox.run_once("k", boom)
    assert await asyncio.wait_for(inbox.run_once("k", ok), 2) == ([], False)
    assert len(inbox._locks) == 0  # no lock left behind for the key
