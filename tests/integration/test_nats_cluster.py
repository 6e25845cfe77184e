"""A local 3-node JetStream cluster (``NatsCluster``, ``meshkit nats --cluster``), and
NATS server lists wherever meshkit takes a URL."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest

from meshkit.nats import NatsCluster, NatsServerError, split_servers
from meshkit.saga import EventBus, StreamSpec
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


def test_split_servers() -> None:
    assert split_servers("nats://a:1") == ["nats://a:1"]
    assert split_servers(" nats://a:1, nats://b:2 ,") == ["nats://a:1", "nats://b:2"]
    assert split_servers(["nats://a:1,nats://b:2", "nats://c:3"]) == [
        "nats://a:1",
        "nats://b:2",
        "nats://c:3",
    ]
    with pytest.raises(NatsServerError, match="no NATS server"):
        split_servers(" , ")


def test_cluster_starts_again_when_a_picked_port_is_taken_before_its_node_binds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    from meshkit.nats import _cluster

    # Another process takes the first monitoring port picked, between the pick and the bind.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks: list[int] = []
    real = _cluster._free_port

    def pick(host: str) -> int:
        # Three route ports are picked, then three monitoring ports.
        picks.append(taken.getsockname()[1] if len(picks) == 3 else real(host))
        return picks[-1]

    monkeypatch.setattr(_cluster, "_free_port", pick)
    try:
        with NatsCluster(3, start_timeout=30) as cluster:
            assert cluster.running == [True, True, True]
            assert len(picks) == 12  # the first six picks, then six fresh ones
            assert taken.getsockname()[1] not in cluster.monitor_ports
    finally:
        taken.close()


def test_cluster_rejects_bad_sizes() -> None:
    with pytest.raises(NatsServerError, match="expected 1 to 9"):
        NatsCluster(0)
    with pytest.raises(NatsServerError, match="2 client ports for 3 nodes"):
        NatsCluster(3, ports=[1, 2])


async def test_cluster_places_r3_streams(nats_cluster: Any) -> None:
    assert len(nats_cluster.urls) == 3
    assert nats_cluster.url == ",".join(nats_cluster.urls)
    assert len(set(nats_cluster.names)) == 3
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        js = nc.jetstream()
        await js.add_stream(name="CLUSTER_R3", subjects=["cluster.r3.>"], num_replicas=3)
        info = await js.stream_info("CLUSTER_R3")
        assert info.cluster is not None
        assert info.cluster.leader in nats_cluster.names
        assert len(info.cluster.replicas or []) == 2
        await js.delete_stream("CLUSTER_R3")
    finally:
        await nc.close()


async def test_event_bus_takes_a_server_list_whose_first_server_is_dead(
    nats_cluster: Any,
) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    bus = await EventBus.connect(f"{dead},{nats_cluster.url}", name="list", dont_randomize=True)
    try:
        assert bus.nc.is_connected
        assert bus.nc.connected_url is not None
        assert f"{bus.nc.connected_url.hostname}:{bus.nc.connected_url.port}" in nats_cluster.url
        spec = StreamSpec(name="CLUSTER_LIST", prefix="cluster.list", replicas=3)
        await bus.ensure_stream(spec)
        ack = await bus.publish_raw("cluster.list.x", b"x", {"Nats-Msg-Id": "one"})
        assert ack.seq == 1
        await bus.js.delete_stream("CLUSTER_LIST")
    finally:
        await bus.close()


def test_meshkit_nats_cluster_command_prints_the_server_list_and_stops_cleanly() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshkit.cli", "nats", "--cluster", "3", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for _ in range(6):
            lines.append(proc.stdout.readline())
            if lines[-1].startswith("NATS_URL="):
                break
        assert lines[-1].startswith("NATS_URL="), lines
        url = lines[-1].strip().removeprefix("NATS_URL=")
        store = Path(lines[0].split("(store ", 1)[1].split(")", 1)[0])
        assert store.is_dir()
        assert len(split_servers(url)) == 3

        async def check() -> None:
            nc = await nats.connect(servers=split_servers(url))
            js = nc.jetstream()
            await js.add_stream(name="CLI_R3", subjects=["cli.r3.>"], num_replicas=3)
            assert (await js.publish("cli.r3.x", b"x")).seq == 1
            await nc.close()

        asyncio.run(check())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else ""
    assert not store.exists()  # a temporary store goes with the cluster
