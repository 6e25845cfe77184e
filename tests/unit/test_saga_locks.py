"""Per-key locks serialize work on one key, let other keys run, and never pile up."""

from __future__ import annotations

import asyncio

import pytest

from meshkit.saga._locks import KeyedLocks

pytestmark = pytest.mark.unit


async def test_one_key_is_serialized_other_keys_run_and_nothing_is_left_behind() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    gate = asyncio.Event()

    async def work(key: str, name: str, wait: bool) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            if wait:
                await gate.wait()
            order.append(f"{name}-")

    first = asyncio.create_task(work("a", "a1", True))
    await asyncio.sleep(0)
    second = asyncio.create_task(work("a", "a2", False))
    third = asyncio.create_task(work("a", "a3", False))
    other = asyncio.create_task(work("b", "b1", False))
    await other  # a different key is not held up by "a"
    await asyncio.sleep(0)
    assert order == ["a1+", "b1+", "b1-"] and len(locks) == 1
    gate.set()
    await asyncio.gather(first, second, third)
    assert order[3:] == ["a1-", "a2+", "a2-", "a3+", "a3-"]
    assert len(locks) == 0


async def test_a_cancelled_waiter_leaves_the_lock_usable_and_then_gone() -> None:
    locks = KeyedLocks()
    gate = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("k"):
            await gate.wait()

    async def waiter() -> None:
        async with locks.hold("k"):
            raise AssertionError("never acquires")

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    w = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert len(locks) == 1
    gate.set()
    await h
    assert len(locks) == 0
    async with locks.hold("k"):
        assert len(locks) == 1
    assert len(locks) == 0


async def test_a_waiter_cancelled_as_the_key_is_handed_to_it_passes_the_key_on() -> None:
    locks = KeyedLocks()
    gate = asyncio.Event()
    got: list[str] = []
    waiters: list[asyncio.Task[None]] = []

    async def holder() -> None:
        async with locks.hold("k"):
            await gate.wait()
        waiters[0].cancel()  # the key is w1's now, and w1 has not run yet

    async def waiter(name: str) -> None:
        async with locks.hold("k"):
            got.append(name)

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiters += [asyncio.create_task(waiter("w1")), asyncio.create_task(waiter("w2"))]
    await asyncio.sleep(0)
    gate.set()
    await h
    with pytest.raises(asyncio.CancelledError):
        await waiters[0]
    await waiters[1]
    assert got == ["w2"] and len(locks) == 0


async def test_a_newcomer_does_not_overtake_a_waiter() -> None:
    locks = KeyedLocks()
    got: list[str] = []

    async def take(name: str) -> None:
        async with locks.hold("k"):
            got.append(name)
            await asyncio.sleep(0)

    first = asyncio.create_task(take("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(take("second"))
    await asyncio.sleep(0)  # second waits
    await first  # hands the key to second, which has not run yet
    await take("third")  # arrives while second holds the key
    await second
    assert got == ["first", "second", "third"] and len(locks) == 0
