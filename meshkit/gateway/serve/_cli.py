"""``meshkit gateway``: serve REST/JSON in front of gRPC upstreams."""

from __future__ import annotations

import argparse
import logging

from meshkit.errors import ConfigError

log = logging.getLogger("meshkit.gateway")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``gateway`` subcommand."""
    p = subparsers.add_parser(
        "gateway",
        help="REST/JSON gateway transcoding google.api.http rules to gRPC",
        description="Serve REST/JSON in front of gRPC upstreams, per their google.api.http rules.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--descriptor-set",
        metavar="FILE",
        help="FileDescriptorSet (protoc --include_imports --descriptor_set_out)",
    )
    src.add_argument(
        "--reflect",
        action="store_true",
        help="discover services from the upstreams' gRPC server reflection",
    )
    p.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="[SERVICE=]HOST:PORT",
        help="upstream target; repeat as SERVICE=HOST:PORT to split services",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="listen port (default 8080; 0 picks one)")
    p.add_argument("--config", metavar="FILE", help="gateway.yaml (gateway, upstreams, policy)")
    p.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    p.add_argument(
        "--service",
        action="append",
        dest="services",
        metavar="PKG.SERVICE",
        help="serve only these services (repeatable)",
    )
    p.add_argument(
        "--profile",
        metavar="NAME",
        help="serve one edge profile of the config's edge: section (docs/edge.md)",
    )
    p.add_argument("--proto-names", action="store_true", help="snake_case JSON names out")
    p.add_argument("--emit-unpopulated", action="store_true", help="print default-valued fields")
    p.add_argument(
        "--strict",
        action="store_true",
        help="reject unknown JSON fields and query parameters with 400",
    )
    from meshkit.gateway.serve._serve import add_http_arguments

    add_http_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``meshkit gateway``."""
    from meshkit.gateway.serve._serve import http_options
    from meshkit.gateway.serve._server import ServeSpec, options_overrides, serve

    spec = ServeSpec(
        descriptor_set=args.descriptor_set,
        reflect=args.reflect,
        upstreams=tuple(args.upstream),
        config=args.config,
        host=args.host,
        port=args.port,
        workers=max(1, args.workers),
        services=tuple(args.services) if args.services else None,
        profile=args.profile,
        overrides=options_overrides(
            proto_names=args.proto_names, emit_unpopulated=args.emit_unpopulated, strict=args.strict
        ),
        http=http_options(args),
    )
    try:
        return serve(spec)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
