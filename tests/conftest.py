"""Shared fixtures: free ports, generated shop code, an embedded JetStream server, a fake clock."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshkit.resilience.clock import FakeClock

ROOT = Path(__file__).resolve().parent.parent


def _generate_shop() -> Path:
    """Generate the example shop's code once per session (incremental: cheap when unchanged)."""
    from meshkit.codegen import generate

    descriptor_set = ROOT / "examples" / "shop" / "gen" / "shop.binpb"
    generate(
        ROOT / "proto",
        ROOT,
        package="examples.shop.gen",
        only=["shop"],
        descriptor_set=descriptor_set,
    )
    return descriptor_set


SHOP_DESCRIPTOR_SET = _generate_shop()


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock that moves only when the test advances it."""
    return FakeClock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unused_port() -> int:
    """A free loopback port."""
    return free_port()


@pytest.fixture(scope="session")
def shop_descriptor_set() -> Path:
    """The FileDescriptorSet of proto/shop (with imports and source info)."""
    return SHOP_DESCRIPTOR_SET


@pytest.fixture
def nats_server() -> Iterator[object]:
    """A fresh nats-server with JetStream and a temporary file store, for one test."""
    from meshkit.nats import NatsServer

    with NatsServer() as server:
        yield server


@pytest.fixture(scope="module")
def nats_server_module() -> Iterator[object]:
    """One nats-server with JetStream shared by a test module."""
    from meshkit.nats import NatsServer

    with NatsServer() as server:
        yield server


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[Any]:
    """A 3-node nats-server cluster with JetStream (R3 streams), shared by a test module.

    Tests using it are marked ``integration`` and ``cluster``. ``.url`` is the server
    list; ``kill(i)``/``restart(i)`` crash and bring back a node. A test that kills a
    node restarts it before it ends, so the next test finds three nodes.
    """
    from meshkit.nats import NatsCluster

    with NatsCluster(size=3, start_timeout=60.0) as cluster:
        yield cluster


@pytest.fixture
async def nc(nats_server_module: Any) -> AsyncIterator[Any]:
    """A nats-py connection to the module's nats-server, closed after the test."""
    import nats

    conn = await nats.connect(nats_server_module.url)
    yield conn
    await conn.close()


@pytest.fixture
def grpc_server() -> Iterator[Callable[..., Any]]:
    """Start sync gRPC servers on free loopback ports: ``grpc_server(*services, policy=...)``.

    A service is ``(add_XServicer_to_server, servicer)``, a GenericRpcHandler or a
    callable(server), as :func:`meshkit.grpc.server` takes them. Each server has
    ``.port`` and health and reflection; all stop when the test ends.
    """
    import meshkit.grpc

    started: list[Any] = []

    def start(*services: Any, policy: Any = None, **options: Any) -> Any:
        server = meshkit.grpc.server(
            policy=policy, services=services, handle_signals=False, **options
        )
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(0)


@pytest.fixture
async def aio_grpc_server() -> AsyncIterator[Callable[..., Any]]:
    """The asyncio twin of :func:`grpc_server`: ``await aio_grpc_server(*services, policy=...)``."""
    import meshkit.grpc.aio

    started: list[Any] = []

    async def start(*services: Any, policy: Any = None, **options: Any) -> Any:
        server = meshkit.grpc.aio.server(
            policy=policy, services=services, handle_signals=False, **options
        )
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(0)
