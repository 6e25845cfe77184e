"""Edge auth and rate limits against a real loopback shop backend."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshkit.gateway.auth import hash_api_key
from meshkit.gateway.edge import EdgeApp, create_edge_app
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
    from meshkit.gateway.auth import AuthConfig
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
    from meshkit.gateway.auth import AuthConfig
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
