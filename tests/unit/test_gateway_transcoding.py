"""Transcoding without a network: query parameters, bodies, JSON round trips,
HttpRule validation, error mapping, header metadata and options."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, json_format
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkit.errors import ConfigError
from meshkit.gateway import GatewayOptions, build_catalog, create_app
from meshkit.gateway.core.config import load_config
from meshkit.gateway.core.descriptors import Catalog
from meshkit.gateway.core.errors import HTTP_STATUS, GatewayError, http_status_for, status_json
from meshkit.gateway.core.metadata import parse_timeout, read_headers
from meshkit.gateway.core.transcoding import Binding, JsonCodec, Transcoder, compile_binding
from tests.integration.gateway_backend import descriptor_sets

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_sets()["gwtest"].read_bytes())
    return build_catalog(fds)


def _method(catalog: Catalog, name: str) -> Any:
    return next(m for m in catalog.methods if m.full_name == name)


def _binding(
    catalog: Catalog,
    template: str = "/v1/query",
    method: str = "GET",
    body: str = "",
    rpc: str = "gwtest.v1.EchoService.Echo",
    response_body: str = "",
) -> Binding:
    return compile_binding(_method(catalog, rpc), method, template, body, response_body)


def _tr(catalog: Catalog, **opts: Any) -> Transcoder:
    options = GatewayOptions(**opts)
    return Transcoder(JsonCodec(catalog.pool, options), options)


def _build(
    catalog: Catalog,
    query: str = "",
    data: bytes = b"",
    path_values: tuple[str, ...] = (),
    **kw: Any,
) -> Any:
    opts = {k: kw.pop(k) for k in list(kw) if k in ("strict", "proto_names")}
    b = _binding(catalog, **kw)
    return _tr(catalog, **opts).build(
        b, data, "application/json", query.encode(), list(path_values)
    )


def _status(err: GatewayError) -> dict[str, Any]:
    return status_json(err.to_status())


# --------------------------------------------------------------------------- query parameters


def test_query_scalars_enums_bools_int64_bytes(catalog: Catalog) -> None:
    blob = base64.urlsafe_b64encode(b"\xfb\xff\x00").decode().rstrip("=")
    msg = _build(
        catalog,
        f"name=n&i32=-5&i64=9007199254740993&u64=18446744073709551615&dbl=1.5"
        f"&flt=NaN&flag=true&blob={blob}&color=COLOR_GREEN",
    )
    assert (msg.name, msg.i32, msg.i64, msg.u64, msg.dbl) == (
        "n",
        -5,
        9007199254740993,
        2**64 - 1,
        1.5,
    )
    assert msg.flt != msg.flt  # NaN
    assert msg.flag is True and msg.blob == b"\xfb\xff\x00" and msg.color == 2


def test_query_enum_by_number_repeated_and_json_names(catalog: Catalog) -> None:
    msg = _build(
        catalog,
        "color=1&tags=a&tags=b&nums=1&nums=-2&colors=COLOR_RED&colors=2"
        "&longFieldName=x&inner.name=deep&inner.child.count=7",
    )
    assert msg.color == 1
    assert list(msg.tags) == ["a", "b"] and list(msg.nums) == [1, -2] and list(msg.colors) == [1, 2]
    assert msg.long_field_name == "x"
    assert msg.inner.name == "deep" and msg.inner.child.count == 7


def test_query_well_known_types(catalog: Catalog) -> None:
    msg = _build(
        catalog,
        "ts=2024-01-02T03:04:05.5Z&dur=1.5s&mask=inner.name,longFieldName"
        "&w_i64=-3&wStr=hello&w_bool=false",
    )
    assert msg.ts.ToJsonString() == "2024-01-02T03:04:05.500Z"
    assert msg.dur.ToJsonString() == "1.500s"
    assert list(msg.mask.paths) == ["inner.name", "long_field_name"]
    assert msg.w_i64.value == -3 and msg.w_str.value == "hello"
    assert msg.HasField("w_bool") and msg.w_bool.value is False


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("i32=abc", "i32"),
        ("i32=2147483648", "i32"),
        ("u64=-1", "u64"),
        ("flag=maybe", "flag"),
        ("color=PURPLE", "color"),
        ("blob=@@@", "blob"),
        ("ts=yesterday", "ts"),
        ("dur=5", "dur"),
    ],
)
def test_query_bad_values_are_400_with_field_violation(
    catalog: Catalog, query: str, field: str
) -> None:
    with pytest.raises(GatewayError) as exc:
        _build(catalog, query)
    err = exc.value
    assert err.http_status == 400 and err.code == "INVALID_ARGUMENT"
    st_ = _status(err)
    assert st_["code"] == 3
    assert st_["details"][0]["fieldViolations"][0]["field"] == field


def test_query_unknown_ignored_by_default_and_400_when_strict(catalog: Catalog) -> None:
    assert _build(catalog, "nope=1&name=x").name == "x"
    with pytest.raises(GatewayError) as exc:
        _build(catalog, "nope=1", strict=True)
    assert "nope" in exc.value.message


def test_query_message_field_rejected(catalog: Catalog) -> None:
    with pytest.raises(GatewayError) as exc:
        _build(catalog, "inner=x")
    assert exc.value.http_status == 400


def test_query_invalid_utf8_is_400(catalog: Catalog) -> None:
    with pytest.raises(GatewayError):
        _build(catalog, "name=%ff%fe")


def test_path_wins_over_query_and_body(catalog: Catalog) -> None:
    msg = _build(catalog, "name=fromquery", template="/v1/echo/{name}", path_values=("frompath",))
    assert msg.name == "frompath"
    msg = _build(
        catalog,
        "",
        data=b'{"name": "frombody", "i32": 3}',
        template="/v1/echo/{name}",
        method="POST",
        body="*",
        path_values=("frompath",),
    )
    assert (msg.name, msg.i32) == ("frompath", 3)


def test_body_star_ignores_query(catalog: Catalog) -> None:
    msg = _build(catalog, "i32=9", data=b'{"i32": 3}', template="/v1/echo", method="POST", body="*")
    assert msg.i32 == 3


def test_body_field_plus_query_for_the_rest(catalog: Catalog) -> None:
    msg = _build(
        catalog,
        "i32=4&inner.name=ignored",
        data=b'{"name": "in", "count": "12"}',
        template="/v1/echo/{name}",
        method="PUT",
        body="inner",
        path_values=("p",),
    )
    assert (msg.name, msg.i32, msg.inner.name, msg.inner.count) == ("p", 4, "in", 12)


def test_repeated_body_field(catalog: Catalog) -> None:
    msg = _build(
        catalog,
        data=b'["x", "y"]',
        template="/v1/echo/{name}:tags",
        method="POST",
        body="tags",
        path_values=("n",),
    )
    assert list(msg.tags) == ["x", "y"]


# --------------------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"name": ', "malformed JSON"),
        (b"{'a': 1}", "malformed JSON"),
        (b'{"i32": "abc"}', "i32"),
        (b'{"i32": 1.5}', "i32"),
        (b'{"flag": "yes"}', "flag"),
        (b'{"tags": "notalist"}', "tags"),
        (b'{"inner": 5}', "inner"),
        (b'{"a": "x", "b": 1}', "oneof"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"ts": "nope"}', "ts"),
    ],
)
def test_bad_bodies_are_400(catalog: Catalog, body: bytes, needle: str) -> None:
    with pytest.raises(GatewayError) as exc:
        _build(catalog, data=body, template="/v1/echo", method="POST", body="*")
    assert exc.value.http_status == 400
    assert needle.lower() in exc.value.message.lower()


def test_unknown_enum_name_is_400_like_envoy_strict_or_not(catalog: Catalog) -> None:
    # json_format with ignore_unknown_fields drops it silently; Envoy answers 400, and so
    # does meshkit: an unknown field *name* is ignored, an unknown *value* never.
    for strict in (False, True):
        with pytest.raises(GatewayError) as exc:
            _build(
                catalog,
                data=b'{"color": "PURPLE", "i32": 1}',
                template="/v1/echo",
                method="POST",
                body="*",
                strict=strict,
            )
        assert "PURPLE" in exc.value.message and "color" in exc.value.message


def test_deep_nesting_is_400(catalog: Catalog) -> None:
    deep = b'{"meta": ' + b'{"a": ' * 100 + b"1" + b"}" * 100 + b"}"
    with pytest.raises(GatewayError) as exc:
        _build(catalog, data=deep, template="/v1/echo", method="POST", body="*")
    assert "deeper" in exc.value.message
    very_deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(GatewayError):
        _build(catalog, data=very_deep, template="/v1/echo", method="POST", body="*")


def test_unknown_body_fields_ignored_or_strict(catalog: Catalog) -> None:
    msg = _build(
        catalog, data=b'{"name": "x", "zzz": [1]}', template="/v1/echo", method="POST", body="*"
    )
    assert msg.name == "x"
    with pytest.raises(GatewayError) as exc:
        _build(
            catalog, data=b'{"zzz": 1}', template="/v1/echo", method="POST", body="*", strict=True
        )
    assert "zzz" in exc.value.message


def test_both_names_accepted_in(catalog: Catalog) -> None:
    msg = _build(
        catalog,
        data=b'{"long_field_name": "a", "wStr": "b", "w_bool": true}',
        template="/v1/echo",
        method="POST",
        body="*",
    )
    assert (msg.long_field_name, msg.w_str.value, msg.w_bool.value) == ("a", "b", True)


def test_patch_fills_field_mask_from_json_keys(catalog: Catalog) -> None:
    b = _binding(
        catalog, "/v1/{parent=items/*}/inner", "PATCH", "inner", rpc="gwtest.v1.EchoService.Update"
    )
    tr = _tr(catalog)
    msg = tr.build(
        b,
        b'{"name": "n", "child": {"count": 2, "tags": []}, "tags": ["t"]}',
        "application/json",
        b"",
        ["items/1"],
    )
    assert sorted(msg.update_mask.paths) == ["child.count", "child.tags", "name", "tags"]
    # A mask sent by the client wins.
    msg = tr.build(b, b'{"name": "n"}', "application/json", b"updateMask=count", ["items/1"])
    assert list(msg.update_mask.paths) == ["count"]


# --------------------------------------------------------------------------- JSON round trips

_i32 = st.integers(-(2**31), 2**31 - 1)
_i64 = st.integers(-(2**63), 2**63 - 1)
_text = st.text(max_size=12)


@st.composite
def messages(draw: st.DrawFn, catalog: Catalog) -> Any:
    Msg = catalog.message_class("gwtest.v1.Msg")
    m = Msg()
    m.name = draw(_text)
    m.i32 = draw(_i32)
    m.i64 = draw(_i64)
    m.u64 = draw(st.integers(0, 2**64 - 1))
    m.dbl = draw(st.floats(allow_nan=False, allow_infinity=True))
    # Away from float32 max and subnormals, where json_format rejects its own output.
    m.flt = draw(
        st.floats(width=32, min_value=-(2.0**100), max_value=2.0**100, allow_subnormal=False)
    )
    m.flag = draw(st.booleans())
    m.blob = draw(st.binary(max_size=10))
    m.color = draw(st.sampled_from([0, 1, 2, 7]))
    m.tags.extend(draw(st.lists(_text, max_size=3)))
    m.nums.extend(draw(st.lists(_i64, max_size=3)))
    if draw(st.booleans()):
        m.inner.name = draw(_text)
        m.inner.count = draw(_i64)
        if draw(st.booleans()):
            m.inner.child.tags.append(draw(_text))
    if draw(st.booleans()):
        m.ts.seconds = draw(st.integers(-(2**34), 253402300799))
        m.ts.nanos = draw(st.sampled_from([0, 5_000_000, 123_000, 7, 999_999_999]))
        m.dur.FromMilliseconds(draw(st.integers(-(10**9), 10**9)))
    if draw(st.booleans()):
        m.w_i64.value = draw(_i64)
        m.w_str.value = draw(_text)
    for k in draw(st.lists(_text, max_size=3)):
        m.labels[k] = draw(_text)
    choice = draw(st.sampled_from(["", "a", "b"]))
    if choice == "a":
        m.a = draw(_text)
    elif choice == "b":
        m.b = draw(_i32)
    if draw(st.booleans()):
        m.meta.update({"k": draw(_text), "n": 1.0, "l": [True, None]})
    return m


@pytest.mark.parametrize("proto_names", [False, True])
def test_property_fast_json_matches_json_format_and_round_trips(
    catalog: Catalog, proto_names: bool
) -> None:
    options = GatewayOptions(proto_names=proto_names)
    codec = JsonCodec(catalog.pool, options)
    Msg = catalog.message_class("gwtest.v1.Msg")

    @settings(max_examples=150, deadline=None)
    @given(messages(catalog))
    def check(m: Any) -> None:
        obj = codec.to_obj(m)
        ref = json_format.MessageToDict(
            m, preserving_proto_field_name=proto_names, descriptor_pool=catalog.pool
        )
        assert json.dumps(obj, sort_keys=True) == json.dumps(ref, sort_keys=True)
        back = Msg()
        codec.merge(json.loads(codec.dumps(obj)), back)
        assert back == m

    check()


def test_emit_unpopulated_and_proto_names(catalog: Catalog) -> None:
    Msg = catalog.message_class("gwtest.v1.Msg")
    codec = JsonCodec(catalog.pool, GatewayOptions(emit_unpopulated=True, proto_names=True))
    obj = codec.to_obj(Msg(name="x"))
    assert obj["long_field_name"] == "" and obj["i64"] == "0" and obj["tags"] == []
    assert obj["color"] == "COLOR_UNSPECIFIED"
    assert "inner" not in obj  # messages have presence


def test_response_body_field(catalog: Catalog) -> None:
    b = _binding(catalog, "/v1/inner/{name}", response_body="inner")
    tr = _tr(catalog)
    Msg = catalog.message_class("gwtest.v1.Msg")
    m = Msg()
    m.inner.name = "x"
    assert tr.response_body(b, m) == (b"application/json", b'{"name":"x"}')
    assert tr.response_body(b, Msg()) == (b"application/json", b"{}")


# --------------------------------------------------------------------------- rule validation


def _fds_with_rule(
    catalog: Catalog, rules: list[tuple[str, str, str]]
) -> descriptor_pb2.FileDescriptorSet:
    """The gwtest descriptor set plus a service whose methods carry ``rules``."""
    from google.api import annotations_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_sets()["gwtest"].read_bytes())
    f = fds.file.add(name="bad/v1/bad.proto", package="bad.v1", syntax="proto3")
    f.dependency.extend(["gwtest/v1/gwtest.proto", "google/api/annotations.proto"])
    svc = f.service.add(name="Bad")
    for i, (verb, path, body) in enumerate(rules):
        m = svc.method.add(name=f"M{i}", input_type=".gwtest.v1.Msg", output_type=".gwtest.v1.Msg")
        rule = m.options.Extensions[annotations_pb2.http]
        setattr(rule, verb, path)
        rule.body = body
    return fds


@pytest.mark.parametrize(
    ("rules", "needles"),
    [
        ([("get", "/v1/{nosuch}", "")], ["bad.v1.Bad.M0", "/v1/{nosuch}", "nosuch"]),
        ([("get", "/v1/{tags}", "")], ["repeated"]),
        ([("get", "/v1/{inner}", "")], ["cannot be set"]),
        ([("post", "/v1/x", "nosuch")], ["body field 'nosuch'"]),
        ([("get", "v1/x", "")], ["must start with '/'"]),
        (
            [("get", "/v1/x/{name}", ""), ("get", "/v1/x/{path}", "")],
            ["bad.v1.Bad.M1", "/v1/x/{path}", "ambiguous", "/v1/x/{name}"],
        ),
    ],
)
def test_invalid_or_ambiguous_rules_reported_at_load(
    catalog: Catalog, rules: list[tuple[str, str, str]], needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as exc:
        create_app(_fds_with_rule(catalog, rules), ["127.0.0.1:1"], services=["bad.v1.Bad"])
    for n in needles:
        assert n in str(exc.value)


def test_fallback_routes_option(catalog: Catalog) -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_sets()["gwtest"].read_bytes())
    names = {str(r.binding.template) for r in create_app(fds, ["h:1"]).routes}
    assert "/gwtest.v1.EchoService/NoRule" in names and "/gwtest.v1.EchoService/Echo" not in names
    names = {
        str(r.binding.template)
        for r in create_app(fds, ["h:1"], options=GatewayOptions(fallback_routes="all")).routes
    }
    assert "/gwtest.v1.EchoService/Echo" in names
    names = {
        str(r.binding.template)
        for r in create_app(fds, ["h:1"], options=GatewayOptions(fallback_routes="none")).routes
    }
    assert not any(n.startswith("/gwtest") for n in names)


# --------------------------------------------------------------------------- errors and headers


def test_status_mapping_table() -> None:
    expected = {
        0: 200,
        1: 499,
        2: 500,
        3: 400,
        4: 504,
        5: 404,
        6: 409,
        7: 403,
        8: 429,
        9: 400,
        10: 409,
        11: 400,
        12: 501,
        13: 500,
        14: 503,
        15: 500,
        16: 401,
        99: 500,
    }
    assert {c: http_status_for(c) for c in expected} == expected
    assert len(HTTP_STATUS) == 17


def test_status_json_decodes_details() -> None:
    st_ = status_pb2.Status(code=3, message="bad")
    br = error_details_pb2.BadRequest()
    br.field_violations.add(field="f", description="d")
    st_.details.add().Pack(br)
    st_.details.add(type_url="type.googleapis.com/unknown.Thing", value=b"\x01")
    out = status_json(st_)
    assert out["details"][0] == {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": "f", "description": "d"}],
    }
    assert out["details"][1] == {"@type": "type.googleapis.com/unknown.Thing", "value": "AQ=="}


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"5S", 5.0),
        (b"100m", 0.1),
        (b"2M", 120.0),
        (b"1H", 3600.0),
        (b"250000u", 0.25),
        (b"7n", 7e-9),
    ],
)
def test_grpc_timeout(value: bytes, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"5", b"S", b"123456789S", b"-1S", b"1.5S", b"5s"])
def test_grpc_timeout_invalid(value: bytes) -> None:
    with pytest.raises(GatewayError) as exc:
        parse_timeout(value)
    assert exc.value.http_status == 400


def test_headers_become_metadata() -> None:
    h = read_headers(
        [
            (b"authorization", b"Bearer t"),
            (b"grpc-metadata-tenant", b"acme"),
            (b"grpc-metadata-blob-bin", base64.b64encode(b"\x00\x01")),
            (b"traceparent", b"00-a-b-01"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"connection", b"keep-alive"),
            (b"te", b"trailers"),
            (b"grpc-metadata-grpc-status", b"0"),
            (b"grpc-metadata-connection", b"x"),
            (b"x-request-id", b"rid-1"),
            (b"grpc-timeout", b"3S"),
            (b"cookie", b"secret"),
        ],
        ("192.0.2.7", 1234),
    )
    md = dict(h.metadata)
    assert md == {
        "authorization": "Bearer t",
        "tenant": "acme",
        "blob-bin": b"\x00\x01",
        "traceparent": "00-a-b-01",
        "x-request-id": "rid-1",
        "x-forwarded-for": "10.0.0.1, 192.0.2.7",
    }
    assert h.timeout == 3.0


def test_request_id_generated_when_absent() -> None:
    a = read_headers([], None)
    b = read_headers([], None)
    assert a.request_id and b.request_id and a.request_id != b.request_id
    assert ("x-request-id", a.request_id) in a.metadata


@pytest.mark.parametrize(
    "header",
    [
        (b"grpc-metadata-bad key", b"v"),
        (b"grpc-metadata-K\xc3\xa9", b"v"),
        (b"grpc-metadata-ok", b"caf\xc3\xa9"),
        (b"grpc-metadata-ok", b"a\x01b"),
        (b"grpc-metadata-x-bin", b"!!!not base64"),
    ],
)
def test_invalid_metadata_headers_are_400(header: tuple[bytes, bytes]) -> None:
    with pytest.raises(GatewayError) as exc:
        read_headers([header], None)
    assert exc.value.http_status == 400


# --------------------------------------------------------------------------- options


def test_options_validation_names_key() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.stream_format"):
        GatewayOptions(stream_format="xml")
    with pytest.raises(ConfigError, match=r"gateway\.nope"):
        GatewayOptions.from_mapping({"nope": 1})
    with pytest.raises(ConfigError, match=r"gateway\.max_timeout"):
        GatewayOptions.from_mapping({"max_timeout": "soon"})
    opts = GatewayOptions.from_mapping(
        {"default_timeout": "2s", "max_timeout": "10s", "route_timeouts": {"a.B.C": "1m"}}
    )
    assert opts.timeout_for("x.Y.Z") == 2.0
    assert opts.timeout_for("a.B.C") == 10.0  # capped


def test_load_config_file(tmp_path: Any) -> None:
    p = tmp_path / "gateway.yaml"
    p.write_text("gateway:\n  strict: true\nupstreams:\n  default: 127.0.0.1:5\npolicy: {}\n")
    cfg = load_config(p)
    assert cfg.options.strict and cfg.upstreams == {"default": "127.0.0.1:5"}
    p.write_text("gateway:\n  strict: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    # file:line:col of the value, as `meshkit policy check` reports.
    assert (exc.value.source, exc.value.path) == (f"{p}:2:11", "gateway.strict")
    assert str(exc.value) == f"{p}:2:11: gateway.strict: expected true or false, got 3"
    p.write_text("edge: [1]\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(exc.value) == f"{p}:1:7: edge: expected a mapping"
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "missing.yaml")
    assert exc.value.source == str(tmp_path / "missing.yaml")
    assert "cannot load" in str(exc.value)
    # The edge loader reads and reports the same way.
    from meshkit.gateway.edge.profiles import load_edge_config

    p.write_text("edge:\n  metrics: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_edge_config(p)
    assert str(exc.value) == f"{p}:2:12: edge.metrics: expected true or false, got 3"


async def test_lifespan_reports_startup_failure_and_runs_shutdown() -> None:
    import logging

    from meshkit.gateway.core.app import serve_lifespan

    done: list[str] = []

    async def run(inbox: list[str], startup_fails: bool) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        msgs = iter(inbox)

        async def receive() -> dict[str, Any]:
            return {"type": next(msgs)}

        async def send(m: Any) -> None:
            sent.append(dict(m))

        async def startup() -> None:
            if startup_fails:
                raise RuntimeError("no descriptors")
            done.append("up")

        async def shutdown() -> None:
            done.append("down")

        await serve_lifespan(receive, send, startup, shutdown, logging.getLogger("t"))
        return sent

    ok = await run(["lifespan.startup", "lifespan.shutdown"], startup_fails=False)
    assert ok == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert done == ["up", "down"]
    failed = await run(["lifespan.startup"], startup_fails=True)
    assert failed == [{"type": "lifespan.startup.failed", "message": "no descriptors"}]
    assert done == ["up", "down"]


def test_the_cli_server_needs_no_uvicorn() -> None:
    # The CLIs' guarantees must not depend on which uvicorn is installed, or on any: the
    # server modules import with uvicorn made unimportable.
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['uvicorn'] = None\n"
        "import meshkit.gateway.serve._cli, meshkit.gateway.serve._edge_cli, meshkit.gateway.serve._serve\n"
        "import meshkit.gateway.serve._server, meshkit.gateway.serve._http, meshkit.gateway.serve._ws\n"
        "print(sorted(m for m in sys.modules if m.startswith('uvicorn') and sys.modules[m]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
