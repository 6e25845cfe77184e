"""HTTP request -> request message, response message -> HTTP body.

Everything descriptor-related is resolved at load into small closures
(:class:`FieldSetter`), so a request only runs precomputed setters: the body
first, then query parameters, then path variables (path values win).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from google.api import http_pb2
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message import Message

from meshkit.gateway.core._fastjson import _WRAPPERS, FD, Decoder, DescT, Encoder, Fallback, FieldT
from meshkit.gateway.core._jsoncheck import JsonChecker
from meshkit.gateway.core.config import GatewayOptions
from meshkit.gateway.core.descriptors import MethodInfo
from meshkit.gateway.core.errors import bad_request
from meshkit.gateway.core.httprule import PathTemplate, TemplateError, parse_template

_STRING_WKT = {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
_WKT = (
    _WRAPPERS
    | _STRING_WKT
    | {
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
        "google.protobuf.Any",
        "google.protobuf.Empty",
    }
)
HTTP_BODY = "google.api.HttpBody"

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_TRUE = {"true", "1", "t"}
_FALSE = {"false", "0", "f"}


class HttpRuleError(ValueError):
    """An HttpRule that cannot be served, named by method and template."""

    def __init__(self, method: str, template: str, message: str) -> None:
        super().__init__(f"{method}: {template}: {message}")
        self.method = method
        self.template = template


# --------------------------------------------------------------------------- values


def _scalar_converter(fd: FieldT) -> Callable[[str], Any]:
    t = fd.type
    if t == FD.TYPE_STRING:
        return lambda s: s
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]

        def to_int(s: str) -> int:
            try:
                v = int(s, 10)
            except ValueError:
                raise ValueError(f"expected an integer, got {s!r}") from None
            if not lo <= v <= hi:
                raise ValueError(f"{s} is out of range")
            return v

        return to_int
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):

        def to_float(s: str) -> float:
            try:
                return float(s)
            except ValueError:
                raise ValueError(f"expected a number, got {s!r}") from None

        return to_float
    if t == FD.TYPE_BOOL:

        def to_bool(s: str) -> bool:
            low = s.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"expected true or false, got {s!r}")

        return to_bool
    if t == FD.TYPE_BYTES:

        def to_bytes(s: str) -> bytes:
            padded = s + "=" * (-len(s) % 4)
            try:
                if "-" in s or "_" in s:
                    return base64.urlsafe_b64decode(padded)
                return base64.b64decode(padded, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"expected base64, got {s!r}") from None

        return to_bytes
    if t == FD.TYPE_ENUM:
        values = fd.enum_type.values_by_name
        numbers = {v.number for v in fd.enum_type.values}

        def to_enum(s: str) -> int:
            v = values.get(s)
            if v is not None:
                return int(v.number)
            try:
                n = int(s)
            except ValueError:
                raise ValueError(f"{s!r} is not a value of {fd.enum_type.full_name}") from None
            if n not in numbers and fd.enum_type.is_closed:
                raise ValueError(f"{n} is not a value of {fd.enum_type.full_name}")
            return n

        return to_enum
    raise TypeError(f"not a scalar field: {fd.full_name}")


ValueSetter = Callable[[Message, Sequence[str]], None]


def _field_setter(fd: FieldT) -> ValueSetter:
    """A setter for the last field of a path: converts strings and assigns."""
    name = fd.name
    repeated = fd.is_repeated
    if fd.type == FD.TYPE_MESSAGE:
        if fd.message_type.GetOptions().map_entry:
            raise TypeError("map fields cannot be set from a path or query")
        full = fd.message_type.full_name
        if full in _WRAPPERS:
            inner = _scalar_converter(fd.message_type.fields_by_name["value"])
            if repeated:
                raise TypeError("repeated wrappers cannot be set from a path or query")

            def set_wrapper(msg: Message, values: Sequence[str]) -> None:
                getattr(msg, name).value = inner(values[-1])

            return set_wrapper
        if full in _STRING_WKT:

            def set_wkt(msg: Message, values: Sequence[str]) -> None:
                target = getattr(msg, name)
                if repeated:
                    for v in values:
                        target.add().FromJsonString(v)
                else:
                    target.Clear()
                    target.FromJsonString(
                        ",".join(values) if full.endswith("FieldMask") else values[-1]
                    )

            return set_wkt
        raise TypeError(f"message field {fd.full_name} ({full}) cannot be set from a path or query")
    conv = _scalar_converter(fd)
    if repeated:

        def set_repeated(msg: Message, values: Sequence[str]) -> None:
            getattr(msg, name).extend(conv(v) for v in values)

        return set_repeated

    def set_scalar(msg: Message, values: Sequence[str]) -> None:
        setattr(msg, name, conv(values[-1]))

    return set_scalar


@dataclass(frozen=True, slots=True)
class FieldSetter:
    """A compiled dotted field path: walk to the parent message, then set."""

    display: str
    parents: tuple[str, ...]
    setter: ValueSetter

    def __call__(self, msg: Message, values: Sequence[str]) -> None:
        for p in self.parents:
            msg = getattr(msg, p)
        try:
            self.setter(msg, values)
        except (ValueError, TypeError) as exc:
            raise bad_request(f"invalid value for {self.display}: {exc}", self.display) from None


def _lookup(desc: DescT, part: str) -> FieldT | None:
    fd = desc.fields_by_name.get(part)
    if fd is None:
        fd = desc.fields_by_camelcase_name.get(part)
        if fd is None:
            for f in desc.fields:
                if f.json_name == part:
                    return f
    return fd


def resolve_path(desc: DescT, parts: Sequence[str]) -> list[FieldT]:
    """Resolve a dotted path (proto or JSON names); raise KeyError naming the bad part."""
    out: list[FieldT] = []
    cur: DescT | None = desc
    for i, part in enumerate(parts):
        if cur is None:
            raise KeyError(f"{'.'.join(parts[:i])} is not a message")
        fd = _lookup(cur, part)
        if fd is None:
            raise KeyError(f"{cur.full_name} has no field {part!r}")
        out.append(fd)
        if i < len(parts) - 1:
            if fd.type != FD.TYPE_MESSAGE or fd.is_repeated:
                raise KeyError(f"{'.'.join(parts[: i + 1])} is not a singular message")
            cur = fd.message_type if fd.message_type.full_name not in _WKT else None
    return out


def compile_setter(desc: DescT, parts: Sequence[str]) -> FieldSetter:
    """Compile a dotted path into a :class:`FieldSetter` (KeyError/TypeError if impossible)."""
    fds = resolve_path(desc, parts)
    return FieldSetter(".".join(parts), tuple(f.name for f in fds[:-1]), _field_setter(fds[-1]))


# --------------------------------------------------------------------------- JSON


class JsonCodec:
    """Canonical proto3 JSON in and out, per the gateway's options."""

    def __init__(self, pool: descriptor_pool.DescriptorPool, options: GatewayOptions) -> None:
        self.pool = pool
        self.ignore_unknown = not options.strict
        self.proto_names = options.proto_names
        self.emit_unpopulated = options.emit_unpopulated
        self.max_depth = options.max_json_depth
        self._dumps = _compact_dumps()
        self._encoder = None if options.emit_unpopulated else Encoder(options.proto_names, pool)
        self._decoder = Decoder(self.ignore_unknown)
        self._checker = JsonChecker(pool, strict=options.strict)

    def loads(self, data: bytes) -> Any:
        """Parse JSON bytes; raise a 400 GatewayError for bad JSON or deep nesting."""
        try:
            obj = json.loads(data.decode("utf-8"))
        except RecursionError:
            raise bad_request(f"JSON nested deeper than {self.max_depth} levels") from None
        except UnicodeDecodeError:
            raise bad_request("request body is not valid UTF-8") from None
        except ValueError as exc:
            raise bad_request(f"malformed JSON: {exc}") from None
        if data.count(b"[") + data.count(b"{") > self.max_depth:
            check_depth(obj, self.max_depth)
        return obj

    def merge(self, obj: Any, msg: Message, where: str = "body") -> None:
        """Merge a parsed JSON value into a fresh ``msg``; 400 on type errors."""
        if type(obj) is dict:
            try:
                self._decoder.merge(obj, msg)
                return
            except (Fallback, ValueError, TypeError):
                # Declined, or a value protobuf refused on assignment (a lone surrogate):
                # the reference path decides, so both paths answer alike.
                msg.Clear()
            except RecursionError:
                raise bad_request(f"JSON nested deeper than {self.max_depth} levels") from None
        self.merge_reference(obj, msg, where)

    def merge_reference(self, obj: Any, msg: Message, where: str = "body") -> None:
        """:meth:`merge` without the fast path: the JSON checked against the descriptors
        (unknown names dropped unless strict, wrong-shaped values refused naming the field),
        then ``json_format`` with no leniency left."""
        try:
            if type(obj) is dict:
                obj = self._checker.message(obj, msg.DESCRIPTOR)
            json_format.ParseDict(
                obj,
                msg,
                ignore_unknown_fields=False,
                descriptor_pool=self.pool,
                max_recursion_depth=self.max_depth,
            )
        except json_format.ParseError as exc:
            raise bad_request(f"invalid {where}: {exc}", where) from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise bad_request(f"invalid {where}: {exc}", where) from None
        except RecursionError:
            raise bad_request(f"JSON nested deeper than {self.max_depth} levels") from None

    def to_obj(self, msg: Message) -> Any:
        """``msg`` as a JSON-ready value."""
        if self._encoder is not None:
            return self._encoder.encode(msg)
        return json_format.MessageToDict(
            msg,
            always_print_fields_with_no_presence=self.emit_unpopulated,
            preserving_proto_field_name=self.proto_names,
            descriptor_pool=self.pool,
        )

    def dumps(self, obj: Any) -> bytes:
        """Compact UTF-8 JSON."""
        return self._dumps(obj).encode()

    def field_name(self, fd: FieldT) -> str:
        """The output name of a field."""
        return str(fd.name if self.proto_names else fd.json_name)


