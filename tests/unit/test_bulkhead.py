"""Semaphore bulkhead: non-blocking, thread-blocking and asyncio FIFO acquisition."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meshkit.resilience.bulkhead import Bulkhead, BulkheadConfig, Side
from meshkit.resilience.events import Event

pytestmark = pytest.mark.unit


def make(n: int = 2, wait: float = 0.0) -> Bulkhead:
    return Bulkhead(BulkheadConfig(max_concurrent=n, max_wait=wait), name="bh")


def test_try_acquire_admits_up_to_max_concurrent() -> None:
    b = make(2)
    events: list[Event] = []
    b.add_listener(events.append)
    assert [b.try_acquire() for _ in range(3)] == [True, True, False]
    assert (b.in_flight, b.rejected, b.available) == (2, 1, 0)
    assert [(e.kind, e.source, e.name) for e in events] == [("rejected", "bulkhead", "bh")]
    b.release()
    assert b.try_acquire()


def test_release_never_goes_negative() -> None:
    b = make(1)
    b.release()
    assert b.in_flight == 0
    assert b.try_acquire()
    assert not b.try_acquire()


def test_blocking_acquire_without_wait_rejects_at_once() -> None:
    b = make(1, wait=0.0)
    assert b.acquire()
    assert not b.acquire(timeout=10)
    assert b.rejected == 1


def test_blocking_acquire_gets_a_released_permit() -> None:
    b = make(1, wait=30.0)
    assert b.acquire()
    waiting = threading.Event()
    result: list[bool] = []

    def waiter() -> None:
        waiting.set()
        result.append(b.acquire())

    t = threading.Thread(target=waiter)
    t.start()
    assert waiting.wait(5)
    b.release()
    t.join(10)
    assert result == [True]
    assert b.in_flight == 1


def test_blocking_acquire_times_out_at_the_shorter_of_timeout_and_max_wait() -> None:
    b = make(1, wait=30.0)
    assert b.acquire()
    assert not b.acquire(timeout=0.01)  # the call's deadline is shorter than max_wait
    assert b.rejected == 1


def test_threads_never_exceed_the_limit() -> None:
    b = make(3, wait=5.0)
    peak = 0
    current = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal peak, current
        for _ in range(200):
            if b.acquire():
                with lock:
                    current += 1
                    peak = max(peak, current)
                with lock:
                    current -= 1
                b.release()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak <= 3
    assert b.in_flight == 0


async def test_async_waiters_are_served_fifo() -> None:
    b = make(1, wait=30.0)
    assert await b.acquire_async()
    order: list[int] = []

    async def waiter(i: int) -> None:
        assert await b.acquire_async()
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
    await asyncio.sleep(0)  # let every waiter queue up
    assert not b.try_acquire()  # queued waiters go first
    for _ in range(4):
        b.release()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]
    assert b.in_flight == 1


async def test_async_acquire_rejects_at_once_without_wait() -> None:
    b = make(1, wait=0.0)
    assert await b.acquire_async()
    assert not await b.acquire_async(timeout=5)
    assert b.rejected == 1


async def test_async_acquire_times_out() -> None:
    b = make(1, wait=30.0)
    assert await b.acquire_async()
    assert not await b.acquire_async(timeout=0.01)
    assert b.rejected == 1
    b.release()
    assert b.in_flight == 0


async def test_cancelled_async_waiter_leaks_no_permit() -> None:
    b = make(1, wait=30.0)
    assert await b.acquire_async()
    task = asyncio.create_task(b.acquire_async())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    b.release()
    assert b.in_flight == 0
    assert b.try_acquire()


async def test_permit_handed_to_a_waiter_cancelled_at_the_same_time_is_returned() -> None:
    b = make(1, wait=30.0)
    assert await b.acquire_async()
    task = asyncio.create_task(b.acquire_async())
    await asyncio.sleep(0)
    b.release()  # hands the permit to the waiter...
    task.cancel()  # ...which is cancelled before it runs
    try:
        got = await task
    except asyncio.CancelledError:
        assert b.in_flight == 0  # the handed-over permit came back
    else:
        assert got  # the cancellation lost the race: the caller owns the permit
        assert b.in_flight == 1


async def test_release_from_another_thread_wakes_an_async_waiter() -> None:
    b = make(1, wait=30.0)
    assert await b.acquire_async()
    task = asyncio.create_task(b.acquire_async())
    await asyncio.sleep(0)
    t = threading.Thread(target=b.release)
    t.start()
    assert await asyncio.wait_for(task, 10)
    t.join()
    assert b.in_flight == 1


def test_side() -> None:
    assert BulkheadConfig().applies_to("client")
    assert BulkheadConfig().applies_to("server")
    server_only = BulkheadConfig(side=Side.SERVER)
    assert server_only.applies_to("server")
    assert not server_only.applies_to("client")
