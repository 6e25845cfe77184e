"""Coalesced writes on the saga bus's connection (``Client.flush_linger``).

Under load a write that would follow the previous one within the linger waits, so
the messages of that time share one write; an isolated message goes out at once.
The linger here is 0.2 s, far longer than the bus's 1 ms, so the timings are
clear of a slow machine's noise.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from nats.aio.client import __version__ as nats_py_version

from meshkit.saga import EventBus, _client

LINGER = 0.2

pytestmark = pytest.mark.skipif(
    not nats_py_version.startswith(_client.TESTED_NATS_PY),
    reason="the linger is only on the tested nats-py series",
)


class _Writes:
    """Counts the connection's socket writes and the messages in each."""

    def __init__(self, nc: _client.Client) -> None:
        self.sizes: list[int] = []
        transport = nc._transport
        original = transport.writelines

        def writelines(chunks: Any) -> None:
            chunks = list(chunks)
            self.sizes.append(sum(bytes(c).count(b"PUB ") for c in chunks))
            original(chunks)

        transport.writelines = writelines  # type: ignore[method-assign]


async def _echo(nats_server_module: Any) -> tuple[_client.Client, Any]:
    """A plain connection answering requests on ``echo``."""
    plain = await _client.connect(nats_server_module.url)

    async def reply(msg: Any) -> None:
        await plain.publish(msg.reply, msg.data)

    await plain.subscribe("echo", cb=reply)
    await plain.flush()
    return plain, reply


async def test_an_isolated_message_is_written_at_once(nats_server_module: Any) -> None:
    echo, _ = await _echo(nats_server_module)
    nc = await _client.connect(nats_server_module.url, flush_linger=LINGER)
    try:
        await asyncio.sleep(LINGER * 1.5)  # nothing written for longer than the linger
        t0 = time.monotonic()
        got = await nc.request("echo", b"ping", timeout=5)
        took = time.monotonic() - t0
        assert got.data == b"ping"
        assert took < LINGER / 2, f"an idle connection's request took {took:.3f}s"
    finally:
        await nc.close()
        await echo.close()


async def test_a_burst_right_after_a_write_shares_one_write(nats_server_module: Any) -> None:
    echo, _ = await _echo(nats_server_module)
    nc = await _client.connect(nats_server_module.url, flush_linger=LINGER)
    sub = await echo.subscribe("burst.>")
    await echo.flush()
    try:
        writes = _Writes(nc)
        await nc.publish("burst.first", b"0")  # written at once
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        t0 = time.monotonic()
        for i in range(1, 51):  # within the linger of the first write
            await nc.publish(f"burst.{i}", str(i).encode())
            if i % 10 == 0:
                await asyncio.sleep(0.01)  # spread over 50 ms, still inside the linger
        received = [await sub.next_msg(timeout=5) for _ in range(51)]
        took = time.monotonic() - t0
        # Every message arrives, in order; the 50 shared one write after the linger.
        assert [m.data for m in received] == [str(i).encode() for i in range(51)]
        assert sorted(writes.sizes, reverse=True)[:2] == [50, 1], writes.sizes
        assert LINGER * 0.8 <= took < LINGER + 2.0, took
    finally:
        await nc.close()
        await echo.close()


async def test_no_linger_writes_every_flush_at_once(nats_server_module: Any) -> None:
    echo, _ = await _echo(nats_server_module)
    nc = await _client.connect(nats_server_module.url)  # flush_linger=0
    try:
        assert nc.flush_linger == 0
        writes = _Writes(nc)
        for _ in range(5):
            got = await nc.request("echo", b"x", timeout=5)
            assert got.data == b"x"
        # One request, one write: nothing waits for company.
        assert [n for n in writes.sizes if n] == [1, 1, 1, 1, 1], writes.sizes
    finally:
        await nc.close()
        await echo.close()


async def test_a_negative_linger_is_refused() -> None:
    with pytest.raises(ValueError, match=r"flush_linger -0\.1: must be >= 0 seconds"):
        await _client.connect("nats://127.0.0.1:1", flush_linger=-0.1)


async def test_the_bus_lingers_a_millisecond_by_default(nats_server_module: Any) -> None:
    bus = await EventBus.connect(nats_server_module.url, name="linger-test")
    try:
        assert bus.nc.flush_linger == 0.001
    finally:
        await bus.close()
    bus = await EventBus.connect(nats_server_module.url, name="linger-test", flush_linger=0)
    try:
        assert bus.nc.flush_linger == 0
    finally:
        await bus.close()
