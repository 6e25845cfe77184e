"""``meshkit gen``: compile protos into an importable Python package."""

from __future__ import annotations

import argparse
import sys

from meshkit.codegen._generate import CodegenError, generate


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "gen",
        help="generate _pb2, _pb2_grpc and .pyi modules (and a descriptor set) from protos",
        description="Compile every .proto under PROTO_ROOT with grpc_tools.protoc into an "
        "importable package. google/api and google/rpc protos are always on the include path.",
    )
    parser.add_argument("proto_root", metavar="PROTO_ROOT", help="root of the proto import paths")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory on sys.path")
    parser.add_argument(
        "--package", metavar="NAME", help="dotted package the modules live in (e.g. myapp.gen)"
    )
    parser.add_argument(
        "--descriptor-set", metavar="FILE", help="also write a FileDescriptorSet (for the gateway)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SUBDIR",
        help="compile only this subdirectory or file of PROTO_ROOT (repeatable)",
    )
    parser.add_argument(
        "-I", "--include", action="append", default=[], metavar="DIR", help="extra include path"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 and list stale files if output is out of date"
    )
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if inputs are unchanged"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        result = generate(
            args.proto_root,
            args.out,
            package=args.package,
            descriptor_set=args.descriptor_set,
            only=args.only,
            includes=args.include,
            check=args.check,
            force=args.force,
        )
    except CodegenError as exc:
        print(f"meshkit gen: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if result.stale:
            print(
                "meshkit gen: generated code is out of date; run the same command without "
                "--check to regenerate:",
                file=sys.stderr,
            )
            for path in result.stale:
                print(f"  {path}", file=sys.stderr)
            return 1
        print(f"meshkit gen: {len(result.files)} generated files are up to date")
        return 0
    if result.changed:
        print(
            f"meshkit gen: compiled {len(result.protos)} protos -> {result.package_dir} "
            f"({len(result.files)} files)"
            + (f", descriptors -> {result.descriptor_set}" if result.descriptor_set else "")
        )
    else:
        print(f"meshkit gen: {len(result.protos)} protos unchanged; nothing to do")
    return 0
