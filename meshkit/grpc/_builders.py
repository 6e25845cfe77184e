"""Channel and server builders (sync): load balancing, health, keepalive, TLS, drain.

The pieces shared with :mod:`meshkit.grpc.aio` (target strings, service config,
channel options, credentials) are plain functions here.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "TLS",
    "Keepalive",
    "MeshServer",
    "build_channel",
    "build_server",
    "channel_credentials",
    "channel_options",
    "lb_target",
    "server_credentials",
    "service_config",
]

_log = logging.getLogger("meshkit.grpc")


def _read(value: bytes | str | Path | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return Path(value).read_bytes()


@dataclass(frozen=True, slots=True)
class TLS:
    """TLS (and mTLS) material: PEM bytes, PEM text, or file paths.

    Client side: ``ca`` verifies the server (None: the system roots); ``cert`` and
    ``key`` are the client's own for mTLS; ``server_name`` overrides the name checked
    in the server's certificate. Server side: ``cert`` and ``key`` are the server's;
    ``ca`` plus ``require_client_cert=True`` demands and verifies client certificates.
    """

    ca: bytes | str | Path | None = None
    cert: bytes | str | Path | None = None
    key: bytes | str | Path | None = None
    server_name: str | None = None
    require_client_cert: bool = False


@dataclass(frozen=True, slots=True)
class Keepalive:
    """HTTP/2 keepalive pings: every ``time`` seconds, dead after ``timeout`` unanswered."""

    time: float = 30.0
    timeout: float = 10.0
    permit_without_calls: bool = True


def lb_target(target_or_targets: str | Sequence[str]) -> str:
    """A channel target: a name as given, or several ``host:port`` IPs as ``ipv4:a,b``.

    Several addresses must be IP literals of one family (grpc's static resolvers); for
    host names use one ``dns:///name:port`` target, which resolves to every address.
    """
    if isinstance(target_or_targets, str):
        return target_or_targets
    addresses = list(target_or_targets)
    if not addresses:
        raise ValueError("channel(): no target given")
    if len(addresses) == 1:
        return addresses[0]
    families: set[int] = set()
    for address in addresses:
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"channel(): {address!r} is not an IP address; several targets must be "
                "IP literals (use one 'dns:///name:port' target for host names)"
            ) from None
    if len(families) != 1:
        raise ValueError("channel(): mix of IPv4 and IPv6 addresses")
    scheme = "ipv4" if families == {4} else "ipv6"
    return f"{scheme}:{','.join(addresses)}"


def service_config(
    *, round_robin: bool, health_check: bool | str, extra: Mapping[str, Any] | None = None
) -> str | None:
    """The gRPC service config JSON: round-robin balancing and client-side health checks.

    Client-side health checking (``healthCheckConfig``) needs a balancer other than
    pick_first, so it turns round-robin on.
    """
    config: dict[str, Any] = dict(extra or {})
    if round_robin or health_check:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    if health_check:
        name = health_check if isinstance(health_check, str) else ""
        config["healthCheckConfig"] = {"serviceName": name}
    return json.dumps(config) if config else None


def channel_options(
    *,
    round_robin: bool,
    health_check: bool | str,
    keepalive: Keepalive | None,
    tls: TLS | None,
    options: Iterable[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """grpcio channel options for the builders."""
    opts: list[tuple[str, Any]] = []
    config = service_config(round_robin=round_robin, health_check=health_check)
    if config is not None:
        opts.append(("grpc.service_config", config))
    if keepalive is not None:
        opts += [
            ("grpc.keepalive_time_ms", int(keepalive.time * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive.timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    opts += list(options)
    return opts


def channel_credentials(tls: TLS) -> grpc.ChannelCredentials:
    """Client credentials for TLS or mTLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca),
        private_key=_read(tls.key),
        certificate_chain=_read(tls.cert),
    )


def server_credentials(tls: TLS) -> grpc.ServerCredentials:
    """Server credentials for TLS, or mTLS with ``require_client_cert``."""
    key, cert = _read(tls.key), _read(tls.cert)
    if key is None or cert is None:
        raise ValueError("server TLS needs both cert and key")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=_read(tls.ca),
        require_client_auth=tls.require_client_cert,
    )


def _tls_of(tls: TLS | bool | None) -> TLS | None:
    if tls is True:
        return TLS()
    if tls is False or tls is None:
        return None
    return tls


def prepare_channel(
    target_or_targets: str | Sequence[str],
    *,
    tls: TLS | bool | None,
    keepalive: Keepalive | None,
    health_check: bool | str,
    round_robin: bool | None,
    options: Iterable[tuple[str, Any]],
) -> tuple[str, list[tuple[str, Any]], TLS | None]:
    """What the sync and asyncio channel builders share: the target (``ipv4:a,b`` for
    several addresses), the channel options and the TLS settings (None: insecure).
    Round-robin is the default when there are several addresses."""
    target = lb_target(target_or_targets)
    several = not isinstance(target_or_targets, str) and len(list(target_or_targets)) > 1
    rr = several if round_robin is None else round_robin
    t = _tls_of(tls)
    opts = channel_options(
        round_robin=rr, health_check=health_check, keepalive=keepalive, tls=t, options=options
    )
    return target, list(opts), t


