"""Precompiled proto3 JSON conversion for the hot path.

``json_format`` walks descriptors on every call; here each message type is
compiled once into per-field converters. Output is identical to
``json_format.MessageToDict`` (property-tested). Input handles the common,
unambiguous shapes; anything else (a type mismatch, a oneof given twice, a
special value) raises :class:`Fallback`, and the caller re-parses with
``json_format`` so errors and edge cases behave exactly like the reference.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message

FD = FieldDescriptor
_DECIMAL = re.compile(r"-?[0-9]+\Z")
# Descriptor objects are typed loosely: the upb and pure-Python classes differ in the stubs.
DescT = Any
FieldT = Any
_INT64 = {FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64, FD.TYPE_UINT64, FD.TYPE_FIXED64}
_INT32 = {FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32, FD.TYPE_UINT32, FD.TYPE_FIXED32}
_WRAPPERS = {
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
}


class Fallback(Exception):
    """The fast path declines; use json_format."""


def _exactly(kind: type) -> Callable[[Any], Any]:
    """A converter passing values of exactly ``kind`` through (bool is not an int here)."""

    def conv(v: Any) -> Any:
        if type(v) is not kind:
            raise Fallback
        return v

    return conv


Enc = Callable[[Any], Any]


def _float_out(v: float) -> Any:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def _float32_out(v: float) -> Any:
    if math.isnan(v) or math.isinf(v):
        return _float_out(v)
    return type_checkers.ToShortestFloat(v)


def _timestamp_out(v: Any) -> str:
    seconds, nanos = v.seconds, v.nanos
    if seconds < 0 or seconds > 253402300799 or not 0 <= nanos < 1_000_000_000:
        return str(v.ToJsonString())  # rare or invalid: the reference formats (or raises)
    # C formatting, twice as fast as an f-string of six fields; %Y is four digits here
    # because the range check above keeps the year within 1970..9999.
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if nanos == 0:
        return base + "Z"
    if nanos % 1_000_000 == 0:
        return f"{base}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{base}.{nanos // 1_000:06d}Z"
    return f"{base}.{nanos:09d}Z"


def _b64(v: bytes) -> str:
    return base64.b64encode(v).decode("ascii")


class Encoder:
    """Message -> JSON-ready dict, compiled per descriptor (only populated fields)."""

    def __init__(self, proto_names: bool, pool: Any) -> None:
        self.proto_names = proto_names
        self.pool = pool
        self._plans: dict[str, dict[str, tuple[str, Enc]]] = {}
        self._by_class: dict[type, dict[Any, tuple[str, Enc | None]] | None] = {}

    def _wkt(self, msg: Message) -> Any:
        return json_format.MessageToDict(
            msg, preserving_proto_field_name=self.proto_names, descriptor_pool=self.pool
        )

    def _value_enc(self, fd: FieldT) -> Enc:
        t = fd.type
        if t in _INT64:
            return str
        if t == FD.TYPE_DOUBLE:
            return _float_out
        if t == FD.TYPE_FLOAT:
            return _float32_out
        if t == FD.TYPE_BYTES:
            return _b64
        if t == FD.TYPE_ENUM:
            et = fd.enum_type
            if et.full_name == "google.protobuf.NullValue":
                return lambda v: None
            names = {v.number: v.name for v in et.values}
            return lambda v: names.get(v, v)
        if t in (FD.TYPE_MESSAGE, FD.TYPE_GROUP):
            md = fd.message_type
            full = md.full_name
            if full == "google.protobuf.Timestamp":
                return _timestamp_out
            if full == "google.protobuf.Duration":
                return lambda v: v.ToJsonString()
            if full in _WRAPPERS:
                inner = self._value_enc(md.fields_by_name["value"])
                return lambda v: inner(v.value)
            if full.startswith("google.protobuf."):
                return self._wkt
            return self.encode
        return _identity

    def _plan(self, desc: DescT) -> dict[str, tuple[str, Enc]]:
        plan = self._plans.get(desc.full_name)
        if plan is not None:
            return plan
        plan = {}
        self._plans[desc.full_name] = plan  # before recursing: self-referencing types
        for fd in desc.fields:
            key = fd.name if self.proto_names else fd.json_name
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                kf = fd.message_type.fields_by_name["key"]
                vf = fd.message_type.fields_by_name["value"]
                venc = self._value_enc(vf)
                if kf.type == FD.TYPE_BOOL:

                    def enc_map(m: Any, venc: Enc = venc) -> Any:
                        return {("true" if k else "false"): venc(v) for k, v in m.items()}
                else:

                    def enc_map(m: Any, venc: Enc = venc) -> Any:
                        return {str(k): venc(v) for k, v in m.items()}

                plan[fd.name] = (key, enc_map)
            elif fd.is_repeated:
                venc = self._value_enc(fd)

                def enc_list(vs: Any, venc: Enc = venc) -> Any:
                    return [venc(v) for v in vs]

                plan[fd.name] = (key, enc_list)
            else:
                plan[fd.name] = (key, self._value_enc(fd))
        return plan

    def _class_plan(self, cls: type) -> dict[Any, tuple[str, Enc | None]] | None:
        desc = cls.DESCRIPTOR  # type: ignore[attr-defined]
        plan: dict[Any, tuple[str, Enc | None]] | None = None
        if not desc.full_name.startswith("google.protobuf."):
            by_name = self._plan(desc)
            plan = {}
            for fd in desc.fields:
                key, enc = by_name[fd.name]
                plan[fd] = (key, None if enc is _identity else enc)
        self._by_class[cls] = plan
        return plan

    def encode(self, msg: Message) -> Any:
        """Like ``MessageToDict(msg)`` with this encoder's naming."""
        cls = type(msg)
        try:
            plan = self._by_class[cls]
        except KeyError:
            plan = self._class_plan(cls)
        if plan is None:
            return self._wkt(msg)
        out: dict[str, Any] = {}
        for fd, value in msg.ListFields():
            entry = plan.get(fd)
            if entry is None:  # an extension, or a descriptor object we have not seen
                return self._wkt(msg)
            enc = entry[1]
            out[entry[0]] = value if enc is None else enc(value)
        return out


