"""Bad JSON values and metadata are 400 naming the field, as Envoy answers; unknown field
names are ignored (grpc-gateway) unless ``strict``; the fast JSON path and the reference
path (json_format) agree on every input."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from meshkit.gateway import GatewayOptions, build_catalog
from meshkit.gateway.core.descriptors import Catalog
from meshkit.gateway.core.errors import GatewayError, status_json
from meshkit.gateway.core.metadata import read_headers
from meshkit.gateway.core.transcoding import JsonCodec
from tests.integration.gateway_backend import descriptor_sets

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_sets()["gwtest"].read_bytes())
    return build_catalog(fds)


def _codec(catalog: Catalog, strict: bool = False) -> JsonCodec:
    return JsonCodec(catalog.pool, GatewayOptions(strict=strict))


def _merge(catalog: Catalog, body: bytes, strict: bool = False, reference: bool = False) -> Any:
    codec = _codec(catalog, strict)
    msg = catalog.message_class("gwtest.v1.Msg")()
    obj = json.loads(body)
    (codec.merge_reference if reference else codec.merge)(obj, msg)
    return msg


def _violation(err: GatewayError) -> tuple[str, str]:
    [detail] = status_json(err.to_status())["details"]
    [v] = detail["fieldViolations"]
    return v["field"], v["description"]


# (body, field path named in the BadRequest, text the message must quote)
BAD_VALUES: list[tuple[bytes, str, str]] = [
    (b'{"name": "\\ud800"}', "name", "surrogate"),
    (b'{"tags": ["ok", "\\udfff"]}', "tags[1]", "surrogate"),
    (b'{"labels": {"k": "\\ud83d"}}', "labels[k]", "surrogate"),
    (b'{"inner": {"name": "\\ud800x"}}', "inner.name", "surrogate"),
    (b'{"inner": "x"}', "inner", '"x"'),
    (b'{"inner": 5}', "inner", "5"),
    (b'{"inner": []}', "inner", "[]"),
    (b'{"inner": {"child": "x"}}', "inner.child", '"x"'),
    (b'{"color": "COLOR_PURPLE"}', "color", '"COLOR_PURPLE"'),
    (b'{"color": "color_red"}', "color", '"color_red"'),
    (b'{"color": "7"}', "color", '"7"'),
    (b'{"colors": ["COLOR_RED", "COLOR_PURPLE"]}', "colors[1]", '"COLOR_PURPLE"'),
    (b'{"blob": "!!!"}', "blob", '"!!!"'),
    (b'{"blob": "AAE=C"}', "blob", '"AAE=C"'),
    (b'{"i64": "1_000"}', "i64", '"1_000"'),
    (b'{"i64": " 12"}', "i64", '" 12"'),
    (b'{"nums": ["1", "2_0"]}', "nums[1]", '"2_0"'),
    (b'{"wI64": "1_0"}', "wI64", '"1_0"'),
    (b'{"long_field_name": {"a": 1}}', "long_field_name", "string"),
]


@pytest.mark.parametrize(("body", "field", "quoted"), BAD_VALUES)
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_bad_values_are_400_naming_field_and_value(
    catalog: Catalog, body: bytes, field: str, quoted: str, reference: bool
) -> None:
    with pytest.raises(GatewayError) as ei:
        _merge(catalog, body, reference=reference)
    err = ei.value
    assert (err.http_status, err.code) == (400, "INVALID_ARGUMENT")
    path, description = _violation(err)
    assert path == field, err.message
    assert field in err.message and quoted in err.message, err.message
    assert description


def test_unknown_names_ignored_at_any_depth_unless_strict(catalog: Catalog) -> None:
    body = (
        b'{"name": "x", "zzz": {"deep": ["COLOR_PURPLE"]}, "inner": {"yyy": 1, "child": '
        b'{"xxx": "\\ud800", "name": "c"}}, "any": {"@type": '
        b'"type.googleapis.com/gwtest.v1.Inner", "name": "n", "www": 1}}'
    )
    for reference in (False, True):
        msg = _merge(catalog, body, reference=reference)
        assert (msg.name, msg.inner.child.name) == ("x", "c")
        assert msg.any.type_url.endswith("gwtest.v1.Inner")
    for unknown, where in (
        (b'{"zzz": 1}', "zzz"),
        (b'{"inner": {"yyy": 1}}', "inner.yyy"),
        (b'{"inner": {"child": {"xxx": 1}}}', "inner.child.xxx"),
    ):
        with pytest.raises(GatewayError) as ei:
            _merge(catalog, unknown, strict=True)
        assert _violation(ei.value)[0] == where
        assert "unknown field" in ei.value.message


def test_valid_values_still_pass(catalog: Catalog) -> None:
    body = json.dumps(
        {
            "name": "é \U0001f600",
            "i64": "-42",
            "u64": 18446744073709551615,
            "i32": "12",
            "color": "COLOR_GREEN",
            "colors": ["COLOR_RED", 2, 7],
            "blob": "AAEC_w",
            "tags": ["a"],
            "nums": ["1", 2],
            "inner": None,
            "labels": {"k": "v"},
            "meta": {"a": [1, "\u00e9", None]},
            "wI64": "9",
            "any": {"@type": "type.googleapis.com/google.protobuf.Duration", "value": "1s"},
        }
    ).encode()
    fast = _merge(catalog, body)
    ref = _merge(catalog, body, reference=True)
    assert fast == ref
    assert (fast.i64, fast.color, list(fast.colors), fast.blob) == (
        -42,
        2,
        [1, 2, 7],
        b"\x00\x01\x02\xff",
    )


# Inputs the fast path handles or declines: whatever it does, the outcome (message or
# error) must be the reference path's.
CORPUS: list[bytes] = [
    *(b for b, _, _ in BAD_VALUES),
    b'{"name": "x", "bogus": 1}',
    b'{"inner": {"zzz": 1, "name": "n"}}',
    b'{"inner": null, "color": null}',
    b'{"tags": "x"}',
    b'{"labels": {"k": 1}}',
    b'{"labels": "x"}',
    b'{"color": 7}',
    b'{"flag": 1}',
    b'{"blob": "AAEC/w=="}',
    b'{"blob": "AAEC_w"}',
    b'{"i64": "12"}',
    b'{"i64": 12.0}',
    b'{"i64": "-0"}',
    b'{"a": "x", "b": 1}',
    b'{"dur": "1.5"}',
    b'{"ts": "2024-01-02T03:04:05Z", "dur": "3s"}',
    b'{"inner": {"tags": [1]}}',
    b'{"nums": ["1", 2, "3"]}',
    b'{"colors": ["COLOR_RED", 2]}',
    b'{"labels": {"\\ud800": "v"}}',
]


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("body", CORPUS)
def test_fast_path_and_reference_agree(catalog: Catalog, body: bytes, strict: bool) -> None:
    outcomes = []
    for reference in (False, True):
        try:
            outcomes.append(("ok", _merge(catalog, body, strict, reference)))
        except GatewayError as exc:
            outcomes.append(("error", (exc.http_status, exc.message, _violation(exc))))
    assert outcomes[0] == outcomes[1]


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize(
    "value",
    [
        base64.b64encode(b"\x00\xfb\xff"),  # standard, padded (no padding needed)
        base64.b64encode(b"\xfb\xff"),  # standard, padded
        base64.b64encode(b"\xfb\xff").rstrip(b"="),  # standard, unpadded
        base64.urlsafe_b64encode(b"\xfb\xff"),  # URL-safe, padded
        base64.urlsafe_b64encode(b"\xfb\xff").rstrip(b"="),  # URL-safe, unpadded
    ],
)
def test_binary_metadata_accepts_both_alphabets_padded_or_not(value: bytes) -> None:
    h = read_headers([(b"grpc-metadata-blob-bin", value)], None)
    got = dict(h.metadata)["blob-bin"]
    assert got in (b"\x00\xfb\xff", b"\xfb\xff")


@pytest.mark.parametrize(
    "value", [b"!!!", b"AAE=C", b"AA AA", b"A", b"AAAAA", b"AA==AA==", b"AA=", b"=", b"AB\x00C"]
)
def test_binary_metadata_refuses_anything_else_naming_the_header(value: bytes) -> None:
    with pytest.raises(GatewayError) as ei:
        read_headers([(b"grpc-metadata-blob-bin", value)], None)
    assert ei.value.http_status == 400
    assert "Grpc-Metadata-Blob-Bin".lower() in ei.value.message.lower()
    assert "base64" in ei.value.message