def _compact_dumps() -> Callable[[Any], str]:
    """``JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode`` without its
    per-call setup (a fresh C encoder and circular-reference dict each time): the
    values are built from messages, which cannot be circular."""
    ref = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
    c_make = getattr(json.encoder, "c_make_encoder", None)
    c_str = getattr(json.encoder, "c_encode_basestring", None)
    if c_make is None or c_str is None:  # pragma: no cover - no C accelerator
        return ref.encode
    enc = c_make(None, ref.default, c_str, None, ":", ",", False, False, True)

    def dumps(obj: Any) -> str:
        if type(obj) is str:
            return ref.encode(obj)
        return "".join(enc(obj, 0))

    return dumps


def check_depth(obj: Any, limit: int) -> None:
    """400 when ``obj`` nests arrays/objects deeper than ``limit``."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        cur, depth = stack.pop()
        if depth > limit:
            raise bad_request(f"JSON nested deeper than {limit} levels")
        if isinstance(cur, dict):
            stack.extend((v, depth + 1) for v in cur.values() if isinstance(v, dict | list))
        elif isinstance(cur, list):
            stack.extend((v, depth + 1) for v in cur if isinstance(v, dict | list))


# --------------------------------------------------------------------------- bindings


@dataclass(slots=True)
class Binding:
    """One (HTTP method, template) of a method's HttpRule, compiled."""

    method: MethodInfo
    http_method: str
    template: PathTemplate
    body: str
    response_body: str
    path_setters: tuple[FieldSetter, ...]
    body_field: FieldT | None
    response_field: FieldT | None
    mask_field: FieldT | None
    bound_prefixes: tuple[tuple[str, ...], ...]
    query_cache: dict[str, FieldSetter | None] = field(default_factory=dict)
    http_body_request: bool = False
    http_body_response: bool = False
    fallback: bool = False

    @property
    def name(self) -> str:
        """``pkg.Service.Method``."""
        return self.method.full_name

    def __str__(self) -> str:
        return f"{self.http_method} {self.template.source} -> {self.method.full_name}"


