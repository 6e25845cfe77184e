"""Serving the gateway: meshkit's HTTP/1.1 server (uvloop + httptools, :mod:`._serve`),
SO_REUSEPORT workers, SIGHUP reload, SIGTERM graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from meshkit.errors import ConfigError
from meshkit.gateway._http import HttpOptions
from meshkit.gateway.app import ASGIApp, Receive, Scope, Send, create_app, load_catalog
from meshkit.gateway.config import GatewayConfig, GatewayOptions, load_config
from meshkit.gateway.descriptors import Catalog, build_catalog, descriptor_set_from_reflection
from meshkit.gateway.upstreams import UpstreamRegistry

log = logging.getLogger("meshkit.gateway")


@dataclass(frozen=True, slots=True)
class ServeSpec:
    """Everything needed to (re)build the gateway in a worker process."""

    descriptor_set: str | None
    reflect: bool
    upstreams: tuple[str, ...]
    config: str | None
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    services: tuple[str, ...] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    profile: str | None = None
    #: The HTTP server's limits and timeouts.
    http: HttpOptions = field(default_factory=HttpOptions)


def _load(spec: ServeSpec) -> tuple[Catalog, GatewayConfig]:
    cfg = load_config(spec.config) if spec.config else GatewayConfig()
    if spec.overrides:
        cfg = replace(cfg, options=cfg.options.with_(**spec.overrides))
    specs = list(spec.upstreams) or [
        f"{k}={v}" if k != "default" else v for k, v in cfg.upstreams.items()
    ]
    if not specs and cfg.edge is None:
        raise ConfigError("--upstream", "at least one upstream is required (flag or config)")
    if spec.reflect:
        targets = sorted({s.partition("=")[2] or s for s in specs})
        catalog = build_catalog(
            descriptor_set_from_reflection([t.split(",")[0] for t in targets]),
            services=spec.services,
        )
    elif spec.descriptor_set:
        catalog = load_catalog(Path(spec.descriptor_set), spec.services)
    else:
        raise ConfigError("--descriptor-set", "give --descriptor-set FILE or --reflect")
    cfg = GatewayConfig(
        cfg.options,
        {s.partition("=")[0] if "=" in s else "default": s.partition("=")[2] or s for s in specs},
        cfg.policy,
        cfg.edge,
    )
    return catalog, cfg


def _with_sighup(app: ASGIApp, on_sighup: Callable[[], None]) -> ASGIApp:
    """Install a SIGHUP handler when the app's lifespan starts, then delegate."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
        await app(scope, receive, send)

    return wrapper


def _build_edge(spec: ServeSpec, catalog: Catalog) -> ASGIApp:
    from meshkit.gateway.edge import create_edge_app

    if spec.config is None:
        raise ConfigError("--profile", "the edge needs --config gateway.yaml with an edge: section")
    descriptors: Any = Path(spec.descriptor_set) if spec.descriptor_set else catalog
    edge = create_edge_app(
        spec.config,
        descriptors,
        services=list(spec.services) if spec.services else None,
        option_overrides=spec.overrides,
    )
    inner = edge.app_for(spec.profile) if spec.profile else edge.asgi()

    def reload() -> None:
        async def run() -> None:
            try:
                await edge.reload()
                log.info("edge reloaded (pid %d)", os.getpid())
            except Exception as exc:  # keep serving the old configuration
                log.error("edge reload failed, keeping the previous configuration: %s", exc)

        asyncio.get_running_loop().create_task(run())

    return _with_sighup(inner, reload)


def build_app(spec: ServeSpec) -> ASGIApp:
    """Build the app for ``spec`` (the edge when the config has an ``edge:`` section or a
    profile is named) and wire SIGHUP reload into its lifespan."""
    catalog, cfg = _load(spec)
    if cfg.edge is not None or spec.profile:
        return _build_edge(spec, catalog)
    app = create_app(
        catalog, UpstreamRegistry.from_specs(cfg.upstreams, policy=cfg.policy), options=cfg.options
    )
    current = {"cfg": cfg}

    def reload() -> None:
        try:
            new_catalog, new_cfg = _load(spec)
            same_ups = (
                new_cfg.upstreams == current["cfg"].upstreams
                and new_cfg.policy == current["cfg"].policy
            )
            registry = (
                None
                if same_ups
                else UpstreamRegistry.from_specs(new_cfg.upstreams, policy=new_cfg.policy)
            )
            app.reload(app.build_state(new_catalog, registry, new_cfg.options))
            current["cfg"] = new_cfg
            log.info("gateway reloaded: %d routes (pid %d)", len(app.routes), os.getpid())
        except Exception as exc:  # keep serving the old snapshot
            log.error("gateway reload failed, keeping the previous configuration: %s", exc)

    async def install_sighup() -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)

    app.on_startup.append(install_sighup)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT, so several workers share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_worker(spec: ServeSpec, sock: socket.socket | None = None) -> int:
    """Serve in this process until SIGTERM/SIGINT: 0 after a graceful stop, 3 when the
    app's startup failed."""
    from meshkit.gateway._serve import run

    app = build_app(spec)
    if sock is None:
        sock = bind_socket(spec.host, spec.port)
    return run([(sock, app)], options=spec.http, lifespan=app)


def _worker_main(spec: ServeSpec) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise SystemExit(run_worker(spec))


def serve(spec: ServeSpec) -> int:
    """Run the gateway: in-process for one worker, else N SO_REUSEPORT processes."""
    _load(spec)  # fail fast, in the parent, on a bad descriptor set or config
    if spec.workers <= 1:
        sock = bind_socket(spec.host, spec.port)
        log.info("meshkit gateway on %s:%d", spec.host, sock.getsockname()[1])
        return run_worker(spec, sock)
    # Reserve the port (port 0 picks one) so every worker binds the same one.
    reserve = bind_socket(spec.host, spec.port)
    port = reserve.getsockname()[1]
    reserve.close()
    wspec = ServeSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "port": port})
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(wspec,), daemon=False) for _ in range(spec.workers)
    ]
    for p in procs:
        p.start()
    log.info("meshkit gateway on %s:%d with %d workers", spec.host, port, spec.workers)

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = 0
    clean = {0, -signal.SIGTERM, -signal.SIGINT}  # a worker killed before its handlers
    for p in procs:
        p.join()
        if p.exitcode not in clean:
            code = code or 1
    return code


def options_overrides(
    *, proto_names: bool = False, emit_unpopulated: bool = False, strict: bool = False
) -> dict[str, Any]:
    """CLI flags that override ``gateway:`` options."""
    out: dict[str, Any] = {}
    if proto_names:
        out["proto_names"] = True
    if emit_unpopulated:
        out["emit_unpopulated"] = True
    if strict:
        out["strict"] = True
    return out


__all__ = ["GatewayOptions", "ServeSpec", "bind_socket", "build_app", "serve"]
