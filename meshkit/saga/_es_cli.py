"""``meshkit projection``: the status of CQRS projections, and rebuilding one.

    meshkit projection status [--app MODULE:ATTR] [--nats-url URL] [--json]
    meshkit projection rebuild NAME [--app MODULE:ATTR] [--nats-url URL]

``--app`` (or ``MESHKIT_PROJECTIONS``) names a callable returning the
application's projections as ``(projection, read model store)`` pairs, e.g.
``examples.es_orders.app:projections``. A rebuild drops the read model and
replays every source from the start; a projector running elsewhere against the
same store notices (its checkpoint compare-and-set fails) and follows on.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["load_app", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    proj = subparsers.add_parser("projection", help="CQRS projections: status and rebuild")
    sub = proj.add_subparsers(dest="projection_command", metavar="SUBCOMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--app",
            default=os.environ.get("MESHKIT_PROJECTIONS", ""),
            help="MODULE:ATTR, a callable returning (projection, store) pairs "
            "(default: $MESHKIT_PROJECTIONS)",
        )
        p.add_argument(
            "--nats-url",
            default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
            help="NATS server, or a cluster's servers comma-separated "
            "(default: $NATS_URL or nats://127.0.0.1:4222)",
        )

    p = sub.add_parser("status", help="each projection's checkpoints and lag")
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda a: _run(_status, a))
    p = sub.add_parser("rebuild", help="drop a read model and replay its streams from the start")
    common(p)
    p.add_argument("name", help="the projection's name")
    p.set_defaults(func=lambda a: _run(_rebuild, a))
    proj.set_defaults(func=lambda a: (proj.print_help(sys.stderr), 2)[1])


def load_app(spec: str) -> list[tuple[Any, Any]]:
    """Import ``MODULE:ATTR`` and return its (projection, store) pairs."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--app {spec!r}: expected MODULE:ATTR")
    obj = getattr(importlib.import_module(module), attr)
    pairs: Iterable[tuple[Any, Any]] = obj() if callable(obj) else obj
    return list(pairs)


def _run(fn: Any, args: argparse.Namespace) -> int:
    if not args.app:
        print(
            "meshkit projection: --app MODULE:ATTR (or MESHKIT_PROJECTIONS) is required",
            file=sys.stderr,
        )
        return 2
    try:
        pairs = load_app(args.app)
    except (ImportError, AttributeError, ValueError) as exc:
        print(f"meshkit projection: cannot load {args.app}: {exc}", file=sys.stderr)
        return 2

    async def go() -> int:
        import nats

        from meshkit.nats import split_servers

        try:
            # A comma-separated NATS_URL names a cluster's servers; nats-py wants a list.
            nc = await asyncio.wait_for(
                nats.connect(
                    split_servers(args.nats_url), allow_reconnect=False, connect_timeout=2
                ),
                5.0,
            )
        except (TimeoutError, Exception) as exc:
            print(
                f"meshkit projection: cannot connect to {args.nats_url}: {exc!r}", file=sys.stderr
            )
            return 1
        try:
            result: int = await fn(nc, pairs, args)
            return result
        finally:
            await nc.close()

    return asyncio.run(go())


async def _status(nc: Any, pairs: list[tuple[Any, Any]], args: argparse.Namespace) -> int:
    from meshkit.saga.projections import Projector

    rows = []
    for projection, store in pairs:
        status = await Projector(nc, projection, store).status()
        rows.append(status)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": s.name,
                        "lag": s.lag,
                        "sources": [
                            {"source": x.source, "checkpoint": x.checkpoint, "pending": x.pending}
                            for x in s.sources
                        ],
                    }
                    for s in rows
                ],
                indent=1,
            )
        )
        return 0
    print(f"{'PROJECTION':<24} {'SOURCE':<32} {'CHECKPOINT':>10} {'LAG':>8}")
    for s in rows:
        for x in s.sources:
            print(f"{s.name:<24} {x.source:<32} {x.checkpoint:>10} {x.pending:>8}")
    return 0


async def _rebuild(nc: Any, pairs: list[tuple[Any, Any]], args: argparse.Namespace) -> int:
    import time

    from meshkit.saga.projections import Projector

    for projection, store in pairs:
        if projection.name == args.name:
            start = time.perf_counter()
            n = await Projector(nc, projection, store).rebuild()
            took = time.perf_counter() - start
            print(f"rebuilt {args.name}: {n} events in {took:.2f}s")
            return 0
    names = ", ".join(p.name for p, _ in pairs) or "none"
    print(f"meshkit projection: no projection {args.name!r} (known: {names})", file=sys.stderr)
    return 1
