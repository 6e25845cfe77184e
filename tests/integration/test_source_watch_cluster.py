"""SourceWatch on a real 3-node cluster: a replicated stream's source that nats-server
has put on a long retry backoff is set up again at once after the watch's nudge.

Deterministic stand-in for the stall seen after a SHOP leader kill (the new leader's
source-consumer request lost in the election, then 30 s of waiting and 10 s of
backoff): a source whose origin stream does not exist yet fails its setup, and
nats-server retries it only after 2 s + 10 s x failures. The origin appears; the
stream copies nothing; the watch sees the source inactive under one leader and asks
the leader to step down; the next leader copies everything within seconds
(measured: ~3 s after the watch starts, ~8 s after the stream was created;
without the watch, 41 s).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.js import api

from meshkit.saga import EventBus, cluster

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(90)]


@pytest.fixture
async def bus(nats_cluster: Any) -> AsyncIterator[EventBus]:
    bus = await EventBus.connect(nats_cluster.url, name="source-watch-test")
    yield bus
    await bus.close()


async def _messages(bus: EventBus, stream: str) -> int:
    msg = await bus.nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2)
    return int(json.loads(msg.data).get("state", {}).get("messages", 0))


async def test_a_source_on_retry_backoff_is_nudged_and_copies_at_once(bus: EventBus) -> None:
    tag = uuid.uuid4().hex[:8].upper()
    origin, copy = f"ORIG_{tag}", f"COPY_{tag}"
    loop = asyncio.get_running_loop()
    created = loop.time()
    await cluster.add_stream(
        bus.js,
        api.StreamConfig(
            name=copy,
            subjects=[f"copy{tag}.>"],
            num_replicas=3,
            sources=[api.StreamSource(name=origin)],
        ),
    )
    # Let the source's setup fail (no such stream) once or twice: the server now
    # waits 2 s + 10 s per failure before trying again.
    await asyncio.sleep(3)
    await cluster.add_stream(
        bus.js, api.StreamConfig(name=origin, subjects=[f"orig{tag}.>"], num_replicas=3)
    )
    for i in range(5):
        # Just created on three nodes, the stream may have no leader for a moment;
        # the message id makes a resend safe.
        await cluster.retrying(
            f"publishing to {origin}",
            lambda i=i: bus.js.publish(
                f"orig{tag}.x", str(i).encode(), headers={"Nats-Msg-Id": f"{tag}-{i}"}
            ),
            transient=cluster.JUST_CREATED,
        )
    await asyncio.sleep(1.5)
    assert await _messages(bus, copy) == 0  # stalled: nothing copied
    watch = cluster.SourceWatch(bus.nc, copy, stalled_after=2.0, interval=0.25).start()
    started = loop.time()
    try:
        while await _messages(bus, copy) < 5:
            assert loop.time() - started < 15, "the source was not set up again"
            await asyncio.sleep(0.2)
    finally:
        await watch.stop()
    took = loop.time() - started
    print(f"\ncopied {took:.1f}s after the watch started ({watch.nudges} nudge(s))")
    assert watch.nudges >= 1
    # The server's own retry comes 2 s + 10 s after the first failed setup at the
    # earliest (without the watch this copy took 41 s): the nudge did it.
    assert loop.time() - created < 11.5
    await bus.js.delete_stream(copy)
    await bus.js.delete_stream(origin)
