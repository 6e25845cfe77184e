"""Edge auth and rate limits against a real loopback shop backend."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
import pytest_asyncio
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshkit.auth import hash_api_key
from meshkit.gateway.edge.edge import EdgeApp, create_edge_app
from tests.integration._edge_backends import ShopBackend, edge_client

pytestmark = pytest.mark.integration

HS_SECRET = "0123456789abcdef0123456789abcdef-secret"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_PUB = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
EC_PUB = EC_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "sub": "user-1",
        "iss": "https://id.test",
        "aud": "shop",
        "iat": now,
        "exp": now + 300,
        "scope": "orders.read",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = b"" if key is None else hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(sig)}"


@pytest.fixture
async def backend() -> AsyncIterator[ShopBackend]:
    b = await ShopBackend("blue").start()
    yield b
    await b.stop(None)


def edge_config(tmp_path: Path, target: str) -> dict[str, Any]:
    (tmp_path / "rsa.pem").write_bytes(RSA_PUB)
    (tmp_path / "ec.pem").write_bytes(EC_PUB)
    return {
        "upstreams": {"default": target},
        "edge": {
            "auth": {
                "jwt": {
                    "issuer": "https://id.test",
                    "audience": "shop",
                    "leeway": "5s",
                    "keys": [
                        {"kid": "hs", "algorithm": "HS256", "secret": HS_SECRET},
                        {"kid": "rsa1", "algorithm": "RS256", "file": str(tmp_path / "rsa.pem")},
                        {"kid": "ec1", "algorithm": "ES256", "file": str(tmp_path / "ec.pem")},
                    ],
                    "forward_claims": ["sub", "scope"],
                },
                "api_keys": {
                    "header": "x-api-key",
                    "query": "api_key",
                    "keys": [
                        {
                            "name": "small",
                            "sha256": hash_api_key("key-small"),
                            "rate_limit": {"rate": 2, "per": "60s", "burst": 2},
                        },
                        {"name": "big", "sha256": hash_api_key("key-big")},
                    ],
                },
                "forward_authorization": False,
            },
            "profiles": {
                "web": {
                    "routes": [
                        {"match": {"rpc": "shop.v1.*"}, "auth": {"require": "jwt"}},
                        {
                            "match": {"rpc": "shop.v1.PaymentService.*"},
                            "auth": {"require": "jwt", "scopes": ["payments.read"]},
                        },
                        {
                            "match": {"rpc": "shop.v1.ShippingService.*"},
                            "auth": {"require": "api_key"},
                        },
                    ]
                }
            },
        },
    }


@pytest.fixture
async def edge(
    tmp_path: Path, backend: ShopBackend, shop_descriptor_set: Path
) -> AsyncIterator[EdgeApp]:
    app = create_edge_app(edge_config(tmp_path, backend.target), shop_descriptor_set)
    yield app
    await app.shutdown()


@pytest.fixture
async def client(edge: EdgeApp) -> AsyncIterator[httpx.AsyncClient]:
    async with edge_client(edge.asgi()) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_valid_tokens_of_each_algorithm_pass_and_claims_are_forwarded(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    tokens = [
        jwt.encode(claims(), HS_SECRET, algorithm="HS256", headers={"kid": "hs"}),
        jwt.encode(claims(sub="rs-user"), RSA_KEY, algorithm="RS256", headers={"kid": "rsa1"}),
        jwt.encode(claims(sub="es-user"), EC_KEY, algorithm="ES256", headers={"kid": "ec1"}),
    ]
    for tok in tokens:
        r = await client.get("/v1/orders/o-1", headers=bearer(tok))
        assert r.status_code == 200, r.text
        assert r.json()["orderId"] == "o-1"
    subs = [m.get("x-jwt-sub") for m in backend.metadata]
    assert subs == ["user-1", "rs-user", "es-user"]
    fwd = json.loads(backend.metadata[0]["x-jwt-claims"])
    assert fwd == {"sub": "user-1", "scope": "orders.read"}
    # forward_authorization: false strips the token before the upstream sees it, however
    # it was spelled.
    r = await client.get(
        "/v1/orders/o-1",
        headers={**bearer(tokens[0]), "grpc-metadata-authorization": "Bearer smuggled"},
    )
    assert r.status_code == 200, r.text
    assert len(backend.metadata) == 4
    assert all("authorization" not in m for m in backend.metadata)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda: jwt.encode(
                claims(exp=int(time.time()) - 60),
                HS_SECRET,
                algorithm="HS256",
                headers={"kid": "hs"},
            ),
            "expired",
        ),
        (
            lambda: (
                jwt.encode(claims(), HS_SECRET, algorithm="HS256", headers={"kid": "hs"})[:-4]
                + "AAAA"
            ),
            "signature",
        ),
        (
            lambda: jwt.encode(
                claims(aud="someone-else"), RSA_KEY, algorithm="RS256", headers={"kid": "rsa1"}
            ),
            "audience",
        ),
        (
            lambda: jwt.encode(
                claims(iss="https://evil.test"), RSA_KEY, algorithm="RS256", headers={"kid": "rsa1"}
            ),
            "issuer",
        ),
        (
            lambda: jwt.encode(
                claims(nbf=int(time.time()) + 120),
                HS_SECRET,
                algorithm="HS256",
                headers={"kid": "hs"},
            ),
            "not valid yet",
        ),
        (lambda: forge({"alg": "none", "typ": "JWT"}, claims(), None), "algorithm"),
        # Algorithm confusion: HS256 "signed" with the RSA public key as the HMAC secret.
        (lambda: forge({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}, claims(), RSA_PUB), "key"),
        (lambda: forge({"alg": "HS256", "typ": "JWT"}, claims(), RSA_PUB), "signature"),
        (lambda: "not-a-token", "malformed"),
    ],
    ids=[
        "expired",
        "tampered",
        "wrong-audience",
        "wrong-issuer",
        "nbf",
        "alg-none",
        "hs-rs-confusion-kid",
        "hs-rs-confusion",
        "garbage",
    ],
)
async def test_bad_tokens_are_rejected_with_401_and_a_status_body(
    client: httpx.AsyncClient, backend: ShopBackend, make: Any, reason: str
) -> None:
    token = make()
    r = await client.get("/v1/orders/o-1", headers=bearer(token))
    assert r.status_code == 401
    body = r.json()
    assert body["code"] == 16  # UNAUTHENTICATED
    assert reason in body["message"]
    assert token not in r.text and HS_SECRET not in r.text
    assert r.headers["www-authenticate"].startswith('Bearer realm="meshkit"')
    assert backend.calls["GetOrder"] == 0


async def test_missing_credentials_and_missing_scope(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    r = await client.get("/v1/orders/o-1")
    assert r.status_code == 401
    assert "needs a bearer token" in r.json()["message"]
    tok = jwt.encode(claims(), HS_SECRET, algorithm="HS256", headers={"kid": "hs"})
    r = await client.get("/v1/payments/p-1", headers=bearer(tok))
    assert r.status_code == 403
    assert r.json()["code"] == 7  # PERMISSION_DENIED
    assert "payments.read" in r.json()["message"]
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    tok = jwt.encode(
        claims(scope="orders.read payments.read"),
        HS_SECRET,
        algorithm="HS256",
        headers={"kid": "hs"},
    )
    r = await client.get("/v1/payments/p-1", headers=bearer(tok))
    assert r.status_code == 200
    assert backend.calls["GetPayment"] == 1


async def test_spoofed_jwt_metadata_is_removed(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    r = await client.get(
        "/v1/shipments/s-1", headers={"x-api-key": "key-big", "grpc-metadata-x-jwt-sub": "admin"}
    )
    assert r.status_code == 200
    md = backend.metadata[-1]
    assert "x-jwt-sub" not in md
    assert md["x-api-key-name"] == "big"


async def test_api_key_over_its_limit_gets_429_while_another_key_passes(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    ok = [
        await client.get("/v1/shipments/s-1", headers={"x-api-key": "key-small"}) for _ in range(2)
    ]
    assert [r.status_code for r in ok] == [200, 200]
    r = await client.get("/v1/shipments/s-1", params={"api_key": "key-small"})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    body = r.json()
    assert body["code"] == 8  # RESOURCE_EXHAUSTED
    assert body["details"][0]["@type"].endswith("google.rpc.RetryInfo")
    for _ in range(5):
        r = await client.get("/v1/shipments/s-1", headers={"x-api-key": "key-big"})
        assert r.status_code == 200
    r = await client.get("/v1/shipments/s-1", headers={"x-api-key": "wrong"})
    assert r.status_code == 401
    assert "wrong" not in r.text
    assert backend.calls["GetShipment"] == 7


async def test_route_rate_limit_per_ip(shop_descriptor_set: Path, backend: ShopBackend) -> None:
    cfg = {
        "upstreams": {"default": backend.target},
        "edge": {
            "profiles": {
                "p": {
                    "routes": [
                        {
                            "match": {"rpc": "shop.v1.OrderService.GetOrder"},
                            "rate_limit": {"rate": 3, "per": "60s", "key": "ip"},
                        }
                    ]
                }
            }
        },
    }
    edge = create_edge_app(cfg, shop_descriptor_set)
    answers: list[httpx.Response] = []
    for ip in ("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2"):
        async with edge_client(edge.asgi(), client=(ip, 1234)) as c:
            answers.append(await c.get("/v1/orders/o-1"))
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 200]
    refused = answers[3]
    assert refused.headers["content-type"] == "application/json"
    assert int(refused.headers["retry-after"]) >= 1
    body = refused.json()
    assert body["code"] == 8, body  # RESOURCE_EXHAUSTED
    assert "rate limit exceeded" in body["message"]
    [info] = body["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.RetryInfo"
    assert info["retryDelay"].endswith("s")
    await edge.shutdown()


async def test_grpc_server_interceptor_verifies_the_same_tokens(tmp_path: Path) -> None:
    from examples.shop.gen.shop.v1 import orders_pb2, orders_pb2_grpc
    from meshkit.auth import AuthConfig
    from meshkit.grpc.auth import JwtServerInterceptor, current_claims

    cfg = AuthConfig.from_mapping(edge_config(tmp_path, "127.0.0.1:1")["edge"]["auth"])
    seen: list[Any] = []

    class Orders(orders_pb2_grpc.OrderServiceServicer):
        async def GetOrder(self, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
            seen.append(current_claims())
            return orders_pb2.Order(order_id=req.order_id)

    server = grpc.aio.server(
        interceptors=[JwtServerInterceptor(cfg, exempt=("/grpc.health.v1.Health/",))]
    )
    orders_pb2_grpc.add_OrderServiceServicer_to_server(Orders(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = orders_pb2_grpc.OrderServiceStub(ch)
            tok = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa1"})
            resp = await stub.GetOrder(
                orders_pb2.GetOrderRequest(order_id="o-9"),
                metadata=(("authorization", f"Bearer {tok}"),),
            )
            assert resp.order_id == "o-9"
            assert seen[0]["sub"] == "user-1"
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.GetOrder(orders_pb2.GetOrderRequest(order_id="o-9"))
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            bad = forge({"alg": "none"}, claims(), None)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.GetOrder(
                    orders_pb2.GetOrderRequest(order_id="o-9"),
                    metadata=(("authorization", f"Bearer {bad}"),),
                )
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert len(seen) == 1
    finally:
        await server.stop(None)


def test_sync_grpc_server_interceptor_verifies_the_same_tokens(tmp_path: Path) -> None:
    from concurrent import futures

    from examples.shop.gen.shop.v1 import orders_pb2, orders_pb2_grpc
    from meshkit.auth import AuthConfig
    from meshkit.grpc.auth import SyncJwtServerInterceptor, current_claims

    cfg = AuthConfig.from_mapping(edge_config(tmp_path, "127.0.0.1:1")["edge"]["auth"])
    seen: list[Any] = []

    class Orders(orders_pb2_grpc.OrderServiceServicer):
        def GetOrder(self, req: Any, ctx: grpc.ServicerContext) -> Any:
            seen.append(current_claims())
            return orders_pb2.Order(order_id=req.order_id)

        def WatchOrders(self, req: Any, ctx: grpc.ServicerContext) -> Any:
            for detail in ("a", "b"):
                seen.append(current_claims())
                yield orders_pb2.OrderEvent(order_id=req.order_id, detail=detail)

    pool = futures.ThreadPoolExecutor(max_workers=2)
    server = grpc.server(
        pool, interceptors=[SyncJwtServerInterceptor(cfg, required_scopes=["orders.read"])]
    )
    orders_pb2_grpc.add_OrderServiceServicer_to_server(Orders(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = orders_pb2_grpc.OrderServiceStub(ch)
            tok = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa1"})
            md = (("authorization", f"Bearer {tok}"),)
            assert stub.GetOrder(orders_pb2.GetOrderRequest(order_id="o-1"), metadata=md)
            events = list(
                stub.WatchOrders(orders_pb2.WatchOrdersRequest(order_id="o-1"), metadata=md)
            )
            assert [e.detail for e in events] == ["a", "b"]
            assert [c["sub"] for c in seen] == ["user-1"] * 3
            with pytest.raises(grpc.RpcError) as ei:
                stub.GetOrder(orders_pb2.GetOrderRequest(order_id="o-1"))
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            narrow = jwt.encode(
                claims(scope="other"), RSA_KEY, algorithm="RS256", headers={"kid": "rsa1"}
            )
            with pytest.raises(grpc.RpcError) as ei:
                list(
                    stub.WatchOrders(
                        orders_pb2.WatchOrdersRequest(order_id="o-1"),
                        metadata=(("authorization", f"Bearer {narrow}"),),
                    )
                )
            assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert len(seen) == 3  # no handler ran for a refused call
        # The claims do not outlive their call on the worker threads.
        assert pool.submit(current_claims).result() is None
    finally:
        server.stop(None)


# --------------------------------------------------------------------------- attack matrix

ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_EC384 = ec.generate_private_key(ec.SECP384R1())


def sign(header: dict[str, Any], payload: Any, alg: str, key: Any) -> str:
    """A compact JWS over exactly ``header`` and ``payload`` (PyJWT's encoder refuses
    some of the malformed headers below, so the token is assembled by hand)."""
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    algo = jwt.get_algorithm_by_name(alg)
    sig = algo.sign(signing.encode(), algo.prepare_key(key) if isinstance(key, str) else key)
    return f"{signing}.{b64(sig)}"


def hs(payload: Any, **header: Any) -> str:
    """Signed with the configured HS256 secret: only the header or claims are wrong."""
    return sign({"alg": "HS256", "typ": "JWT", "kid": "hs", **header}, payload, "HS256", HS_SECRET)


def _attacker_jwk() -> dict[str, Any]:
    out: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(ATTACKER_RSA.public_key()))
    return out


def _long_token() -> str:
    good = hs(claims(pad="x" * 9000))
    return good[:-8] + ("A" if good[-8] != "A" else "B") + good[-7:]


# RFC 8725 (JWT BCP) and RFC 7515/7519: each row must be refused with 401 by the edge and
# UNAUTHENTICATED by the gRPC interceptor, whatever part of the token is wrong.
ATTACKS: list[tuple[str, Any]] = [
    ("alg-none", lambda: forge({"alg": "none", "typ": "JWT"}, claims(), None)),
    ("alg-None", lambda: forge({"alg": "None", "typ": "JWT"}, claims(), None)),
    ("alg-NONE", lambda: forge({"alg": "NONE", "typ": "JWT"}, claims(), None)),
    ("alg-nOnE", lambda: forge({"alg": "nOnE", "typ": "JWT"}, claims(), None)),
    ("empty-signature", lambda: hs(claims()).rsplit(".", 1)[0] + "."),
    (
        "hs256-keyed-with-rs256-pem",
        lambda: forge({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}, claims(), RSA_PUB),
    ),
    (
        "jwk-header-injection",
        lambda: sign({"alg": "RS256", "jwk": _attacker_jwk()}, claims(), "RS256", ATTACKER_RSA),
    ),
    (
        "jku-header-injection",
        lambda: sign(
            {"alg": "RS256", "kid": "rsa1", "jku": "https://evil.test/jwks.json"},
            claims(),
            "RS256",
            ATTACKER_RSA,
        ),
    ),
    (
        "x5u-header-injection",
        lambda: sign(
            {"alg": "RS256", "x5u": "https://evil.test/cert.pem"}, claims(), "RS256", ATTACKER_RSA
        ),
    ),
    (
        "kid-path-traversal",
        lambda: sign({"alg": "HS256", "kid": "../../dev/null"}, claims(), "HS256", hmac_key(b"")),
    ),
    ("kid-sql", lambda: hs(claims(), kid="x' UNION SELECT 'secret")),
    ("kid-int", lambda: hs(claims(), kid=1)),
    ("kid-list", lambda: hs(claims(), kid=["hs"])),
    ("kid-object", lambda: hs(claims(), kid={"id": "hs"})),
    ("kid-unknown", lambda: hs(claims(), kid="nope")),
    (
        "alg-hs512-not-allowed",
        lambda: sign({"alg": "HS512", "kid": "hs"}, claims(), "HS512", HS_SECRET),
    ),
    (
        "alg-es384-not-allowed",
        lambda: sign({"alg": "ES384", "kid": "ec1"}, claims(), "ES384", ATTACKER_EC384),
    ),
    (
        "alg-es256-wrong-key",
        lambda: sign({"alg": "ES256", "kid": "rsa1"}, claims(), "ES256", EC_KEY),
    ),
    ("exp-string", lambda: hs(claims(exp=str(int(time.time()) + 300)))),
    ("exp-bool", lambda: hs(claims(exp=True))),
    ("nbf-string", lambda: hs(claims(nbf=str(int(time.time()) - 10)))),
    ("iat-string", lambda: hs(claims(iat=str(int(time.time()))))),
    ("iat-bool", lambda: hs(claims(iat=False))),
    ("aud-number", lambda: hs(claims(aud=42))),
    ("iss-list", lambda: hs(claims(iss=["https://id.test"]))),
    ("sub-number", lambda: hs(claims(sub=7))),
    ("expired", lambda: hs(claims(exp=int(time.time()) - 60))),
    ("not-yet-valid", lambda: hs(claims(nbf=int(time.time()) + 120))),
    ("wrong-aud", lambda: hs(claims(aud="elsewhere"))),
    ("wrong-iss", lambda: hs(claims(iss="https://evil.test"))),
    ("no-exp", lambda: hs(claims(exp=None))),
    ("crit-exp", lambda: hs(claims(), crit=["exp"])),
    ("crit-empty", lambda: hs(claims(), crit=[])),
    ("crit-b64", lambda: hs(claims(), crit=["b64"], b64=True)),
    ("truncated", lambda: hs(claims())[:-20]),
    ("two-segments", lambda: hs(claims()).rsplit(".", 1)[0]),
    ("four-segments", lambda: hs(claims()) + ".AAAA"),
    ("not-base64url", lambda: "!!!!.@@@@.####"),
    ("header-is-array", lambda: f"{b64(b'[]')}.{b64(json.dumps(claims()).encode())}.AAAA"),
    ("payload-is-array", lambda: hs(["not", "claims"])),
    ("very-long", _long_token),
    ("junk-9kib", lambda: "e" * 9 * 1024),
]


def hmac_key(secret: bytes) -> Any:
    """An HMAC key PyJWT would refuse to build itself (empty: the ``/dev/null`` kid trick)."""
    return secret


@pytest.mark.parametrize("make", [m for _, m in ATTACKS], ids=[n for n, _ in ATTACKS])
async def test_attack_matrix_is_401_everywhere_and_never_reaches_an_upstream(
    tmp_path: Path,
    backend: ShopBackend,
    shop_descriptor_set: Path,
    caplog: pytest.LogCaptureFixture,
    make: Any,
) -> None:
    from examples.shop.gen.shop.v1 import orders_pb2, orders_pb2_grpc
    from meshkit.auth import AuthConfig
    from meshkit.grpc.auth import JwtServerInterceptor

    caplog.set_level(logging.DEBUG)
    token = make()
    cfg = edge_config(tmp_path, backend.target)
    edge = create_edge_app(cfg, shop_descriptor_set)
    try:
        async with edge_client(edge.asgi()) as c:
            r = await c.get("/v1/orders/o-1", headers=bearer(token))
    finally:
        await edge.shutdown()
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["code"] == 16  # UNAUTHENTICATED
    assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="meshkit"') and 'error="invalid_token"' in challenge
    assert r.headers.get("x-request-id")
    assert sum(backend.calls.values()) == 0

    # The same token at a service behind the edge.
    seen: list[str] = []

    class Orders(orders_pb2_grpc.OrderServiceServicer):
        async def GetOrder(self, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
            seen.append(req.order_id)
            return orders_pb2.Order(order_id=req.order_id)

    server = grpc.aio.server(
        interceptors=[JwtServerInterceptor(AuthConfig.from_mapping(cfg["edge"]["auth"]))],
        # gRPC core refuses metadata over 8 KiB itself (RESOURCE_EXHAUSTED) before any
        # interceptor runs; raised here so the long tokens reach the interceptor too.
        options=[("grpc.max_metadata_size", 64 * 1024)],
    )
    orders_pb2_grpc.add_OrderServiceServicer_to_server(Orders(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await orders_pb2_grpc.OrderServiceStub(ch).GetOrder(
                    orders_pb2.GetOrderRequest(order_id="o-1"),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
    finally:
        await server.stop(None)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, ei.value.details()
    assert seen == []

    # Neither the token (nor a recognisable part of it) nor a traceback is anywhere.
    parts = [p for p in token.split(".") if len(p) >= 8] or [token]
    texts = [r.text, challenge, ei.value.details() or "", caplog.text]
    for text in texts:
        assert not any(p in text for p in parts), text[:300]
    assert "Traceback" not in caplog.text
    assert not [rec for rec in caplog.records if rec.exc_info]


async def test_missing_token_gets_a_bare_bearer_challenge(client: httpx.AsyncClient) -> None:
    """RFC 6750 §3.1: a request with no credentials gets no error code in the challenge."""
    r = await client.get("/v1/orders/o-1")
    assert r.status_code == 401
    assert r.json()["code"] == 16
    assert r.headers["www-authenticate"] == 'Bearer realm="meshkit"'
    r = await client.get("/v1/orders/o-1", headers={"authorization": "Basic dXNlcjpwdw=="})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="meshkit"'


async def test_edge_refusals_carry_a_request_id(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    """Answers written by the edge itself (401, 429, the ops and admin endpoints) carry the
    id: the client's when it is a sane token, else a generated one."""
    for _ in range(2):
        await client.get("/v1/shipments/s-1", headers={"x-api-key": "key-small"})
    limited = await client.get("/v1/shipments/s-1", headers={"x-api-key": "key-small"})
    assert limited.status_code == 429
    assert limited.headers.get("x-request-id")
    r = await client.get("/v1/orders/o-1", headers={"x-request-id": "edge-rid-1"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "edge-rid-1"
    r = await client.get("/v1/nothing/here")
    assert r.status_code == 404 and r.headers.get("x-request-id")
    # Answered outside any profile's gateway: the ops endpoints and the admin endpoint.
    r = await client.post("/admin/reload", headers={"x-request-id": "adm 1"})
    assert r.status_code == 404 and r.headers["x-request-id"] not in ("", "adm 1")
    r = await client.get("/healthz", headers={"x-request-id": "hz-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "hz-1"


async def test_credentials_never_reach_the_access_log_or_spans(
    tmp_path: Path,
    backend: ShopBackend,
    shop_descriptor_set: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from meshkit.gateway.edge.observability import Redactor, TelemetryMiddleware

    caplog.set_level(logging.DEBUG)
    edge = create_edge_app(edge_config(tmp_path, backend.target), shop_descriptor_set)
    secrets = ["key-big", "wrong-secret-123", "tok-secret-456", "cookie-secret", "bearer-sec"]
    try:
        async with edge_client(edge.asgi()) as c:
            ok = await c.get("/v1/shipments/s-1?api_key=key-big&page=2")
            assert ok.status_code == 200
            bad = await c.get("/v1/shipments/s-1?API%5Fkey=x&api_key=wrong-secret-123")
            assert bad.status_code == 401
            r = await c.get(
                "/v1/shipments/s-1?access_token=tok-secret-456",
                headers={
                    "x-api-key": "key-big",
                    "cookie": "session=cookie-secret",
                    "authorization": "Bearer bearer-sec",
                    "proxy-authorization": "Basic bearer-sec",
                },
            )
            assert r.status_code == 200
    finally:
        await edge.shutdown()
    lines = [
        json.loads(rec.getMessage())
        for rec in caplog.records
        if rec.name == "meshkit.gateway.access"
    ]
    assert [line["status"] for line in lines] == [200, 401, 200]
    assert lines[0]["query"] == "api_key=[REDACTED]&page=2"  # the name stays, the value goes
    assert lines[1]["query"] == "API%5Fkey=[REDACTED]&api_key=[REDACTED]"
    assert lines[2]["query"] == "access_token=[REDACTED]"
    # Everything the server side logged (the test's own httpx client logs its URLs).
    server_log = "\n".join(
        rec.getMessage() for rec in caplog.records if not rec.name.startswith(("httpx", "httpcore"))
    )
    assert "api_key" in server_log
    assert not [s for s in secrets if s in server_log]

    # Spans carry the query too, redacted the same way.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mw = TelemetryMiddleware(
        _ok_app,
        tracer_provider=provider,
        access_logs=False,
        redactor=Redactor.for_names(query=["api_key"], headers=["x-api-key"]),
    )
    async with edge_client(mw) as c:
        await c.get("/v1/x?api_key=key-big&n=1", headers={"x-api-key": "key-big"})
    (span,) = exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert attrs["url.query"] == "api_key=[REDACTED]&n=1"
    assert "key-big" not in json.dumps({k: str(v) for k, v in attrs.items()}) + span.name


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


# --------------------------------------------------------------------------- over a socket
# The same matrix sent over a real socket to a running ``meshkit edge`` (one process for
# the module), configured with the same keys from files; its log is read back for the
# token and for tracebacks.


@dataclass
class EdgeProcess:
    url: str
    log: Path
    backend: ShopBackend
    proc: subprocess.Popen[bytes]

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def logged(self, request_id: str, timeout: float = 10.0) -> str:
        """The log once the access line of ``request_id`` is in it (the process writes it
        after answering)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        needle = f'"request_id":"{request_id}"'
        while True:
            text = self.text()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"edge exited {self.proc.returncode}: {text}")
            if loop.time() > end:
                raise AssertionError(f"no access line for {request_id}: {text[-2000:]}")
            await asyncio.sleep(0.02)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def edge_cli(
    tmp_path_factory: pytest.TempPathFactory, shop_descriptor_set: Path
) -> AsyncIterator[EdgeProcess]:
    from tests.conftest import ROOT, free_port

    tmp = tmp_path_factory.mktemp("edge-auth-cli")
    backend = await ShopBackend("blue").start()
    cfg = tmp / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(edge_config(tmp, backend.target)))
    log = tmp / "edge.log"
    port = free_port()
    args = ["--descriptor-set", str(shop_descriptor_set), "--config", str(cfg)]
    proc = subprocess.Popen(
        # -v: whatever logs at DEBUG must not carry the token either.
        [sys.executable, "-m", "meshkit.cli", "-v", "edge", *args, "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    edge = EdgeProcess(f"http://127.0.0.1:{port}", log, backend, proc)
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 60
        async with httpx.AsyncClient(timeout=2) as c:
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"edge exited {proc.returncode}: {edge.text()}")
                try:
                    if (await c.get(edge.url + "/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if loop.time() > end:
                    raise AssertionError(f"edge not up: {edge.text()}")
                await asyncio.sleep(0.05)
        yield edge
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            end = loop.time() + 20
            # Polled: the backend the edge drains against runs on this loop.
            while proc.poll() is None and loop.time() < end:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        await backend.stop(None)
    assert proc.returncode == 0, edge.text()
    assert "Traceback" not in edge.text(), edge.text()


def _token_parts(token: str) -> list[str]:
    """The token and every recognisable piece of it (a segment of 8 characters or more)."""
    return [p for p in token.split(".") if len(p) >= 8] or [token]


@pytest.mark.asyncio(loop_scope="module")
async def test_valid_tokens_pass_through_the_edge_cli(edge_cli: EdgeProcess) -> None:
    """The harness can succeed: each algorithm's valid token reaches the upstream."""
    tokens = [
        jwt.encode(claims(), HS_SECRET, algorithm="HS256", headers={"kid": "hs"}),
        jwt.encode(claims(sub="rs-user"), RSA_KEY, algorithm="RS256", headers={"kid": "rsa1"}),
        jwt.encode(claims(sub="es-user"), EC_KEY, algorithm="ES256", headers={"kid": "ec1"}),
    ]
    backend = edge_cli.backend
    before = backend.calls["GetOrder"]
    seen = len(backend.metadata)
    async with httpx.AsyncClient(base_url=edge_cli.url, timeout=10) as c:
        for i, tok in enumerate(tokens):
            rid = f"valid-{i}"
            r = await c.get("/v1/orders/o-1", headers={**bearer(tok), "x-request-id": rid})
            assert r.status_code == 200, r.text
            assert r.json()["orderId"] == "o-1"
            assert r.headers["x-request-id"] == rid
    assert backend.calls["GetOrder"] == before + 3
    subs = [m.get("x-jwt-sub") for m in backend.metadata[seen:]]
    assert subs == ["user-1", "rs-user", "es-user"]
    assert all("authorization" not in m for m in backend.metadata[seen:])
    text = await edge_cli.logged("valid-2")
    assert not [p for tok in tokens for p in _token_parts(tok) if p in text]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("make", [m for _, m in ATTACKS], ids=[n for n, _ in ATTACKS])
async def test_attack_matrix_over_a_socket_to_the_edge_cli(
    edge_cli: EdgeProcess, request: pytest.FixtureRequest, make: Any
) -> None:
    token = make()
    rid = f"attack-{request.node.callspec.id}"
    backend = edge_cli.backend
    before = sum(backend.calls.values())
    async with httpx.AsyncClient(base_url=edge_cli.url, timeout=10) as c:
        r = await c.get("/v1/orders/o-1", headers={**bearer(token), "x-request-id": rid})
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["code"] == 16  # UNAUTHENTICATED
    assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="meshkit"') and 'error="invalid_token"' in challenge
    assert r.headers["x-request-id"] == rid
    text = await edge_cli.logged(rid)
    assert sum(backend.calls.values()) == before  # never reached the upstream
    parts = _token_parts(token)
    for where in (r.text, challenge, text):
        assert not [p for p in parts if p in where], where[-2000:]
    assert "Traceback" not in text, text[-4000:]
