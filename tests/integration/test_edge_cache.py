"""Edge response cache, shaping, CORS and ops endpoints against a real loopback backend."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshkit.gateway.edge.edge import EdgeApp, create_edge_app
from meshkit.gateway.edge.profiles import EdgeConfig
from tests.integration._edge_backends import ShopBackend, edge_client

pytestmark = pytest.mark.integration


@pytest.fixture
async def backend() -> AsyncIterator[ShopBackend]:
    b = await ShopBackend("blue").start()
    yield b
    await b.stop(None)


def config(target: str) -> dict[str, Any]:
    return {
        "upstreams": {"default": target},
        "edge": {
            "profiles": {
                "web": {
                    "cors": {"allow_origins": ["https://shop.example"]},
                    "routes": [
                        {
                            "match": {"rpc": "shop.v1.OrderService.GetOrder"},
                            "cache": {"ttl": "30s", "vary": ["accept-language"]},
                        },
                    ],
                },
                "mobile": {
                    "prefix": "/mobile",
                    "shaping": {
                        "add_headers": {"x-profile": "mobile"},
                        "remove_headers": ["grpc-metadata-x-trace"],
                    },
                    "routes": [
                        {
                            "match": {"rpc": "shop.v1.OrderService.*"},
                            "shaping": {
                                "fields": ["orderId", "status", "total.amountMinor", "items.sku"],
                                "rename": {"orderId": "id"},
                            },
                        },
                    ],
                },
            }
        },
    }


@pytest.fixture
async def edge(backend: ShopBackend, shop_descriptor_set: Path) -> AsyncIterator[EdgeApp]:
    app = create_edge_app(config(backend.target), shop_descriptor_set)
    yield app
    await app.shutdown()


@pytest.fixture
async def client(edge: EdgeApp) -> AsyncIterator[httpx.AsyncClient]:
    async with edge_client(edge.asgi()) as c:
        yield c


async def test_cached_response_is_served_without_an_upstream_call_and_revalidated(
    client: httpx.AsyncClient, backend: ShopBackend, edge: EdgeApp, shop_descriptor_set: Path
) -> None:
    first = await client.get("/v1/orders/o-1")
    assert first.status_code == 200
    assert first.headers["x-cache"] == "MISS"
    etag = first.headers["etag"]
    assert backend.calls["GetOrder"] == 1

    second = await client.get("/v1/orders/o-1")
    assert second.status_code == 200
    assert second.headers["x-cache"] == "HIT"
    assert second.content == first.content
    assert second.headers["etag"] == etag
    assert backend.calls["GetOrder"] == 1

    revalidated = await client.get("/v1/orders/o-1", headers={"if-none-match": etag})
    assert revalidated.status_code == 304
    assert revalidated.content == b""
    assert backend.calls["GetOrder"] == 1

    # Another vary value and another path are other entries.
    await client.get("/v1/orders/o-1", headers={"accept-language": "ko"})
    await client.get("/v1/orders/o-2")
    assert backend.calls["GetOrder"] == 3

    # The client asks for a fresh answer: the upstream is called and the entry refreshed.
    fresh = await client.get("/v1/orders/o-1", headers={"cache-control": "no-cache"})
    assert fresh.status_code == 200 and fresh.headers["x-cache"] == "MISS"
    assert backend.calls["GetOrder"] == 4

    # Reload invalidates the cache.
    await edge.reload(EdgeConfig.from_mapping(config(backend.target)))
    again = await client.get("/v1/orders/o-1")
    assert again.headers["x-cache"] == "MISS"
    assert backend.calls["GetOrder"] == 5


async def test_unverified_credentials_are_never_cached(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    # The route needs no auth, so the gateway forwards Authorization unverified: the
    # upstream may answer per user, and a shared cache must not hand that to anyone else.
    alice = await client.get("/v1/orders/o-1", headers={"authorization": "Bearer alice"})
    bob = await client.get("/v1/orders/o-1", headers={"authorization": "Bearer bob"})
    assert alice.status_code == bob.status_code == 200
    assert "x-cache" not in alice.headers and "x-cache" not in bob.headers
    assert backend.calls["GetOrder"] == 2
    carol = await client.get(
        "/v1/orders/o-1", headers={"grpc-metadata-authorization": "Bearer carol"}
    )
    assert carol.status_code == 200 and "x-cache" not in carol.headers
    assert backend.calls["GetOrder"] == 3
    anonymous = await client.get("/v1/orders/o-1")
    assert anonymous.headers["x-cache"] == "MISS"
    assert backend.calls["GetOrder"] == 4


async def test_cli_option_overrides_reach_the_edge(
    backend: ShopBackend, shop_descriptor_set: Path
) -> None:
    # `meshkit gateway --strict` with an edge config: the override applies to every profile.
    edge = create_edge_app(
        config(backend.target), shop_descriptor_set, option_overrides={"strict": True}
    )
    try:
        async with edge_client(edge.asgi()) as c:
            r = await c.post("/v1/orders", json={"customerId": "c", "noSuchField": 1})
            assert r.status_code == 400, r.text
            assert "noSuchField" in r.json()["message"]
            await edge.reload(EdgeConfig.from_mapping(config(backend.target)))  # and after
            r = await c.post("/v1/orders", json={"customerId": "c", "noSuchField": 1})
            assert r.status_code == 400, r.text
    finally:
        await edge.shutdown()


async def test_errors_are_not_cached(client: httpx.AsyncClient, backend: ShopBackend) -> None:
    for _ in range(2):
        r = await client.get("/v1/orders/missing")
        assert r.status_code == 404
        assert r.json()["code"] == 5
    assert backend.calls["GetOrder"] == 2


async def test_mobile_profile_shapes_responses_by_prefix(client: httpx.AsyncClient) -> None:
    full = (await client.get("/v1/orders/o-7")).json()
    assert {"customerId", "shippingAddress", "labels"} <= set(full)
    r = await client.get("/mobile/v1/orders/o-7")
    assert r.status_code == 200
    assert r.json() == {
        "id": "o-7",
        "status": "ORDER_STATUS_CREATED",
        "total": {"amountMinor": "10000"},
        "items": [{"sku": "sku-1"}],
    }
    assert r.headers["x-profile"] == "mobile"
    assert int(r.headers["content-length"]) == len(r.content)


async def test_cors_preflight_and_simple_request(client: httpx.AsyncClient) -> None:
    pre = await client.options(
        "/v1/orders/o-1",
        headers={"origin": "https://shop.example", "access-control-request-method": "GET"},
    )
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "https://shop.example"
    assert "GET" in pre.headers["access-control-allow-methods"]
    r = await client.get("/v1/orders/o-1", headers={"origin": "https://shop.example"})
    assert r.headers["access-control-allow-origin"] == "https://shop.example"
    denied = await client.options(
        "/v1/orders/o-1",
        headers={"origin": "https://evil.example", "access-control-request-method": "GET"},
    )
    assert denied.status_code == 403
    assert "access-control-allow-origin" not in denied.headers
    assert denied.headers["content-type"] == "application/json"
    assert denied.json() == {
        "code": 7,  # PERMISSION_DENIED
        "message": "origin not allowed by the CORS policy",
        "details": [],
    }


async def test_ops_endpoints_access_log_and_metrics(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    with caplog.at_level(logging.INFO, logger="meshkit.gateway.access"):
        await client.get("/v1/orders/o-1", headers={"x-request-id": "rid-42"})
        await client.get("/v1/orders/o-1")
        await client.get("/mobile/v1/orders/o-1")
    lines = [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "meshkit.gateway.access"
    ]
    assert lines[0]["status"] == 200 and lines[0]["route"] == "shop.v1.OrderService.GetOrder"
    assert lines[0]["request_id"] == "rid-42"
    assert lines[0]["cache"] == "miss" and lines[1]["cache"] == "hit"
    assert lines[0]["profile"] == "web"
    assert lines[2]["profile"] == "mobile" and lines[2]["path"] == "/mobile/v1/orders/o-1"
    assert lines[2]["route"] == "shop.v1.OrderService.GetOrder"
    text = (await client.get("/metrics")).text
    assert 'meshkit_gateway_requests_total{code="200"' in text
    assert "meshkit_gateway_request_duration_seconds_bucket" in text
    assert 'result="hit"' in text
    assert "meshkit_gateway_upstream_healthy" in text
    doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    assert "/v1/orders/{order_id}" in doc["paths"]
    mobile = (await client.get("/mobile/openapi.json")).json()
    assert "/mobile/v1/orders/{order_id}" in mobile["paths"]
    assert "/v1/orders/{order_id}" not in mobile["paths"]


async def test_openapi_follows_a_reload(
    client: httpx.AsyncClient, backend: ShopBackend, edge: EdgeApp
) -> None:
    before = (await client.get("/mobile/openapi.json")).json()
    assert "/mobile/v1/orders/{order_id}" in before["paths"]

    def order_fields(doc: Any) -> list[str]:
        return list(doc["components"]["schemas"]["shop.v1.Order"]["properties"])[:2]

    assert order_fields((await client.get("/openapi.json")).json()) == ["orderId", "customerId"]
    cfg = config(backend.target)
    cfg["edge"]["profiles"]["mobile"]["prefix"] = "/m"
    cfg["gateway"] = {"proto_names": True}
    await edge.reload(EdgeConfig.from_mapping(cfg))
    after_web = (await client.get("/openapi.json")).json()
    assert order_fields(after_web) == ["order_id", "customer_id"]
    after = (await client.get("/m/openapi.json")).json()
    assert "/m/v1/orders/{order_id}" in after["paths"]
    assert (await client.get("/mobile/openapi.json")).status_code == 404


async def test_edge_metadata_cannot_be_spoofed_without_auth(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    r = await client.get(
        "/v1/orders/o-9",
        headers={
            "grpc-metadata-x-jwt-sub": "admin",
            "grpc-metadata-x-api-key-name": "root",
            "grpc-metadata-x-tenant": "acme",
        },
    )
    assert r.status_code == 200
    md = backend.metadata[-1]
    assert "x-jwt-sub" not in md and "x-api-key-name" not in md
    assert md["x-tenant"] == "acme"  # other Grpc-Metadata-* headers still pass


async def test_the_edge_mounts_under_a_prefix(edge: EdgeApp) -> None:
    # Mounted in Starlette under a path that needs percent-encoding: profiles, ops endpoints
    # and per-profile OpenAPI all answer below the mount point.
    from starlette.applications import Starlette
    from starlette.routing import Mount

    host = Starlette(routes=[Mount("/my api", app=edge.asgi())])
    async with edge_client(host) as c:
        assert (await c.get("/my%20api/healthz")).json() == {"status": "ok"}
        web = await c.get("/my%20api/v1/orders/o-1")
        assert web.status_code == 200, web.text
        assert web.json()["orderId"] == "o-1"
        mobile = await c.get("/my%20api/mobile/v1/orders/o-1")
        assert mobile.status_code == 200, mobile.text
        assert mobile.headers["x-profile"] == "mobile" and mobile.json()["id"] == "o-1"
        doc = (await c.get("/my%20api/mobile/openapi.json")).json()
        assert "/mobile/v1/orders/{order_id}" in doc["paths"]
        assert (await c.get("/v1/orders/o-1")).status_code == 404


async def test_streams_pass_through_profile_shaping_and_cache_unbuffered(
    backend: ShopBackend, shop_descriptor_set: Path
) -> None:
    # A profile that trims JSON bodies, on a route that also caches: a server stream must
    # still reach the client message by message (never held whole, never cached).
    cfg = config(backend.target)
    cfg["edge"]["profiles"]["web"]["shaping"] = {
        "fields": ["result.orderId"],
        "add_headers": {"x-shaped": "1"},
    }
    cfg["edge"]["profiles"]["web"]["routes"].append(
        {"match": {"rpc": "shop.v1.OrderService.WatchOrders"}, "cache": {"ttl": "30s"}}
    )
    edge = create_edge_app(cfg, shop_descriptor_set)
    app = edge.asgi()
    sent: list[dict[str, Any]] = []
    first_line = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_line.set()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/orders:watch",
        "raw_path": b"/v1/orders:watch",
        "query_string": b"orderId=o-1",
        "root_path": "",
        "headers": [(b"host", b"gw")],
        "client": ("127.0.0.1", 5000),
        "server": ("gw", 80),
    }
    try:
        serving = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(first_line.wait(), 5)  # before the stream has ended
        start = next(m for m in sent if m["type"] == "http.response.start")
        assert start["status"] == 200
        assert dict(start["headers"])[b"x-shaped"] == b"1"
        assert b'"first"' in b"".join(m.get("body", b"") for m in sent)
        backend.watch_gate.set()
        await asyncio.wait_for(serving, 5)
        body = b"".join(m.get("body", b"") for m in sent)
        assert [json.loads(line)["result"]["detail"] for line in body.splitlines()] == [
            "first",
            "second",
        ]
        assert backend.calls["WatchOrders"] == 1
    finally:
        await edge.shutdown()
