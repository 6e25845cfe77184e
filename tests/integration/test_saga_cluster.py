"""What meshkit creates on a 3-node cluster: one replicas setting for every stream and
bucket, ``ensure_*`` that never scales a stream down, and placement errors in the
server's words."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshkit.saga import EventBus, StreamSpec
from meshkit.saga.cluster import JetStreamAPIError
from meshkit.saga.dlq import DLQ_STREAM
from meshkit.saga.eventstore import EventStore, EventStoreConfig
from meshkit.saga.orchestrator import OrchestratorConfig, ensure_orchestration
from meshkit.saga.snapshots import SnapshotStore
from meshkit.saga.tracker import SagaStore

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


@pytest.fixture
async def bus(nats_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[EventBus]:
    monkeypatch.delenv("MESHKIT_NATS_REPLICAS", raising=False)
    bus = await EventBus.connect(nats_cluster.url, name="cluster-test")
    yield bus
    await bus.close()


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def _replicas(bus: EventBus, stream: str) -> int:
    return (await bus.js.stream_info(stream)).config.num_replicas or 1


async def test_ensure_stream_with_a_default_spec_leaves_an_r3_stream_at_r3(
    bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    name = _name("KEEP_R3")
    await bus.ensure_stream(StreamSpec(name=name, prefix=name.lower(), replicas=3))
    assert await _replicas(bus, name) == 3
    default = StreamSpec(name=name, prefix=name.lower(), extra_subjects=(f"{name.lower()}x.>",))
    await bus.ensure_stream(default)  # what every other service starting up does
    info = await bus.js.stream_info(name)
    assert info.config.num_replicas == 3
    assert f"{name.lower()}x.>" in (info.config.subjects or [])

    with caplog.at_level(logging.WARNING, logger="meshkit.saga.cluster"):
        await bus.ensure_stream(StreamSpec(name=name, prefix=name.lower(), replicas=1))
    assert await _replicas(bus, name) == 3
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"stream {name}: replicas is 3 on the server, the spec wants 1; left at 3" in warning
    # The subject another spec added is not dropped by a spec without it.
    assert f"{name.lower()}x.>" in ((await bus.js.stream_info(name)).config.subjects or [])
    await bus.js.delete_stream(name)


async def test_a_default_spec_raises_replicas_to_the_library_default(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _name("RAISE")
    await bus.ensure_stream(StreamSpec(name=name, prefix=name.lower()))
    assert await _replicas(bus, name) == 1
    monkeypatch.setenv("MESHKIT_NATS_REPLICAS", "3")
    await bus.ensure_stream(StreamSpec(name=name, prefix=name.lower()))
    assert await _replicas(bus, name) == 3
    await bus.js.delete_stream(name)


async def test_placement_errors_carry_the_servers_description(bus: EventBus) -> None:
    name = _name("TOO_MANY")
    with pytest.raises(JetStreamAPIError, match="no suitable peers for placement") as info:
        await bus.ensure_stream(StreamSpec(name=name, prefix=name.lower(), replicas=5))
    assert f"creating stream {name} (replicas 5)" in str(info.value)
    assert info.value.err_code == 10005
    with pytest.raises(JetStreamAPIError, match="no suitable peers for placement"):
        await bus.key_value(_name("kv").lower(), replicas=5)


async def test_one_setting_gives_every_stream_and_bucket_its_replicas(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHKIT_NATS_REPLICAS", "3")
    tag = uuid.uuid4().hex[:8]
    spec = StreamSpec(name=f"SAGA_{tag}", prefix=f"saga{tag}")
    await bus.ensure_stream(spec)
    store = EventStore(bus.nc, EventStoreConfig(stream=f"ES_{tag}"))
    await store.ensure()
    snapshots = SnapshotStore(bus.nc, bucket=f"snap_{tag}")
    await snapshots.kv()
    await SagaStore.open(bus, f"sagas_{tag}")
    orch = OrchestratorConfig(stream=f"ORCH_{tag}", prefix=f"orch{tag}", bucket=f"orch_{tag}")
    await ensure_orchestration(bus, orch)
    await bus.ensure_stream(DLQ_STREAM)
    streams = [
        spec.name,
        f"ES_{tag}",
        f"KV_snap_{tag}",
        f"KV_sagas_{tag}",
        f"ORCH_{tag}",
        f"KV_orch_{tag}",
        DLQ_STREAM.name,
    ]
    assert {s: await _replicas(bus, s) for s in streams} == dict.fromkeys(streams, 3)
    # An explicit value overrides the library default.
    one = StreamSpec(name=f"ONE_{tag}", prefix=f"one{tag}", replicas=1)
    await bus.ensure_stream(one)
    assert await _replicas(bus, one.name) == 1
    for s in [*streams, one.name]:
        if s != DLQ_STREAM.name:
            await bus.js.delete_stream(s)


async def test_pull_consumer_backs_off_while_its_leader_is_elected(
    bus: EventBus, nats_cluster: Any
) -> None:
    """Killing the consumer's leader: pulls that end in 503 wait before the next one
    (no busy loop), and every event published meanwhile is handled once it is back."""
    import asyncio

    name = _name("PULL")
    spec = StreamSpec(name=name, prefix=name.lower(), replicas=3)
    await bus.ensure_stream(spec)
    handled: set[str] = set()

    async def handle(msg: Any) -> None:
        handled.add(msg.data.decode())
        await msg.ack()

    consumer = bus.consumer(spec, "worker", handle)
    await consumer.start()
    leader = ""
    try:
        for i in range(20):
            await bus.publish_raw(f"{spec.prefix}.x", str(i).encode(), {"Nats-Msg-Id": f"a{i}"})
        info = await bus.js.consumer_info(name, "worker")
        assert info.cluster is not None and info.cluster.leader
        leader = info.cluster.leader
        pulls = consumer.stats.pulls
        await asyncio.to_thread(nats_cluster.kill, nats_cluster.index_of(leader))
        for i in range(20, 40):
            await bus.publish_raw(f"{spec.prefix}.x", str(i).encode(), {"Nats-Msg-Id": f"a{i}"})
        loop = asyncio.get_running_loop()
        end = loop.time() + 25
        while len(handled) < 40 and loop.time() < end:
            await asyncio.sleep(0.05)
        print(
            f"\nconsumer leader {leader} killed: {consumer.stats.pulls - pulls} pulls, "
            f"{consumer.stats.backoffs} back-offs until all 40 handled"
        )
        assert handled == {str(i) for i in range(40)}
        assert consumer.stats.pulls - pulls < 100
    finally:
        await consumer.stop()
        if leader:
            await asyncio.to_thread(nats_cluster.restart, nats_cluster.index_of(leader))
        await bus.js.delete_stream(name)
