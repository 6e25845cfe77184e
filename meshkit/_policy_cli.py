"""``meshkit policy``: validate a policy document and show what a method gets.

``meshkit policy check mesh.yaml [...]`` exits 0 when every file is valid (printing
its warnings, such as a timeout shorter than its retries need), 1 when one is invalid
(printing the error with file, line and key path). ``--strict`` makes warnings fail
too. ``meshkit policy show mesh.yaml /shop.v1.PaymentService/Charge`` prints the
compiled policy of a method as JSON, with the rules that shaped it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from enum import Enum
from typing import Any

from meshkit.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``meshkit policy check`` and ``meshkit policy show``."""
    parser = subparsers.add_parser("policy", help="validate and inspect policy documents")
    sub = parser.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate documents and print their warnings")
    check.add_argument("files", nargs="+", help="policy documents (.yaml, .yml or .json)")
    check.add_argument("--strict", action="store_true", help="fail on warnings too")
    check.set_defaults(func=_check)
    show = sub.add_parser("show", help="print the compiled policy of methods as JSON")
    show.add_argument("file", help="a policy document")
    show.add_argument("methods", nargs="+", help="/pkg.Service/Method (or pkg.Service)")
    show.set_defaults(func=_show)


def _load(path: str) -> Any:
    from meshkit.config import Policy

    # The CLI reports warnings itself; keep the load-time log quiet.
    log = logging.getLogger("meshkit.config")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return Policy.load(path)
    finally:
        log.setLevel(level)


def _check(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            policy = _load(path)
        except ConfigError as exc:
            sys.stderr.write(f"error: {exc}\n")
            failed = True
            continue
        for warning in policy.warnings:
            sys.stderr.write(f"warning: {path}: {warning}\n")
        n = len(policy.warnings)
        counts = f"{len(policy.rules)} rules, {n} warning{'s' * (n != 1)}"
        if args.strict and n:
            # Valid, but --strict makes a warning a failure: say so, or exit 1 looks odd.
            sys.stderr.write(f"{path}: failed with --strict ({counts}; warnings fail)\n")
            failed = True
        else:
            sys.stdout.write(f"{path}: ok ({counts})\n")
    return 1 if failed else 0


def _show(args: argparse.Namespace) -> int:
    try:
        policy = _load(args.file)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    out = {m: to_jsonable(policy.for_method(m)) for m in args.methods}
    sys.stdout.write(json.dumps(out, indent=2, sort_keys=False) + "\n")
    return 0


def to_jsonable(value: Any) -> Any:
    """A compiled policy value as plain JSON data (sets sorted, enums by value)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, frozenset | set):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    return value