def rule_bindings(rule: http_pb2.HttpRule) -> list[tuple[str, str, str, str]]:
    """(HTTP method, template, body, response_body) for a rule and its additional bindings."""
    out: list[tuple[str, str, str, str]] = []
    for r in (rule, *rule.additional_bindings):
        kind = r.WhichOneof("pattern")
        if kind is None:
            continue
        if kind == "custom":
            out.append((r.custom.kind.upper(), r.custom.path, r.body, r.response_body))
        else:
            out.append((kind.upper(), getattr(r, kind), r.body, r.response_body))
    return out


def compile_binding(
    method: MethodInfo,
    http_method: str,
    template_text: str,
    body: str,
    response_body: str,
    *,
    fallback: bool = False,
) -> Binding:
    """Validate one binding against the method's messages; raise :class:`HttpRuleError`."""
    name = method.full_name
    try:
        template = parse_template(template_text)
    except TemplateError as exc:
        raise HttpRuleError(name, template_text, str(exc)) from None
    if not http_method or not http_method.isalpha():
        raise HttpRuleError(name, template_text, f"bad HTTP method {http_method!r}")
    in_desc: DescT = method.input_type.DESCRIPTOR
    out_desc: DescT = method.output_type.DESCRIPTOR
    setters: list[FieldSetter] = []
    for var in template.variables:
        try:
            fds = resolve_path(in_desc, var.field_path)
        except KeyError as exc:
            raise HttpRuleError(name, template_text, f"path variable: {exc.args[0]}") from None
        last = fds[-1]
        if last.is_repeated:
            raise HttpRuleError(name, template_text, f"path variable {last.name!r} is repeated")
        try:
            setters.append(compile_setter(in_desc, var.field_path))
        except TypeError as exc:
            raise HttpRuleError(name, template_text, f"path variable: {exc}") from None
    body_field: FieldT | None = None
    if body and body != "*":
        body_field = in_desc.fields_by_name.get(body)
        if body_field is None:
            raise HttpRuleError(
                name, template_text, f"body field {body!r} not in {in_desc.full_name}"
            )
    response_field: FieldT | None = None
    if response_body:
        response_field = out_desc.fields_by_name.get(response_body)
        if response_field is None:
            raise HttpRuleError(
                name,
                template_text,
                f"response_body field {response_body!r} not in {out_desc.full_name}",
            )
    mask_field: FieldT | None = None
    if http_method == "PATCH" and body_field is not None and body_field.type == FD.TYPE_MESSAGE:
        for f in in_desc.fields:
            if (
                f.type == FD.TYPE_MESSAGE
                and f.message_type.full_name == "google.protobuf.FieldMask"
            ):
                mask_field = f
                break
    bound = [tuple(f.name for f in resolve_path(in_desc, v.field_path)) for v in template.variables]
    if body_field is not None:
        bound.append((body_field.name,))
    return Binding(
        method=method,
        http_method=http_method,
        template=template,
        body=body,
        response_body=response_body,
        path_setters=tuple(setters),
        body_field=body_field,
        response_field=response_field,
        mask_field=mask_field,
        bound_prefixes=tuple(bound),
        http_body_request=(body == "*" and in_desc.full_name == HTTP_BODY)
        or (
            body_field is not None
            and body_field.type == FD.TYPE_MESSAGE
            and body_field.message_type.full_name == HTTP_BODY
        ),
        http_body_response=(not response_body and out_desc.full_name == HTTP_BODY)
        or (
            response_field is not None
            and response_field.type == FD.TYPE_MESSAGE
            and response_field.message_type.full_name == HTTP_BODY
        ),
        fallback=fallback,
    )