def _identity(v: Any) -> Any:
    return v


Dec = Callable[[Message, str, Any], None]


class Decoder:
    """JSON object -> message for the common shapes; raises :class:`Fallback` otherwise."""

    def __init__(self, ignore_unknown: bool) -> None:
        self.ignore_unknown = ignore_unknown
        self._plans: dict[str, dict[str, tuple[FieldT, Dec]]] = {}
        self._by_class: dict[type, dict[str, tuple[str, str, int, Dec]]] = {}

    def _value_conv(self, fd: FieldT) -> Callable[[Any], Any] | None:
        """Converter for one repeated/map element (None: message, handled apart)."""
        t = fd.type
        if t == FD.TYPE_STRING:
            return _exactly(str)
        if t == FD.TYPE_BOOL:
            return _exactly(bool)
        if t in _INT32 or t in _INT64:

            def conv(v: Any) -> Any:
                if type(v) is int:
                    return v
                # Only plain decimal strings: int() would also take "1_000" and " 12".
                if type(v) is str and t in _INT64 and _DECIMAL.match(v):
                    return int(v)
                raise Fallback

            return conv
        if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):

            def conv(v: Any) -> Any:
                if type(v) is float or type(v) is int:
                    return v
                raise Fallback

            return conv
        if t == FD.TYPE_BYTES:

            def conv(v: Any) -> Any:
                if type(v) is not str:
                    raise Fallback
                try:
                    return base64.b64decode(v, validate=True)
                except (binascii.Error, ValueError):
                    raise Fallback from None

            return conv
        if t == FD.TYPE_ENUM:
            values = {v.name: v.number for v in fd.enum_type.values}
            if fd.enum_type.full_name == "google.protobuf.NullValue":
                return None

            def conv(v: Any) -> Any:
                if type(v) is str:
                    n = values.get(v)
                    if n is None:
                        raise Fallback
                    return n
                if type(v) is int:
                    return v
                raise Fallback

            return conv
        return None

    def _plan(self, desc: DescT) -> dict[str, tuple[FieldT, Dec]]:
        plan = self._plans.get(desc.full_name)
        if plan is not None:
            return plan
        plan = {}
        self._plans[desc.full_name] = plan
        for fd in desc.fields:
            dec = self._field_dec(fd)
            plan[fd.name] = (fd, dec)
            plan[fd.json_name] = (fd, dec)
        return plan

    def _field_dec(self, fd: FieldT) -> Dec:
        md = fd.message_type
        if md is not None and md.GetOptions().map_entry:
            kf, vf = md.fields_by_name["key"], md.fields_by_name["value"]
            if kf.type not in (FD.TYPE_STRING,) and kf.type not in _INT32 | _INT64:
                return _fallback_dec
            vconv = self._value_conv(vf)
            vmsg = vf.message_type
            if vmsg is not None and vmsg.full_name.startswith("google.protobuf."):
                return _fallback_dec
            is_str_key = kf.type == FD.TYPE_STRING

            def dec_map(msg: Message, name: str, v: Any) -> None:
                if type(v) is not dict:
                    raise Fallback
                target = getattr(msg, name)
                for k, item in v.items():
                    key: Any = k
                    if not is_str_key:
                        try:
                            key = int(k)
                        except ValueError:
                            raise Fallback from None
                    if vconv is not None:
                        target[key] = vconv(item)
                    else:
                        if type(item) is not dict:
                            raise Fallback
                        self.merge(item, target[key])

            return dec_map
        if fd.is_repeated:
            conv = self._value_conv(fd)
            if md is not None:
                if md.full_name.startswith("google.protobuf."):
                    return _fallback_dec

                def dec_rep_msg(msg: Message, name: str, v: Any) -> None:
                    if type(v) is not list:
                        raise Fallback
                    target = getattr(msg, name)
                    for item in v:
                        if type(item) is not dict:
                            raise Fallback
                        self.merge(item, target.add())

                return dec_rep_msg
            if conv is None:
                return _fallback_dec

            def dec_rep(msg: Message, name: str, v: Any, conv: Callable[[Any], Any] = conv) -> None:
                if type(v) is not list:
                    raise Fallback
                try:
                    getattr(msg, name).extend([conv(x) for x in v])
                except (ValueError, TypeError):
                    raise Fallback from None

            return dec_rep
        if md is not None:
            full = md.full_name
            if full == "google.protobuf.Timestamp" or full == "google.protobuf.Duration":

                def dec_time(msg: Message, name: str, v: Any) -> None:
                    if type(v) is not str:
                        raise Fallback
                    try:
                        getattr(msg, name).FromJsonString(v)
                    except ValueError:
                        raise Fallback from None

                return dec_time
            if full.startswith("google.protobuf."):
                return _fallback_dec

            def dec_msg(msg: Message, name: str, v: Any) -> None:
                if type(v) is not dict:
                    raise Fallback
                sub = getattr(msg, name)
                sub.SetInParent()
                self.merge(v, sub)

            return dec_msg
        conv = self._value_conv(fd)
        if conv is None:
            return _fallback_dec

        def dec_scalar(msg: Message, name: str, v: Any, conv: Callable[[Any], Any] = conv) -> None:
            try:
                setattr(msg, name, conv(v))
            except (ValueError, TypeError):
                raise Fallback from None

        return dec_scalar

    def _class_plan(self, cls: type) -> dict[str, tuple[str, str, int, Dec]]:
        desc = cls.DESCRIPTOR  # type: ignore[attr-defined]
        out: dict[str, tuple[str, str, int, Dec]] = {}
        for key, (fd, dec) in self._plan(desc).items():
            oneof = fd.containing_oneof
            kind = _K_OTHER
            if not fd.is_repeated and fd.message_type is None:
                if fd.type == FD.TYPE_STRING:
                    kind = _K_STR
                elif fd.type in _INT32:
                    kind = _K_INT
                elif fd.type == FD.TYPE_BOOL:
                    kind = _K_BOOL
            out[key] = (fd.name, oneof.name if oneof is not None else fd.name, kind, dec)
        self._by_class[cls] = out
        return out

    def merge(self, obj: dict[str, Any], msg: Message) -> None:
        """Merge ``obj`` into ``msg`` or raise :class:`Fallback`."""
        cls = type(msg)
        try:
            plan = self._by_class[cls]
        except KeyError:
            plan = self._class_plan(cls)
        seen: set[str] = set()
        for key, value in obj.items():
            entry = plan.get(key)
            if entry is None:
                if self.ignore_unknown and not key.startswith("["):
                    continue
                raise Fallback
            name, mark, kind, dec = entry
            if mark in seen or value is None:
                raise Fallback
            seen.add(mark)
            if kind == _K_STR:
                if type(value) is not str:
                    raise Fallback
                setattr(msg, name, value)
            elif kind == _K_INT:
                if type(value) is not int:
                    raise Fallback
                try:
                    setattr(msg, name, value)
                except ValueError:
                    raise Fallback from None
            elif kind == _K_BOOL:
                if type(value) is not bool:
                    raise Fallback
                setattr(msg, name, value)
            else:
                dec(msg, name, value)


_K_OTHER, _K_STR, _K_INT, _K_BOOL = range(4)


def _fallback_dec(msg: Message, name: str, v: Any) -> None:
    raise Fallback
