"""meshkit for grpcio (sync): one fused client interceptor, one fused server interceptor,
and builders for channels and servers.

::

    import grpc, meshkit, meshkit.grpc

    policy = meshkit.Policy.load("mesh.yaml")
    channel = grpc.intercept_channel(
        grpc.insecure_channel(target), *meshkit.grpc.client_interceptors(policy, target=target)
    )
    server = grpc.server(pool, interceptors=meshkit.grpc.server_interceptors(policy))

Each ``*_interceptors()`` returns a list holding ONE interceptor implementing every
arity: each extra grpcio interceptor costs throughput, so all policies run in it.
See docs/interceptors.md for the behaviour of each policy on each arity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from meshkit.grpc._builders import TLS, Keepalive, MeshServer, build_channel, build_server
from meshkit.grpc._client import ClientInterceptor
from meshkit.grpc._server import IsolationPool, ServerInterceptor
from meshkit.grpc._status import (
    PREVIOUS_ATTEMPTS_KEY,
    PUSHBACK_KEY,
    LocalRpcError,
    code_of,
    error_status,
    parse_pushback,
    pushback_metadata,
    rich_trailers,
)

__all__ = [
    "PREVIOUS_ATTEMPTS_KEY",
    "PUSHBACK_KEY",
    "TLS",
    "ClientInterceptor",
    "IsolationPool",
    "Keepalive",
    "LocalRpcError",
    "MeshServer",
    "ServerInterceptor",
    "channel",
    "client_interceptors",
    "code_of",
    "error_status",
    "parse_pushback",
    "pushback_metadata",
    "rich_trailers",
    "server",
    "server_interceptors",
]


def client_interceptors(
    policy: Any,
    target: str | None = None,
    *,
    client_faults: bool = False,
    client_rate_limits: bool = False,
    alternate_channel: Callable[[str], grpc.Channel] | None = None,
) -> list[ClientInterceptor]:
    """The client interceptors for ``grpc.intercept_channel``: a list of one.

    ``target`` keys the shared per-target state (circuit breakers, retry budgets,
    bulkheads); when absent the key is ``"default"``, so give a name when one policy
    serves channels to several targets. ``client_faults`` / ``client_rate_limits``
    apply fault and rate-limit rules on this client even when their ``side`` is
    ``server`` (rules with ``side: client`` or ``both`` apply anyway).
    ``alternate_channel(target)`` builds channels for ``kind: alternate`` fallbacks.
    """
    return [
        ClientInterceptor(
            policy,
            target,
            client_faults=client_faults,
            client_rate_limits=client_rate_limits,
            alternate_channel=alternate_channel,
        )
    ]


def server_interceptors(
    policy: Any = None, *, isolate: Mapping[str, int | IsolationPool] | None = None
) -> list[ServerInterceptor]:
    """The server interceptors for ``grpc.server(..., interceptors=...)``: a list of one.

    Always propagates the incoming deadline to :mod:`meshkit.deadline`; applies the
    policy's server side (rate limits, faults, adaptive limits, bulkheads). ``isolate``
    maps service names to a thread count for per-service pool isolation.
    """
    return [ServerInterceptor(policy, isolate=isolate)]


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
) -> grpc.Channel:
    """A channel with meshkit's policies, load balancing, health checks, keepalive, TLS.

    ``target_or_targets``: one target (``host:port``, ``dns:///name:port``) or several
    IP ``host:port`` addresses, balanced round-robin (``ipv4:a,b`` and the service
    config ``loadBalancingConfig: [{round_robin: {}}]``). ``health_check``: client-side
    health checking through the service config (True: the server's overall health;
    a string: that service's). ``tls``: :class:`TLS` (``True``: system roots).
    ``policy=None`` still propagates deadlines. ``name`` keys breakers and budgets
    (default: the target). ``interceptors`` run
    outside meshkit's (e.g. OpenTelemetry's).
    """
    return build_channel(
        target_or_targets,
        policy=policy,
        tls=tls,
        keepalive=keepalive,
        health_check=health_check,
        round_robin=round_robin,
        options=options,
        name=name,
        interceptors=interceptors,
        **interceptor_options,
    )


def server(
    *,
    policy: Any = None,
    services: Iterable[Any] = (),
    address: str | Sequence[str] = "127.0.0.1:0",
    health: bool = True,
    reflection: bool = True,
    tls: TLS | None = None,
    max_workers: int = 16,
    isolate: Mapping[str, Any] | None = None,
    interceptors: Sequence[Any] = (),
    options: Iterable[tuple[str, Any]] = (),
    grace: float = 5.0,
    handle_signals: bool = True,
) -> MeshServer:
    """A server with meshkit's interceptor, grpc.health.v1, reflection and graceful drain.

    ``services``: ``GenericRpcHandler`` objects, ``(add_XServicer_to_server, servicer)``
    pairs, or callables taking the server. Every registered service is marked SERVING;
    on SIGTERM (or :meth:`MeshServer.drain`) all turn NOT_SERVING and the server stops
    with ``grace`` seconds for calls in flight. Call ``.start()`` on the result; the
    bound port is ``.port``.
    """
    return build_server(
        policy=policy,
        services=services,
        address=address,
        health=health,
        reflection=reflection,
        tls=tls,
        max_workers=max_workers,
        isolate=isolate,
        interceptors=interceptors,
        options=options,
        grace=grace,
        handle_signals=handle_signals,
    )
