"""OpenAPI 3.1 from descriptors and ``google.api.http`` rules.

The document describes exactly what the gateway serves: each binding is
compiled with the gateway's own :func:`~meshkit.gateway.core.transcoding.compile_binding`
(so paths, bodies and query parameters agree with the transcoder), and schemas
follow the canonical proto3 JSON mapping (int64 as strings, enums by name,
well-known types in their JSON forms). Every operation documents the
``google.rpc.Status`` error body, and the security schemes (bearer JWT, API
key) the edge enforces.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from meshkit.gateway.core.descriptors import Catalog, MethodInfo
from meshkit.gateway.core.httprule import DEEP, WILD
from meshkit.gateway.core.transcoding import Binding, HttpRuleError, compile_binding, rule_bindings

FD = FieldDescriptor
_REF = "#/components/schemas/"
_INT64 = {FD.TYPE_INT64, FD.TYPE_UINT64, FD.TYPE_SINT64, FD.TYPE_FIXED64, FD.TYPE_SFIXED64}
_INT32 = {FD.TYPE_INT32, FD.TYPE_UINT32, FD.TYPE_SINT32, FD.TYPE_FIXED32, FD.TYPE_SFIXED32}
_WKT: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string", "description": "comma-separated field paths"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
    "google.protobuf.DoubleValue": {"type": ["number", "null"]},
    "google.protobuf.FloatValue": {"type": ["number", "null"]},
    "google.protobuf.Int64Value": {"type": ["string", "null"], "format": "int64"},
    "google.protobuf.UInt64Value": {"type": ["string", "null"], "format": "uint64"},
    "google.protobuf.Int32Value": {"type": ["integer", "null"], "format": "int32"},
    "google.protobuf.UInt32Value": {"type": ["integer", "null"], "format": "uint32"},
    "google.protobuf.BoolValue": {"type": ["boolean", "null"]},
    "google.protobuf.StringValue": {"type": ["string", "null"]},
    "google.protobuf.BytesValue": {"type": ["string", "null"], "contentEncoding": "base64"},
    "google.api.HttpBody": {"type": "string", "format": "binary"},
}
_STATUS = {
    "type": "object",
    "description": "google.rpc.Status: every error the gateway returns has this shape.",
    "properties": {
        "code": {"type": "integer", "format": "int32", "description": "google.rpc.Code number"},
        "message": {"type": "string"},
        "details": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"@type": {"type": "string"}},
                "additionalProperties": True,
            },
        },
    },
    "required": ["code", "message"],
}

#: The operations an OpenAPI 3.1 path item can hold.
_OPENAPI_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


class _Schemas:
    def __init__(self, proto_names: bool) -> None:
        self.proto_names = proto_names
        self.defs: dict[str, Any] = {"google.rpc.Status": _STATUS}

    def name(self, fd: FieldDescriptor) -> str:
        return fd.name if self.proto_names else fd.json_name

    def ref(self, desc: Any) -> dict[str, Any]:
        full = desc.full_name
        if full in _WKT:
            return dict(_WKT[full])
        if full not in self.defs:
            self.defs[full] = {}  # placeholder first: recursive messages terminate
            self.defs[full] = self._message(desc)
        return {"$ref": _REF + full}

    def enum(self, ed: Any) -> dict[str, Any]:
        full = ed.full_name
        if full not in self.defs:
            self.defs[full] = {"type": "string", "enum": [v.name for v in ed.values]}
        return {"$ref": _REF + full}

    def scalar(self, fd: FieldDescriptor) -> dict[str, Any]:
        t = fd.type
        if t == FD.TYPE_MESSAGE:
            return self.ref(fd.message_type)
        if t == FD.TYPE_ENUM:
            return self.enum(fd.enum_type)
        if t == FD.TYPE_STRING:
            return {"type": "string"}
        if t == FD.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64"}
        if t == FD.TYPE_BOOL:
            return {"type": "boolean"}
        if t in _INT64:
            return {
                "type": "string",
                "format": "uint64" if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64) else "int64",
            }
        if t in _INT32:
            return {"type": "integer", "format": "int32"}
        return {"type": "number", "format": "double" if t == FD.TYPE_DOUBLE else "float"}

    def field(self, fd: FieldDescriptor) -> dict[str, Any]:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.scalar(value_fd)}
        if fd.is_repeated:
            return {"type": "array", "items": self.scalar(fd)}
        return self.scalar(fd)

    def _message(self, desc: Any, skip: Sequence[str] = ()) -> dict[str, Any]:
        props = {self.name(f): self.field(f) for f in desc.fields if f.name not in skip}
        return {"type": "object", "properties": props}


def _openapi_path(b: Binding) -> tuple[str, list[tuple[str, str | None]]]:
    """The templated path and its parameters (name, pattern for multi-segment captures)."""
    t = b.template
    segs = list(t.segments)
    out: list[str] = []
    params: list[tuple[str, str | None]] = []
    i = 0
    var_at = {v.start: v for v in t.variables}
    wild = 0
    while i < len(segs):
        v = var_at.get(i)
        if v is not None:
            name = ".".join(v.field_path)
            end = v.end if v.end is not None else len(segs)
            captured = segs[i:end]
            pattern = None
            if captured != [WILD]:
                parts = ["[^/]+" if s == WILD else ".+" if s == DEEP else s for s in captured]
                pattern = "^" + "/".join(parts) + "$"
            out.append("{" + name + "}")
            params.append((name, pattern))
            i = end
            continue
        s = segs[i]
        if s in (WILD, DEEP):
            name = f"_segment{wild}"
            wild += 1
            out.append("{" + name + "}")
            params.append((name, None if s == WILD else "^.+$"))
        else:
            out.append(s)
        i += 1
    path = "/" + "/".join(out)
    if t.verb:
        path += ":" + t.verb
    return path, params


def _query_params(
    schemas: _Schemas,
    desc: Any,
    bound: Iterable[tuple[str, ...]],
    prefix: tuple[str, ...] = (),
    depth: int = 0,
    names: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    bound = list(bound)
    for f in desc.fields:
        path = (*prefix, f.name)
        if any(path[: len(bp)] == bp for bp in bound):
            continue
        is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
        if is_map:
            continue
        if f.type == FD.TYPE_MESSAGE and f.message_type.full_name not in _WKT:
            if depth < 3 and not f.is_repeated:
                out.extend(
                    _query_params(
                        schemas, f.message_type, bound, path, depth + 1, (*names, schemas.name(f))
                    )
                )
            continue
        schema = schemas.field(f)
        qname = ".".join((*names, schemas.name(f)))
        param: dict[str, Any] = {"name": qname, "in": "query", "required": False, "schema": schema}
        if f.is_repeated:
            param["explode"] = True
        out.append(param)
    return out


def _bindings(m: MethodInfo, fallback: str) -> list[Binding]:
    specs: list[tuple[str, str, str, str, bool]] = []
    if m.rule is not None:
        specs.extend((*x, False) for x in rule_bindings(m.rule))
    if fallback == "all" or (fallback == "unannotated" and m.rule is None):
        specs.append(("POST", f"/{m.service}/{m.name}", "*", "", True))
    out = []
    for hm, tpl, body, rbody, fb in specs:
        try:
            out.append(compile_binding(m, hm, tpl, body, rbody, fallback=fb))
        except HttpRuleError:
            continue  # the gateway reports these at load; the document leaves them out
    return out


def generate_openapi(
    catalog: Catalog,
    *,
    title: str = "meshkit gateway",
    version: str = "1.0.0",
    servers: Sequence[str] = (),
    proto_names: bool = False,
    fallback_routes: str = "unannotated",
    security: Sequence[str] = ("bearer", "api_key"),
    api_key_header: str = "x-api-key",
    path_prefix: str = "",
) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a dict) for every routable method in ``catalog``."""
    schemas = _Schemas(proto_names)
    paths: dict[str, dict[str, Any]] = {}
    error_resp = {
        "description": "An error: google.rpc.Status",
        "content": {"application/json": {"schema": {"$ref": _REF + "google.rpc.Status"}}},
    }
    for m in catalog.methods:
        for n, b in enumerate(_bindings(m, fallback_routes)):
            path, path_params = _openapi_path(b)
            op: dict[str, Any] = {
                "operationId": f"{m.service.replace('.', '_')}_{m.name}" + (f"_{n}" if n else ""),
                "tags": [m.service],
                "summary": f"{m.full_name}",
            }
            params: list[dict[str, Any]] = []
            for name, pattern in path_params:
                sch: dict[str, Any] = {"type": "string"}
                if pattern:
                    sch["pattern"] = pattern
                params.append({"name": name, "in": "path", "required": True, "schema": sch})
            in_desc = m.input_type.DESCRIPTOR
            if b.body != "*":
                params.extend(_query_params(schemas, in_desc, b.bound_prefixes))
            if params:
                op["parameters"] = params
            if b.body:
                if b.body == "*":
                    skip = [bp[0] for bp in b.bound_prefixes if len(bp) == 1]
                    if skip and in_desc.full_name not in _WKT:
                        body_schema: dict[str, Any] = schemas._message(in_desc, skip)
                    else:
                        body_schema = schemas.ref(in_desc)
                else:
                    assert b.body_field is not None
                    body_schema = schemas.field(b.body_field)
                ctype = (
                    "application/octet-stream"
                    if b.http_body_request
                    else ("application/x-ndjson" if m.client_streaming else "application/json")
                )
                op["requestBody"] = {"required": True, "content": {ctype: {"schema": body_schema}}}
            out_schema = (
                schemas.field(b.response_field)
                if b.response_field is not None
                else schemas.ref(m.output_type.DESCRIPTOR)
            )
            if m.server_streaming:
                content = {
                    "application/x-ndjson": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "result": out_schema,
                                "error": {"$ref": _REF + "google.rpc.Status"},
                            },
                        }
                    },
                    "text/event-stream": {"schema": {"type": "string"}},
                }
            elif b.http_body_response:
                content = {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                }
            else:
                content = {"application/json": {"schema": out_schema}}
            op["responses"] = {
                "200": {"description": "OK", "content": content},
                "default": error_resp,
            }
            verb = b.http_method.lower()
            if verb not in _OPENAPI_METHODS:
                # HttpRule ``custom`` kinds (LOCK, PURGE...) have no OpenAPI operation
                # field; an extension keeps them in the document and valid.
                verb = f"x-http-method-{verb}"
            paths.setdefault(path_prefix + path, {})[verb] = op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": {k: schemas.defs[k] for k in sorted(schemas.defs)}},
    }
    if servers:
        doc["servers"] = [{"url": s} for s in servers]
    sec: dict[str, Any] = {}
    if "bearer" in security:
        sec["bearerAuth"] = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    if "api_key" in security:
        sec["apiKey"] = {"type": "apiKey", "in": "header", "name": api_key_header}
    if sec:
        doc["components"]["securitySchemes"] = sec
        doc["security"] = [{k: []} for k in sec] + [{}]
    return doc


def openapi_json(catalog: Catalog, **kwargs: Any) -> bytes:
    """:func:`generate_openapi` serialized."""
    return json.dumps(generate_openapi(catalog, **kwargs), indent=1, sort_keys=False).encode()
