"""meshkit for grpc.aio: one fused client interceptor, one fused server interceptor, builders.

::

    achan = grpc.aio.insecure_channel(
        target, interceptors=meshkit.grpc.aio.client_interceptors(policy, target=target)
    )
    aserver = grpc.aio.server(interceptors=meshkit.grpc.aio.server_interceptors(policy))
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from meshkit.grpc._builders import (
    TLS,
    Keepalive,
    add_health_and_reflection,
    channel_credentials,
    prepare_channel,
    register_services,
    server_credentials,
)
from meshkit.grpc.aio._client import AioClientInterceptor, arity_views
from meshkit.grpc.aio._server import AioServerInterceptor

__all__ = [
    "TLS",
    "AioClientInterceptor",
    "AioMeshServer",
    "AioServerInterceptor",
    "Keepalive",
    "channel",
    "client_interceptors",
    "server",
    "server_interceptors",
]

_log = logging.getLogger("meshkit.grpc")


def client_interceptors(
    policy: Any,
    target: str | None = None,
    *,
    client_faults: bool = False,
    client_rate_limits: bool = False,
    alternate_channel: Callable[[str], grpc.aio.Channel] | None = None,
) -> list[Any]:
    """The interceptors for ``grpc.aio.*_channel(..., interceptors=...)``.

    One fused :class:`AioClientInterceptor` does the work. grpc.aio files each
    interceptor object under a single arity (it tests the types with ``elif``), so the
    list holds the interceptor (unary-unary) and three thin views of it for the other
    arities: every call still passes through exactly one interceptor. The first item is
    the :class:`AioClientInterceptor`. Arguments as :func:`meshkit.grpc.client_interceptors`.
    """
    core = AioClientInterceptor(
        policy,
        target,
        client_faults=client_faults,
        client_rate_limits=client_rate_limits,
        alternate_channel=alternate_channel,
    )
    return arity_views(core)


def server_interceptors(policy: Any = None) -> list[AioServerInterceptor]:
    """The interceptors for ``grpc.aio.server(interceptors=...)``: a list of one.

    Per-service thread-pool isolation does not apply to asyncio servers (handlers do
    not hold threads); use a bulkhead (``scope: service``) or an adaptive limit.
    """
    return [AioServerInterceptor(policy)]


def channel(
    target_or_targets: str | Sequence[str],
    *,
    policy: Any = None,
    tls: TLS | bool | None = None,
    keepalive: Keepalive | None = None,
    health_check: bool | str = False,
    round_robin: bool | None = None,
    options: Iterable[tuple[str, Any]] = (),
    name: str | None = None,
    interceptors: Sequence[Any] = (),
    **interceptor_options: Any,
) -> grpc.aio.Channel:
    """A grpc.aio channel; arguments as :func:`meshkit.grpc.channel`."""
    target, opts, t = prepare_channel(
        target_or_targets,
        tls=tls,
        keepalive=keepalive,
        health_check=health_check,
        round_robin=round_robin,
        options=options,
    )
    # Always ours, even without a policy: it propagates the handler's deadline.
    chain = [
        *interceptors,
        *client_interceptors(policy, target=name or target, **interceptor_options),
    ]
    if t is not None:
        return grpc.aio.secure_channel(
            target, channel_credentials(t), options=opts, interceptors=chain or None
        )
    return grpc.aio.insecure_channel(target, options=opts, interceptors=chain or None)


class AioMeshServer:
    """A grpc.aio server with health, reflection and a graceful drain (see MeshServer)."""

    def __init__(
        self,
        server: grpc.aio.Server,
        ports: list[int],
        names: list[str],
        health_servicer: Any,
        grace: float,
        handle_signals: bool,
    ) -> None:
        self.server = server
        self.ports = ports
        self.port = ports[0] if ports else 0
        self.services = names
        self.health = health_servicer
        self.grace = grace
        self._handle_signals = handle_signals
        self._drain_task: asyncio.Task[None] | None = None

    async def start(self) -> AioMeshServer:
        """Start serving; on SIGTERM drain (when asked and the loop supports signals)."""
        await self.set_serving(True)
        await self.server.start()
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            try:
                loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
            except (NotImplementedError, RuntimeError, ValueError):
                _log.debug("SIGTERM handler not installed (not the main thread?)")
        return self

    def _on_sigterm(self) -> None:
        _log.info("SIGTERM: draining (grace %.1fs)", self.grace)
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain())

    async def set_serving(self, serving: bool) -> None:
        """Mark every service SERVING or NOT_SERVING."""
        if self.health is None:
            return
        from grpc_health.v1 import health_pb2

        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.services]:
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, then stop with ``grace`` seconds for calls in flight."""
        await self.set_serving(False)
        await self.server.stop(self.grace if grace is None else grace)

    async def stop(self, grace: float | None = 0) -> None:
        """Stop at once (or with ``grace``)."""
        if self._handle_signals:
            try:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        await self.set_serving(False)
        await self.server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until the server stops."""
        return bool(await self.server.wait_for_termination(timeout))


def server(
    *,
    policy: Any = None,
    services: Iterable[Any] = (),
    address: str | Sequence[str] = "127.0.0.1:0",
    health: bool = True,
    reflection: bool = True,
    tls: TLS | None = None,
    interceptors: Sequence[Any] = (),
    options: Iterable[tuple[str, Any]] = (),
    grace: float = 5.0,
    handle_signals: bool = True,
) -> AioMeshServer:
    """A grpc.aio server with meshkit's interceptor, health, reflection and SIGTERM drain.

    Arguments as :func:`meshkit.grpc.server`. Call ``await s.start()``.
    """
    srv = grpc.aio.server(
        interceptors=[*interceptors, *server_interceptors(policy)], options=list(options)
    )
    names: list[str] = []
    register_services(srv, services, names)
    servicer = None
    extra: list[str] = []
    if health:
        from grpc_health.v1 import _async as health_aio
        from grpc_health.v1 import health_pb2_grpc

        servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
        # Every service is marked SERVING by start(), before the port answers.
        extra.append("grpc.health.v1.Health")
    add_health_and_reflection(srv, [*names, *extra], health=False, reflection=reflection)
    addresses = [address] if isinstance(address, str) else list(address)
    ports = []
    for addr in addresses:
        if tls is not None:
            ports.append(srv.add_secure_port(addr, server_credentials(tls)))
        else:
            ports.append(srv.add_insecure_port(addr))
    return AioMeshServer(srv, ports, names, servicer, grace, handle_signals)
