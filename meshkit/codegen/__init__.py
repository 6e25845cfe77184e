"""``meshkit gen``: protobuf and gRPC code generation that imports cleanly.

Compiles every ``.proto`` under a root with ``grpc_tools.protoc`` and writes
``_pb2.py``, ``_pb2_grpc.py`` and ``.pyi`` stubs into an importable package,
rewriting protoc's absolute imports (``from shop.v1 import common_pb2``) so the
generated modules find each other inside that package. The well-known types
and googleapis' common protos (``google/api/annotations.proto``,
``google/rpc/status.proto``, ...) are always on the include path.

Example::

    from meshkit.codegen import generate
    result = generate("proto", out=".", package="myapp.gen",
                      descriptor_set="build/api.binpb")
"""

from meshkit.codegen._generate import (
    CodegenError,
    GenerateResult,
    generate,
    include_paths,
)

__all__ = ["CodegenError", "GenerateResult", "generate", "include_paths"]