def build_channel(
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
    """A sync channel with meshkit's interceptor (see :func:`meshkit.grpc.channel`)."""
    from meshkit.grpc import client_interceptors

    target, opts, t = prepare_channel(
        target_or_targets,
        tls=tls,
        keepalive=keepalive,
        health_check=health_check,
        round_robin=round_robin,
        options=options,
    )
    raw = (
        grpc.secure_channel(target, channel_credentials(t), options=opts)
        if t is not None
        else grpc.insecure_channel(target, options=opts)
    )
    # Always ours, even without a policy: it propagates the handler's deadline.
    chain = [
        *interceptors,
        *client_interceptors(policy, target=name or target, **interceptor_options),
    ]
    return grpc.intercept_channel(raw, *chain)


# ------------------------------------------------------------------------------ server


class _Recorder:
    """Stands in for a server while generated ``add_*_to_server`` functions register,
    so the builder learns the service names (for health and reflection)."""

    def __init__(self, server: Any, names: list[str]) -> None:
        self._server = server
        self._names = names

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        handlers = tuple(handlers)
        for h in handlers:
            name = getattr(h, "service_name", None)
            if callable(name) and name() and name() not in self._names:
                self._names.append(name())
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: Any) -> None:
        if service_name not in self._names:
            self._names.append(service_name)
        self._server.add_registered_method_handlers(service_name, handlers)

    def __getattr__(self, item: str) -> Any:
        return getattr(self._server, item)


Service = Any  # a GenericRpcHandler, (add_fn, servicer), or a callable(server)


def register_services(server: Any, services: Iterable[Service], names: list[str]) -> None:
    """Register services on ``server`` and collect their names into ``names``."""
    recorder = _Recorder(server, names)
    for service in services:
        if isinstance(service, tuple) and len(service) == 2:
            add, servicer = service
            add(servicer, recorder)
        elif isinstance(service, grpc.GenericRpcHandler):
            recorder.add_generic_rpc_handlers((service,))
        elif callable(service):
            service(recorder)
        else:
            raise TypeError(
                f"server(): cannot register {service!r}; give a GenericRpcHandler, "
                "(add_XServicer_to_server, servicer) or a callable(server)"
            )


def add_health_and_reflection(
    server: Any, names: list[str], *, health: bool, reflection: bool
) -> Any:
    """Add grpc.health.v1 (all services SERVING) and reflection; returns the health servicer."""
    servicer = None
    all_names = list(names)
    if health:
        from grpc_health.v1 import health as health_mod
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        servicer = health_mod.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        all_names.append(health_mod.SERVICE_NAME)
        for name in ["", *names]:
            servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if reflection:
        from grpc_reflection.v1alpha import reflection as reflection_mod

        all_names.append(reflection_mod.SERVICE_NAME)
        reflection_mod.enable_server_reflection(all_names, server)
    return servicer


class MeshServer:
    """A started-or-not grpc.Server with health, reflection and a graceful drain.

    :meth:`drain` (also on SIGTERM when ``handle_signals``) marks every service
    NOT_SERVING, so client-side health checks steer new calls away, then stops
    accepting calls and waits up to ``grace`` seconds for the ones in flight.
    """

    def __init__(
        self,
        server: grpc.Server,
        ports: list[int],
        names: list[str],
        health_servicer: Any,
        grace: float,
        handle_signals: bool,
        interceptor: Any,
    ) -> None:
        self.server = server
        self.ports = ports
        self.port = ports[0] if ports else 0
        self.services = names
        self.health = health_servicer
        self.grace = grace
        self.interceptor = interceptor
        self._handle_signals = handle_signals
        self._stopped = threading.Event()
        self._previous: Any = None

    def start(self) -> MeshServer:
        """Start serving; install the SIGTERM drain when asked (main thread only)."""
        self.server.start()
        if self._handle_signals and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        _log.info("SIGTERM: draining (grace %.1fs)", self.grace)
        threading.Thread(target=self.drain, name="meshkit-drain", daemon=True).start()

    def set_serving(self, serving: bool) -> None:
        """Mark every service SERVING or NOT_SERVING in the health service."""
        if self.health is None:
            return
        from grpc_health.v1 import health_pb2

        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.services]:
            self.health.set(name, status)

    def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, then stop with ``grace`` seconds for calls in flight."""
        self.set_serving(False)
        event = self.server.stop(self.grace if grace is None else grace)
        event.wait()
        self._stopped.set()

    def stop(self, grace: float | None = 0) -> threading.Event:
        """Stop at once (or with ``grace``), as ``grpc.Server.stop``."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        self.set_serving(False)
        event: threading.Event = self.server.stop(grace)
        return event

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops."""
        return bool(self.server.wait_for_termination(timeout))

    def __enter__(self) -> MeshServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(0).wait()


def build_server(
    *,
    policy: Any = None,
    services: Iterable[Service] = (),
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
    executor: futures.Executor | None = None,
    on_register: Callable[[Any], None] | None = None,
) -> MeshServer:
    """A sync server (see :func:`meshkit.grpc.server`)."""
    from meshkit.grpc._server import ServerInterceptor

    ours = ServerInterceptor(policy, isolate=isolate)
    pool = executor or futures.ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix="meshkit-grpc"
    )
    server = grpc.server(
        pool,  # type: ignore[arg-type]
        interceptors=[*interceptors, ours],
        options=list(options),
    )
    names: list[str] = []
    register_services(server, services, names)
    if on_register is not None:
        on_register(server)
    servicer = add_health_and_reflection(server, names, health=health, reflection=reflection)
    addresses = [address] if isinstance(address, str) else list(address)
    ports = []
    for addr in addresses:
        if tls is not None:
            ports.append(server.add_secure_port(addr, server_credentials(tls)))
        else:
            ports.append(server.add_insecure_port(addr))
    return MeshServer(server, ports, names, servicer, grace, handle_signals, ours)
