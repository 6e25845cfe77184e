"""``meshkit openapi`` (write the OpenAPI 3.1 document) and ``meshkit edge`` (serve the edge)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshkit.errors import ConfigError

if TYPE_CHECKING:
    from meshkit.gateway.serve._http import HttpOptions

log = logging.getLogger("meshkit.gateway.edge")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``openapi`` and ``edge`` subcommands."""
    p = subparsers.add_parser(
        "openapi",
        help="write the OpenAPI 3.1 document of a descriptor set's google.api.http rules",
        description="Generate OpenAPI 3.1 (paths, parameters, schemas, the google.rpc.Status "
        "error schema, security schemes) from a FileDescriptorSet.",
    )
    p.add_argument(
        "--descriptor-set",
        required=True,
        metavar="FILE",
        help="FileDescriptorSet of the services (`meshkit gen --descriptor-set` writes one)",
    )
    p.add_argument(
        "--config", metavar="FILE", help="gateway.yaml (JSON naming, auth schemes, profiles)"
    )
    p.add_argument("--profile", metavar="NAME", help="document this profile's prefix")
    p.add_argument("--title", default="meshkit gateway", help="info.title (default: %(default)s)")
    p.add_argument(
        "--server", action="append", default=[], metavar="URL", help="servers[].url (repeatable)"
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=run_openapi)

    e = subparsers.add_parser(
        "edge",
        help="serve the edge gateway (auth, limits, cache, canary, BFF profiles) from gateway.yaml",
        description="Serve every profile of gateway.yaml's edge section: profiles with a port on "
        "their port, the others by path prefix on --port. SIGHUP reloads the config.",
    )
    e.add_argument(
        "--descriptor-set",
        required=True,
        metavar="FILE",
        help="FileDescriptorSet of the services (`meshkit gen --descriptor-set` writes one)",
    )
    e.add_argument(
        "--config", required=True, metavar="FILE", help="gateway.yaml with an edge: section"
    )
    e.add_argument("--profile", metavar="NAME", help="serve only this profile")
    e.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    e.add_argument("--port", type=int, default=8080, help="port for profiles without their own")
    from meshkit.gateway.serve._serve import add_http_arguments

    add_http_arguments(e)
    e.set_defaults(func=run_edge)


def run_openapi(args: argparse.Namespace) -> int:
    """Entry point of ``meshkit openapi``."""
    from meshkit.gateway.core.app import load_catalog
    from meshkit.gateway.edge.profiles import load_edge_config
    from meshkit.gateway.openapi import openapi_json

    try:
        catalog = load_catalog(args.descriptor_set)
        kwargs: dict[str, Any] = {"title": args.title, "servers": args.server, "security": ()}
        if args.config:
            cfg = load_edge_config(args.config)
            prof = None
            if args.profile:
                prof = cfg.profiles.get(args.profile)
                if prof is None:
                    raise ConfigError("--profile", f"unknown profile {args.profile!r}")
            kwargs.update(cfg.openapi_options(prof))
        body = openapi_json(catalog, **kwargs)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    if args.output:
        Path(args.output).write_bytes(body + b"\n")
    else:
        sys.stdout.write(body.decode() + "\n")
    return 0


def run_edge(args: argparse.Namespace) -> int:
    """Entry point of ``meshkit edge``: 0 after a graceful stop (SIGTERM or SIGINT), 2 for a
    bad config or a port it cannot listen on."""
    from meshkit.gateway.edge.edge import create_edge_app
    from meshkit.gateway.serve._serve import http_options, run_loop

    try:
        edge = create_edge_app(args.config, args.descriptor_set)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    names = [args.profile] if args.profile else list(edge.profiles)
    if args.profile and args.profile not in edge.profiles:
        log.error("--profile: unknown profile %r; have %s", args.profile, ", ".join(edge.profiles))
        return 2
    options = http_options(args)
    return run_loop(
        _serve(edge, names, args.host, args.port, single=bool(args.profile), options=options)
    )


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before anything serves so a taken port fails the start.
    No SO_REUSEPORT: one process serves each port, and a second edge started by mistake
    on the same ports must fail rather than share them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


async def _serve(
    edge: object,
    names: list[str],
    host: str,
    port: int,
    *,
    single: bool,
    options: HttpOptions | None = None,
) -> int:
    from meshkit.gateway.edge.edge import EdgeApp
    from meshkit.gateway.serve._serve import HttpServer

    assert isinstance(edge, EdgeApp)
    apps: dict[int, Any] = {}
    shared = [n for n in names if edge.profiles[n].profile.port is None]
    for n in names:
        p = edge.profiles[n].profile.port
        if single:
            apps[p if p is not None else port] = edge.app_for(n)
        elif p is not None:
            apps[p] = edge.app_for(n)
    if shared and not single:
        apps.setdefault(port, edge.asgi())

    socks: list[tuple[socket.socket, Any]] = []
    try:
        for p, app in sorted(apps.items()):
            socks.append((_listen(host, p), app))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, p, exc)
        for sock, _ in socks:
            sock.close()
        return 2
    # One server for every port, without a lifespan of its own: one startup and one
    # shutdown for all ports (below), as they share the upstreams, whose channels must
    # stay open until the last port has drained.
    server = HttpServer(socks, options=options)

    async def reload() -> None:
        try:
            await edge.reload()
            log.info("edge reloaded")
        except Exception as exc:  # keep serving the previous configuration
            log.error("reload failed, keeping the previous configuration: %s", exc)

    seen: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        seen.append(sig)
        server.stop(force=len(seen) > 1)  # a second signal stops without draining

    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
        handled.append(signal.SIGHUP)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig)
            handled.append(sig)
    try:
        await edge.startup()
        serving = asyncio.create_task(server.serve())
        started = asyncio.create_task(server.started_event.wait())
        await asyncio.wait([serving, started], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if server.started:
            for sock, _ in socks:
                log.info("edge serving on %s:%d", host, sock.getsockname()[1])
        await serving
    finally:
        await edge.shutdown()
        for sig in handled:
            loop.remove_signal_handler(sig)
        for sock, _ in socks:
            sock.close()
    return 0
