"""A pull that ends with 503 (no consumer leader) is not re-issued at once."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from meshkit.saga.consumer import PullConsumer
from meshkit.saga.streams import ConsumerSpec

pytestmark = pytest.mark.unit


class _FakeNC:
    def __init__(self) -> None:
        self.pulls = 0

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self.pulls += 1


class _FakeBus:
    def __init__(self) -> None:
        self.nc = _FakeNC()


class _Status:
    def __init__(self, code: str) -> None:
        self.headers = {"Status": code, "Description": "No Responders"}
        self.data = b""
        self.subject = "_INBOX.x"


async def test_503s_back_off_instead_of_pulling_at_once() -> None:
    bus: Any = _FakeBus()
    consumer = PullConsumer(bus, "S", "d", lambda m: asyncio.sleep(0), (), ConsumerSpec())
    consumer._started = True  # as start() leaves it, without a server
    await consumer._pull()
    assert bus.nc.pulls == 1
    loop = asyncio.get_running_loop()
    waits = []
    for n in range(1, 5):
        # A leaderless consumer answers each pull with 503 at once.
        await consumer._on_msg(_Status("503"))  # type: ignore[arg-type]
        assert bus.nc.pulls == n  # not re-issued at once
        began = loop.time()
        while bus.nc.pulls == n:
            await asyncio.sleep(0.005)
        waits.append(loop.time() - began)
    # 50 ms, doubling: a handful of pulls a second, not thousands.
    assert waits[0] >= 0.04
    assert all(b > a for a, b in itertools.pairwise(waits)), waits
    assert consumer.stats.backoffs == 4
    consumer._stopping = True
    if consumer._retry_handle is not None:
        consumer._retry_handle.cancel()