class Transcoder:
    """Builds request messages and response bodies for bindings."""

    def __init__(self, codec: JsonCodec, options: GatewayOptions) -> None:
        self.codec = codec
        self.strict = options.strict

    # ---- request

    def query_setter(self, b: Binding, key: str) -> FieldSetter | None:
        """The setter for a query key, or None if the key is ignored (cached per binding)."""
        try:
            return b.query_cache[key]
        except KeyError:
            pass
        setter: FieldSetter | None = None
        parts = key.split(".")
        try:
            fds = resolve_path(b.method.input_type.DESCRIPTOR, parts)
        except KeyError as exc:
            if self.strict:
                raise bad_request(f"unknown query parameter {key!r}: {exc.args[0]}", key) from None
        else:
            names = tuple(f.name for f in fds)
            if not any(names[: len(p)] == p for p in b.bound_prefixes) and b.body != "*":
                try:
                    setter = compile_setter(b.method.input_type.DESCRIPTOR, parts)
                except TypeError as exc:
                    raise bad_request(f"query parameter {key!r}: {exc}", key) from None
        if len(b.query_cache) < 1024:
            b.query_cache[key] = setter
        return setter

    def apply_query(self, b: Binding, msg: Message, query: bytes) -> None:
        """Set fields from the query string (repeated keys accumulate)."""
        try:
            text = query.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("query string is not valid UTF-8") from None
        pairs: list[tuple[str, str]]
        if "%" not in text and "+" not in text:
            # The common case needs no unquoting: split by hand, as parse_qsl would.
            pairs = [
                (k, v) for k, _, v in (part.partition("=") for part in text.split("&") if part)
            ]
        else:
            try:
                pairs = parse_qsl(text, keep_blank_values=True, errors="strict", encoding="utf-8")
            except UnicodeDecodeError:
                raise bad_request("query string is not valid UTF-8") from None
            except ValueError as exc:
                raise bad_request(f"malformed query string: {exc}") from None
        grouped: dict[str, list[str]] = {}
        for k, v in pairs:
            grouped.setdefault(k, []).append(v)
        for k, values in grouped.items():
            setter = self.query_setter(b, k)
            if setter is not None:
                setter(msg, values)

    def apply_body(self, b: Binding, msg: Message, body: bytes, content_type: str) -> Any:
        """Merge the request body per ``b.body``; returns the parsed JSON (for FieldMask fill)."""
        if b.http_body_request:
            target: Any = msg if b.body_field is None else getattr(msg, b.body_field.name)
            target.content_type = content_type
            target.data = body
            return None
        if not body.strip():
            return None
        obj = self.codec.loads(body)
        if b.body_field is None:
            if not isinstance(obj, dict):
                raise bad_request(
                    f"request body must be a JSON object, got {type(obj).__name__}", "body"
                )
            self.codec.merge(obj, msg)
        else:
            fd = b.body_field
            self.codec.merge({fd.name: obj}, msg, fd.name)
        return obj

    def fill_mask(self, b: Binding, msg: Message, obj: Any) -> None:
        """PATCH: when no FieldMask was sent, derive it from the JSON keys of the body."""
        fd = b.mask_field
        if fd is None or b.body_field is None or not isinstance(obj, dict):
            return
        if msg.HasField(fd.name):
            return
        paths: list[str] = []
        _mask_paths(b.body_field.message_type, obj, "", paths)
        getattr(msg, fd.name).paths.extend(paths)

    def build(
        self,
        b: Binding,
        raw_body: bytes,
        content_type: str,
        query: bytes,
        path_values: Sequence[str],
    ) -> Message:
        """The whole request message for a unary call."""
        msg = b.method.input_type()
        obj = None
        if b.body:
            obj = self.apply_body(b, msg, raw_body, content_type)
        if query and b.body != "*":
            self.apply_query(b, msg, query)
        for setter, value in zip(b.path_setters, path_values, strict=True):
            setter(msg, (value,))
        if obj is not None and b.mask_field is not None:
            self.fill_mask(b, msg, obj)
        return msg

    def build_streamed(
        self, b: Binding, data: bytes, query: bytes, path_values: Sequence[str]
    ) -> Message:
        """One message of a request stream (an NDJSON line or a WebSocket frame).

        The JSON is the whole message unless the rule names a body field; query
        and path variables of the request URL apply to every message.
        """
        msg = b.method.input_type()
        if data.strip():
            obj = self.codec.loads(data)
            if b.body_field is not None:
                self.codec.merge({b.body_field.name: obj}, msg, b.body_field.name)
            elif isinstance(obj, dict):
                self.codec.merge(obj, msg)
            else:
                raise bad_request(
                    f"a stream message must be a JSON object, got {type(obj).__name__}"
                )
        if query and b.body != "*":
            self.apply_query(b, msg, query)
        for setter, value in zip(b.path_setters, path_values, strict=True):
            setter(msg, (value,))
        return msg

    # ---- response

    def response_obj(self, b: Binding, msg: Message) -> Any:
        """The JSON value of a response (whole message or ``response_body`` field)."""
        rf = b.response_field
        if rf is None:
            return self.codec.to_obj(msg)
        whole = self.codec.to_obj(msg)
        key = self.codec.field_name(rf)
        if key in whole:
            return whole[key]
        if rf.is_repeated:
            return (
                {} if rf.message_type is not None and rf.message_type.GetOptions().map_entry else []
            )
        if rf.type == FD.TYPE_MESSAGE:
            return {}
        return json_format.MessageToDict(
            msg,
            always_print_fields_with_no_presence=True,
            preserving_proto_field_name=self.codec.proto_names,
        ).get(key)

    def response_body(self, b: Binding, msg: Message) -> tuple[bytes, bytes]:
        """(content type, body bytes) of a unary response."""
        if b.http_body_response:
            hb: Any = msg if b.response_field is None else getattr(msg, b.response_field.name)
            return (hb.content_type or "application/octet-stream").encode(), hb.data
        return b"application/json", self.codec.dumps(self.response_obj(b, msg))


def _mask_paths(desc: DescT, obj: Mapping[str, Any], prefix: str, out: list[str]) -> None:
    for key, value in obj.items():
        fd = _lookup(desc, key)
        if fd is None:
            continue
        path = prefix + fd.name
        if (
            fd.type == FD.TYPE_MESSAGE
            and not fd.is_repeated
            and fd.message_type.full_name not in _WKT
            and isinstance(value, dict)
            and value
        ):
            _mask_paths(fd.message_type, value, path + ".", out)
        else:
            out.append(path)
