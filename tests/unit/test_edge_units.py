"""Edge pieces without a network: config validation, shaping, cache, limits, canary, OpenAPI."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from meshkit.auth import AuthConfig, Authenticator, AuthError, bearer_token
from meshkit.errors import ConfigError
from meshkit.gateway.core.config import GatewayOptions
from meshkit.gateway.edge.bff import CompositeSpec, render
from meshkit.gateway.edge.cache import CachedResponse, ResponseCache
from meshkit.gateway.edge.profiles import EdgeConfig
from meshkit.gateway.edge.ratelimit import RateLimitMiddleware, RateLimitRule
from meshkit.gateway.edge.shaping import ShapingRule
from meshkit.gateway.upstream.canary import CanarySpec, CanaryUpstream, bucket_of
from meshkit.gateway.upstream.upstreams import Upstream
from meshkit.resilience.clock import FakeClock

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (
            {"edge": {"profiles": {"web": {"routes": [{"cache": {"ttl": "soon"}}]}}}},
            "edge.profiles.web.routes[0].cache.ttl",
        ),
        (
            {
                "edge": {
                    "profiles": {"web": {"routes": [{"rate_limit": {"rate": 1, "key": "moon"}}]}}
                }
            },
            "edge.profiles.web.routes[0].rate_limit.key",
        ),
        (
            {"edge": {"auth": {"jwt": {"keys": [{"algorithm": "none", "secret": "x"}]}}}},
            "edge.auth.jwt.keys[0].algorithm",
        ),
        (
            {"edge": {"auth": {"jwt": {"keys": [{"algorithm": "RS256", "secret": "x"}]}}}},
            "edge.auth.jwt.keys[0]",
        ),
        (
            {"edge": {"auth": {"api_keys": {"keys": [{"name": "a", "sha256": "abc"}]}}}},
            "edge.auth.api_keys.keys[0].sha256",
        ),
        (
            {"edge": {"upstreams": {"a": ["h:1"]}, "services": {"default": "b"}}},
            "edge.services.default",
        ),
        (
            {
                "edge": {
                    "upstreams": {"a": ["h:1"]},
                    "services": {"s": {"canary": {"stable": "a", "canary": "a", "weight": 150}}},
                }
            },
            "edge.services.s.canary.weight",
        ),
        (
            {
                "edge": {
                    "profiles": {
                        "m": {
                            "bff": [
                                {
                                    "name": "x",
                                    "path": "/x",
                                    "calls": {
                                        "a": {"rpc": "p.S.M", "request": {"v": "{b.id}"}},
                                        "b": {"rpc": "p.S.M", "request": {"v": "{a.id}"}},
                                    },
                                }
                            ]
                        }
                    }
                }
            },
            "edge.profiles.m.bff[0].calls",
        ),
        (
            {
                "edge": {
                    "profiles": {
                        "m": {
                            "bff": [
                                {
                                    "name": "x",
                                    "path": "/x",
                                    "calls": {"a": {"rpc": "p.S.M", "request": {"v": "{nope.id}"}}},
                                }
                            ]
                        }
                    }
                }
            },
            "edge.profiles.m.bff[0].calls.a.request",
        ),
        (
            {"edge": {"profiles": {"m": {"cors": {"allow_origins": 3}}}}},
            "edge.profiles.m.cors.allow_origins",
        ),
        ({"edge": {"profiles": {"m": {"unknown": 1}}}}, "edge.profiles.m.unknown"),
        ({"edge": {"profiles": {"a": {"prefix": "/x"}, "b": {"prefix": "/x"}}}}, "edge.profiles.b"),
        (
            {"edge": {"profiles": {"m": {"routes": [{"match": {"methods": ["FETCH"]}}]}}}},
            "edge.profiles.m.routes[0].match.methods",
        ),
    ],
)
def test_config_errors_name_the_key_path(doc: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as ei:
        EdgeConfig.from_mapping(doc)
    assert ei.value.path == path, str(ei.value)


def test_shaping_masks_through_lists_and_renames() -> None:
    rule = ShapingRule.from_mapping(
        {"fields": ["id", "items.sku", "total"], "rename": {"items.sku": "code"}}, "s"
    )
    doc = {
        "id": "1",
        "secret": "x",
        "items": [{"sku": "a", "qty": 1}, {"sku": "b"}],
        "total": {"amount": 3},
    }
    assert rule.shape(doc) == {
        "id": "1",
        "items": [{"code": "a"}, {"code": "b"}],
        "total": {"amount": 3},
    }


def _item(body: bytes, expires: float) -> CachedResponse:
    return CachedResponse(200, (), body, b'"e"', expires, 0.0)


def test_cache_is_bounded_by_bytes_lru_and_expires(fake_clock: FakeClock) -> None:
    cache = ResponseCache(max_bytes=1000, clock=fake_clock)
    now = fake_clock.now()
    for i in range(5):
        cache.put(f"k{i}".encode(), _item(b"x" * 200, now + 10))
    assert cache.size_bytes <= 1000
    assert cache.get(b"k0") is None  # evicted, least recently used
    assert cache.get(b"k4") is not None
    cache.put(b"huge", _item(b"x" * 2000, now + 10))
    assert cache.get(b"huge") is None
    fake_clock.advance(11)
    assert cache.get(b"k4") is None
    cache.put(b"a", _item(b"1", fake_clock.now() + 5))
    cache.clear()
    assert len(cache) == 0 and cache.size_bytes == 0


async def test_rate_limit_refills_with_the_clock(fake_clock: FakeClock) -> None:
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    rule = RateLimitRule.from_mapping({"rate": 1, "per": "10s", "burst": 2}, "r")
    mw = RateLimitMiddleware(app, rule, clock=fake_clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://t") as c:
        codes = [(await c.get("/")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = await c.get("/")
        assert r.headers["retry-after"] == "10"
        fake_clock.advance(10)
        assert (await c.get("/")).status_code == 200
    assert calls == 3


def test_canary_buckets_are_stable_and_weights_hold() -> None:
    stable = Upstream("a", ["127.0.0.1:1"])
    canary = Upstream("b", ["127.0.0.1:2"])
    up = CanaryUpstream("c", stable, canary, CanarySpec("a", "b", 10.0), rng=random.Random(7))
    picks = sum(up.choose(None) is canary for _ in range(20000))
    assert 1800 <= picks <= 2200
    assert bucket_of("user-1") == bucket_of("user-1")
    pinned = {"headers": [(b"x-canary", b"always")]}
    assert up.choose(pinned) is canary
    assert up.choose({"headers": [(b"x-canary", b"never")]}) is stable
    sticky = CanaryUpstream("c", stable, canary, CanarySpec("a", "b", 30.0, sticky="header:x-u"))
    for i in range(50):
        scope = {"headers": [(b"x-u", f"u{i}".encode())]}
        want = canary if bucket_of(f"u{i}") < 3000 else stable
        assert all(sticky.choose(scope) is want for _ in range(3))


def test_bff_templates_and_dependencies() -> None:
    env = {"path": {"id": "o-1"}, "order": {"customerId": "c-9", "total": {"amountMinor": "5"}}}
    assert render(
        {
            "a": "{path.id}",
            "b": "x-{order.customerId}",
            "n": "{order.total.amountMinor}",
            "gone": "{order.nothing}",
        },
        env,
    ) == {"a": "o-1", "b": "x-c-9", "n": "5"}
    spec = CompositeSpec.from_mapping(
        {
            "name": "s",
            "path": "/s/{id}",
            "calls": {
                "order": {"rpc": "p.S.A", "request": {"id": "{path.id}"}},
                "ship": {"rpc": "p.S.B", "request": {"id": "{order.id}"}, "optional": True},
            },
        },
        "bff",
    )
    assert [c.depends for c in spec.calls] == [(), ("order",)]


def test_openapi_document_validates(shop_descriptor_set: Path) -> None:
    from openapi_spec_validator import validate

    from meshkit.gateway.core.app import load_catalog
    from meshkit.gateway.openapi import generate_openapi

    doc = generate_openapi(load_catalog(shop_descriptor_set), servers=["http://localhost:8080"])
    validate(doc)  # raises on an invalid document
    get = doc["paths"]["/v1/orders/{order_id}"]["get"]
    assert [p["name"] for p in get["parameters"] if p["in"] == "path"] == ["order_id"]
    assert {p["name"] for p in get["parameters"] if p["in"] == "query"} == {"customerId"}
    listing = {p["name"] for p in doc["paths"]["/v1/orders"]["get"]["parameters"]}
    assert {"customerId", "status", "pageSize", "orderIds", "createdAfter"} <= listing
    assert doc["components"]["schemas"]["shop.v1.Money"]["properties"]["amountMinor"] == {
        "type": "string",
        "format": "int64",
    }
    cancel = doc["paths"]["/v1/{name}:cancel"]["post"]
    assert cancel["parameters"][0]["schema"]["pattern"] == "^orders/[^/]+$"
    assert cancel["responses"]["default"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "google.rpc.Status"
    )
    assert set(doc["components"]["securitySchemes"]) == {"bearerAuth", "apiKey"}
    watch = doc["paths"]["/v1/orders:watch"]["get"]["responses"]["200"]["content"]
    assert "application/x-ndjson" in watch


def test_jwks_file_and_key_rotation_on_reload(tmp_path: Path) -> None:
    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(key: Any, kid: str) -> str:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwk.update(kid=kid, alg="RS256", use="sig")
        return json.dumps({"keys": [jwk]})

    (tmp_path / "jwks.json").write_text(jwks(k1, "one"))
    cfg = AuthConfig.from_mapping(
        {"jwt": {"jwks_file": "jwks.json", "audience": "shop"}}, base_dir=tmp_path
    )
    authn = Authenticator(cfg)
    exp = int(time.time()) + 60
    t1 = jwt.encode(
        {"sub": "a", "aud": "shop", "exp": exp}, k1, algorithm="RS256", headers={"kid": "one"}
    )
    t2 = jwt.encode(
        {"sub": "b", "aud": "shop", "exp": exp}, k2, algorithm="RS256", headers={"kid": "two"}
    )
    assert authn.verify_jwt(t1).subject == "a"
    with pytest.raises(AuthError):
        authn.verify_jwt(t2)
    (tmp_path / "jwks.json").write_text(jwks(k2, "two"))
    assert cfg.keys is not None
    cfg.keys.reload()
    assert authn.verify_jwt(t2).subject == "b"
    with pytest.raises(AuthError):
        authn.verify_jwt(t1)
    no_exp = jwt.encode({"sub": "c", "aud": "shop"}, k2, algorithm="RS256", headers={"kid": "two"})
    with pytest.raises(AuthError, match="exp"):
        authn.verify_jwt(no_exp)


async def test_gateway_span_context_is_passed_upstream_as_traceparent() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from meshkit.gateway.edge.observability import TelemetryMiddleware

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.extend(v.decode() for k, v in scope["headers"] if k == b"traceparent")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    mw = TelemetryMiddleware(app, tracer_provider=provider, access_logs=False)
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://t") as c:
        assert (await c.get("/v1/x", headers={"traceparent": incoming})).status_code == 200
    (span,) = exporter.get_finished_spans()
    ctx = span.get_span_context()
    assert format(ctx.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert span.parent is not None and format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert seen == [f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"]


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def test_subject_limits_and_required_claims(fake_clock: FakeClock) -> None:
    from meshkit.gateway.edge.auth import AuthMiddleware, AuthPolicy

    secret = "s" * 40
    cfg = AuthConfig.from_mapping({"jwt": {"keys": [{"algorithm": "HS256", "secret": secret}]}})
    limited = RateLimitMiddleware(
        _ok_app,
        RateLimitRule.from_mapping({"rate": 1, "per": "60s", "key": "subject"}, "r"),
        clock=fake_clock,
    )
    app = AuthMiddleware(limited, Authenticator(cfg), AuthPolicy("jwt", claims={"tenant": "acme"}))

    def token(sub: str, tenant: str) -> dict[str, str]:
        t = jwt.encode(
            {"sub": sub, "tenant": tenant, "exp": int(time.time()) + 60}, secret, algorithm="HS256"
        )
        return {"authorization": f"Bearer {t}"}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/", headers=token("alice", "acme"))).status_code == 200
        assert (await c.get("/", headers=token("alice", "acme"))).status_code == 429
        assert (await c.get("/", headers=token("bob", "acme"))).status_code == 200
        r = await c.get("/", headers=token("carol", "other"))
        assert r.status_code == 403
        assert "tenant" in r.json()["message"]


def test_openapi_cli_writes_a_valid_document(shop_descriptor_set: Path, tmp_path: Path) -> None:
    from openapi_spec_validator import validate

    from meshkit.cli import main

    out = tmp_path / "openapi.json"
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("edge:\n  profiles:\n    mobile: {prefix: /m}\n")
    assert (
        main(
            [
                "openapi",
                "--descriptor-set",
                str(shop_descriptor_set),
                "--config",
                str(cfg),
                "--profile",
                "mobile",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    validate(doc)
    assert "/m/v1/orders/{order_id}" in doc["paths"]
    assert (
        main(
            [
                "openapi",
                "--descriptor-set",
                str(shop_descriptor_set),
                "--config",
                str(cfg),
                "--profile",
                "web",
                "-o",
                str(out),
            ]
        )
        == 2
    )


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (b"Bearer abc.def", "abc.def"),
        ("bearer  abc ", "abc"),
        (b"BEARER x", "x"),
        (b"Bearer ", None),
        (b"Basic dXNlcjpwdw==", None),
        (b"Bearerabc", None),
        (None, None),
    ],
)
def test_bearer_token_is_read_one_way_everywhere(
    value: str | bytes | None, token: str | None
) -> None:
    assert bearer_token(value) == token


def test_durations_share_one_grammar_and_zero_only_where_it_means_something(
    tmp_path: Path,
) -> None:
    secret = {"keys": [{"kid": "k", "algorithm": "HS256", "secret": "s" * 32}]}
    # A leeway of zero is a valid choice, written either way.
    for leeway in (0, "0s"):
        cfg = AuthConfig.from_mapping({"jwt": {**secret, "leeway": leeway}}, base_dir=tmp_path)
        assert cfg.jwt is not None and cfg.jwt.leeway == 0.0
    cfg = AuthConfig.from_mapping({"jwt": {**secret, "leeway": "1m30s"}}, base_dir=tmp_path)
    assert cfg.jwt is not None and cfg.jwt.leeway == 90.0
    with pytest.raises(ConfigError) as ei:
        AuthConfig.from_mapping({"jwt": {**secret, "leeway": "-1s"}}, base_dir=tmp_path, path="a")
    assert ei.value.path == "a.jwt.leeway"
    # A TTL or a timeout of zero means nothing: refused, naming the key and the value.
    doc = {"edge": {"profiles": {"web": {"routes": [{"cache": {"ttl": "0s"}}]}}}}
    with pytest.raises(ConfigError) as ei:
        EdgeConfig.from_mapping(doc)
    assert ei.value.path == "edge.profiles.web.routes[0].cache.ttl"
    assert str(ei.value).endswith('expected a duration > 0, got "0s"'), str(ei.value)
    opts = GatewayOptions.from_mapping({"default_timeout": "1m30s", "max_timeout": "2m"})
    assert (opts.default_timeout, opts.max_timeout) == (90.0, 120.0)
    with pytest.raises(ConfigError) as ei:
        GatewayOptions.from_mapping({"route_timeouts": {"p.S.M": 0}})
    assert ei.value.path == "gateway.route_timeouts.p.S.M"


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        # The policy document's readers and wording: the value as written in JSON.
        ({"rate": "fast"}, 'expected a number >= 0, got "fast"'),
        ({"rate": 1, "burst": 1.5}, "expected an integer >= 0, got 1.5"),
        ({"rate": 1, "burst": True}, "expected an integer >= 0, got true"),
    ],
)
def test_number_errors_say_what_was_expected(limit: dict[str, Any], message: str) -> None:
    doc = {"edge": {"profiles": {"web": {"routes": [{"rate_limit": limit}]}}}}
    with pytest.raises(ConfigError) as ei:
        EdgeConfig.from_mapping(doc)
    assert str(ei.value).endswith(message), str(ei.value)
