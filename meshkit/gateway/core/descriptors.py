"""Services, methods and message classes built from a FileDescriptorSet alone.

The gateway never imports generated code: it loads a descriptor set (from
``protoc --include_imports --descriptor_set_out`` or ``meshkit gen``, or from
the upstreams' server reflection) into a private :class:`DescriptorPool` and
builds message classes with :func:`message_factory.GetMessageClass`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, http_pb2  # registers the google.api.http extension
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from meshkit.errors import ConfigError

log = logging.getLogger("meshkit.gateway")

# Files the gateway needs in every pool so error details and Any decode.
_ALWAYS = (status_pb2, error_details_pb2, code_pb2)


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """One RPC, ready to call: names, streaming kinds, message classes and rules."""

    service: str
    name: str
    descriptor: MethodDescriptor
    input_type: type[Message]
    output_type: type[Message]
    client_streaming: bool
    server_streaming: bool
    rule: http_pb2.HttpRule | None

    @property
    def full_name(self) -> str:
        """``pkg.Service.Method``."""
        return f"{self.service}.{self.name}"

    @property
    def path(self) -> str:
        """The gRPC path, ``/pkg.Service/Method``."""
        return f"/{self.service}/{self.name}"


@dataclass(frozen=True, slots=True)
class Catalog:
    """The loaded pool and every method of every service in it."""

    pool: descriptor_pool.DescriptorPool
    methods: tuple[MethodInfo, ...]
    services: tuple[str, ...]

    def message_class(self, full_name: str) -> type[Message]:
        """The dynamic class for ``full_name`` (raises KeyError if unknown)."""
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))


def parse_descriptor_set(
    data: bytes, *, source: str = "descriptor set"
) -> descriptor_pb2.FileDescriptorSet:
    """Parse serialized FileDescriptorSet bytes; a ConfigError names the source."""
    fds = descriptor_pb2.FileDescriptorSet()
    try:
        fds.ParseFromString(data)
    except DecodeError as exc:
        raise ConfigError("", f"not a FileDescriptorSet: {exc}", source=source) from exc
    if not fds.file:
        raise ConfigError("", "the descriptor set holds no files", source=source)
    return fds


def load_descriptor_set(path: str | Path) -> descriptor_pb2.FileDescriptorSet:
    """Read and parse a descriptor set file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError("descriptor_set", f"cannot read: {exc}", source=str(p)) from exc
    return parse_descriptor_set(data, source=str(p))


def build_catalog(
    files: descriptor_pb2.FileDescriptorSet | Iterable[descriptor_pb2.FileDescriptorProto],
    *,
    services: Sequence[str] | None = None,
) -> Catalog:
    """Load files into a private pool; collect the methods of ``services`` (default: all)."""
    protos = list(files.file if isinstance(files, descriptor_pb2.FileDescriptorSet) else files)
    by_name = {f.name: f for f in protos}
    for mod in _ALWAYS:
        _add_with_deps(by_name, mod.DESCRIPTOR)
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in added:
            return
        proto = by_name.get(name)
        if proto is None:
            raise ConfigError(
                "",
                f"{chain[-1] if chain else name} imports {name!r}, which the descriptor set lacks "
                "(build it with --include_imports)",
            )
        for dep in proto.dependency:
            add(dep, (*chain, name))
        pool.Add(proto)
        added.add(name)

    for name in list(by_name):
        add(name, ())

    wanted = set(services) if services is not None else None
    methods: list[MethodInfo] = []
    found: list[str] = []
    for proto in protos:
        for svc in proto.service:
            full = f"{proto.package}.{svc.name}" if proto.package else svc.name
            if wanted is not None and full not in wanted:
                continue
            found.append(full)
            sdesc = pool.FindServiceByName(full)
            for mproto in svc.method:
                mdesc = sdesc.methods_by_name[mproto.name]
                rule: http_pb2.HttpRule | None = None
                if mproto.options.HasExtension(annotations_pb2.http):
                    rule = mproto.options.Extensions[annotations_pb2.http]
                methods.append(
                    MethodInfo(
                        service=full,
                        name=mproto.name,
                        descriptor=mdesc,
                        input_type=message_factory.GetMessageClass(mdesc.input_type),
                        output_type=message_factory.GetMessageClass(mdesc.output_type),
                        client_streaming=mproto.client_streaming,
                        server_streaming=mproto.server_streaming,
                        rule=rule,
                    )
                )
    if wanted is not None:
        missing = sorted(wanted - set(found))
        if missing:
            raise ConfigError("services", f"not in the descriptor set: {', '.join(missing)}")
    return Catalog(pool=pool, methods=tuple(methods), services=tuple(found))


def _add_with_deps(by_name: dict[str, descriptor_pb2.FileDescriptorProto], fdesc: Any) -> None:
    if fdesc.name in by_name:
        return
    for dep in fdesc.dependencies:
        _add_with_deps(by_name, dep)
    proto = descriptor_pb2.FileDescriptorProto()
    fdesc.CopyToProto(proto)
    by_name[fdesc.name] = proto


def descriptor_set_from_reflection(
    targets: Sequence[str], *, timeout: float = 10.0
) -> descriptor_pb2.FileDescriptorSet:
    """Discover services (and their HttpRules) from the targets' gRPC server reflection.

    Every file that declares a listed service is fetched with its imports; the
    reflection service itself and grpc.health are left out.
    """
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    order: list[str] = []
    for target in targets:
        _reflect_target(target, timeout, files, order)
    fds = descriptor_pb2.FileDescriptorSet()
    fds.file.extend(files[n] for n in order)
    return fds


def _reflect_target(
    target: str,
    timeout: float,
    files: dict[str, descriptor_pb2.FileDescriptorProto],
    order: list[str],
) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    skip = ("grpc.reflection.", "grpc.health.")
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        def ask(req: Any) -> Any:
            try:
                responses = list(stub.ServerReflectionInfo(iter([req]), timeout=timeout))
            except grpc.RpcError as exc:
                raise ConfigError(
                    "--reflect",
                    f"reflection on {target} failed: {exc.code().name} {exc.details()}",
                ) from None
            resp = responses[0]
            if resp.HasField("error_response"):
                raise ConfigError(
                    "--reflect", f"reflection on {target}: {resp.error_response.error_message}"
                )
            return resp

        def take(resp: Any) -> None:
            for raw in resp.file_descriptor_response.file_descriptor_proto:
                fp = descriptor_pb2.FileDescriptorProto.FromString(raw)
                if fp.name not in files:
                    files[fp.name] = fp
                    order.append(fp.name)

        listed = ask(reflection_pb2.ServerReflectionRequest(list_services=""))
        for svc in listed.list_services_response.service:
            if svc.name.startswith(skip):
                continue
            take(ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=svc.name)))
        pending = [d for f in list(files.values()) for d in f.dependency if d not in files]
        while pending:
            name = pending.pop()
            if name in files:
                continue
            take(ask(reflection_pb2.ServerReflectionRequest(file_by_filename=name)))
            if name not in files:
                raise ConfigError("--reflect", f"{target} did not return {name}")
            pending.extend(d for d in files[name].dependency if d not in files)
