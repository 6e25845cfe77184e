"""The ``meshkit`` command.

Each area registers its own subcommands (``meshkit.<area>._cli.register``), so
this module stays a thin dispatcher.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

_COMMAND_MODULES: tuple[str, ...] = (
    "meshkit.codegen._cli",
    "meshkit.nats._cli",
    "meshkit.saga._cli",
    "meshkit.saga._es_cli",
    "meshkit.gateway.serve._cli",
    "meshkit.gateway.serve._edge_cli",
    "meshkit._policy_cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the full ``meshkit`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="meshkit",
        description="Service-mesh resilience and edge features for Python gRPC services.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``meshkit`` command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
