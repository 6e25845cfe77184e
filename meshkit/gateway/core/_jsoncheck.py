"""A request's JSON checked against its message type before ``json_format`` parses it.

``json_format.ParseDict(ignore_unknown_fields=True)`` ignores more than unknown field
names: an unknown enum name is dropped, and a string where a message belongs is
iterated as if it were an object (``{"inner": "x"}`` becomes an empty ``inner``), so
a client's mistake reached the upstream as a default value with 200. Envoy answers
those 400, and so does meshkit now: :class:`JsonChecker` walks the JSON with the
descriptors, drops unknown field *names* (grpc-gateway's default; with ``strict``
they are refused), and refuses values of the wrong shape naming the field path and
the value. What it passes on is then parsed with ``ignore_unknown_fields=False``,
so every other check (numbers, oneofs, timestamps) is ``json_format``'s own.

It runs only where the fast decoder (:mod:`meshkit.gateway.core._fastjson`) declines,
which it does for every input this module refuses.
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf import descriptor_pool

from meshkit.gateway.core._fastjson import _WRAPPERS, FD, DescT, FieldT
from meshkit.gateway.core.errors import GatewayError, bad_request
from meshkit.gateway.core.metadata import decode_base64

#: Message types whose JSON is not an object of their fields: left to json_format.
_OPAQUE = {
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
}
_INTEGER = {
    FD.TYPE_INT32,
    FD.TYPE_SINT32,
    FD.TYPE_SFIXED32,
    FD.TYPE_UINT32,
    FD.TYPE_FIXED32,
    FD.TYPE_INT64,
    FD.TYPE_SINT64,
    FD.TYPE_SFIXED64,
    FD.TYPE_UINT64,
    FD.TYPE_FIXED64,
}
#: An integer as a JSON string: ``int()`` would also take ``1_000``, `` 12`` and other
#: scripts' digits, which proto3 JSON (and Envoy) do not.
INTEGER_STRING = re.compile(r"-?[0-9]+\Z")


def shown(value: Any) -> str:
    """A value as JSON for an error message: ASCII only (a lone surrogate is shown
    escaped), at most 64 characters."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 64 else text[:61] + "..."


def invalid(where: str, value: Any, why: str) -> GatewayError:
    """400 naming the field path and the value, as Envoy words it."""
    return bad_request(f"invalid value {shown(value)} for field {where}: {why}", where, why)


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (JSON's ``\\ud800``), which UTF-8, and so
    a protobuf string, cannot carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _is_null_value(et: Any) -> bool:
    return bool(et.full_name == "google.protobuf.NullValue")


class JsonChecker:
    """Checks (and, unless strict, prunes) JSON for messages of one descriptor pool."""

    def __init__(self, pool: descriptor_pool.DescriptorPool, strict: bool) -> None:
        self.pool = pool
        self.strict = strict
        self._fields: dict[str, dict[str, FieldT]] = {}

    def _fields_of(self, desc: DescT) -> dict[str, FieldT]:
        fields = self._fields.get(desc.full_name)
        if fields is None:
            fields = {}
            for fd in desc.fields:
                fields[fd.name] = fd
                fields[fd.json_name] = fd
            self._fields[desc.full_name] = fields
        return fields

    def message(self, obj: dict[str, Any], desc: DescT, path: str = "") -> dict[str, Any]:
        """A copy of ``obj`` without unknown field names (400 for one when strict), every
        value checked; ``path`` is where ``obj`` is in the request (for messages)."""
        fields = self._fields_of(desc)
        out: dict[str, Any] = {}
        for key, value in obj.items():
            where = f"{path}.{key}" if path else key
            fd = fields.get(key)
            if fd is None:
                if key.startswith("[") and self._known_extension(key, desc):
                    out[key] = value  # an extension of this message: json_format parses it
                    continue
                if self.strict:
                    raise bad_request(
                        f"unknown field {where} (not in {desc.full_name})",
                        where,
                        f"no such field in {desc.full_name}",
                    )
                continue
            out[key] = value if value is None else self._field(fd, value, where)
        return out

    def _known_extension(self, key: str, desc: DescT) -> bool:
        try:
            ext = self.pool.FindExtensionByName(key[1:-1])
        except KeyError:
            return False
        owner = ext.containing_type
        return owner is not None and bool(owner.full_name == desc.full_name)

    def _field(self, fd: FieldT, value: Any, where: str) -> Any:
        md = fd.message_type
        if md is not None and md.GetOptions().map_entry:
            if type(value) is not dict:
                raise invalid(where, value, "expected a JSON object (a map)")
            vf = md.fields_by_name["value"]
            out: dict[str, Any] = {}
            for k, v in value.items():
                at = f"{where}[{k}]"
                if has_surrogate(k):
                    raise invalid(at, k, "a map key with an unpaired surrogate")
                out[k] = v if v is None else self._value(vf, v, at)
            return out
        if fd.is_repeated:
            if type(value) is not list:
                raise invalid(where, value, "expected a JSON array")
            return [
                v if v is None else self._value(fd, v, f"{where}[{i}]") for i, v in enumerate(value)
            ]
        return self._value(fd, value, where)

    def _value(self, fd: FieldT, v: Any, where: str) -> Any:
        t = fd.type
        if t in (FD.TYPE_MESSAGE, FD.TYPE_GROUP):
            return self._message_value(fd.message_type, v, where)
        if t == FD.TYPE_STRING:
            if type(v) is not str:
                raise invalid(where, v, "expected a string")
            if has_surrogate(v):
                raise invalid(where, v, "a string with an unpaired surrogate")
        elif t == FD.TYPE_ENUM:
            # A number is json_format's to judge (open enums keep unknown numbers).
            et = fd.enum_type
            if type(v) is str and v not in et.values_by_name and not _is_null_value(et):
                raise invalid(where, v, f"not a value of enum {et.full_name}")
        elif t == FD.TYPE_BYTES:
            if type(v) is not str:
                raise invalid(where, v, "expected a base64 string")
            try:
                raw = v.encode("ascii")
            except UnicodeEncodeError:
                raw = b"!"
            if decode_base64(raw) is None:
                raise invalid(where, v, "expected base64 (standard or URL-safe alphabet)")
        elif t in _INTEGER and type(v) is str and not INTEGER_STRING.match(v):
            raise invalid(where, v, "expected an integer")
        return v

    def _message_value(self, md: DescT, v: Any, where: str) -> Any:
        full = md.full_name
        if full in _OPAQUE:
            return v
        if full in _WRAPPERS:
            return self._value(md.fields_by_name["value"], v, where)
        if type(v) is not dict:
            raise invalid(where, v, f"expected a JSON object ({full})")
        if full == "google.protobuf.Any":
            return self._any(v, where)
        return self.message(v, md, where)

    def _any(self, v: dict[str, Any], where: str) -> Any:
        url = v.get("@type")
        if type(url) is not str:
            return v  # json_format names what is missing
        try:
            md = self.pool.FindMessageTypeByName(url.rpartition("/")[2])
        except KeyError:
            return v
        if md.full_name.startswith("google.protobuf."):
            return v  # a well-known type in an Any: its JSON is under "value"
        rest = self.message({k: x for k, x in v.items() if k != "@type"}, md, where)
        return {"@type": url, **rest}
