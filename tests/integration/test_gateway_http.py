"""The gateway ASGI app in front of real grpc.aio backends, driven by httpx's ASGI transport."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from meshkit.gateway import GatewayOptions, create_app
from tests.integration.gateway_backend import (
    Backend,
    descriptor_sets,
    free_port,
    serving,
)
from tests.integration.gateway_inputs import BAD_REQUESTS, garbage_bodies, is_long_header

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shop() -> AsyncIterator[Backend]:
    async with serving("shop") as b:
        yield b


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo() -> AsyncIterator[Backend]:
    async with serving("gwtest") as b:
        yield b


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app, client=("203.0.113.9", 4000)), base_url="http://gw"
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sc(shop: Backend) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(descriptor_sets()["shop"], [f"127.0.0.1:{shop.port}"])
    async with _client(app) as c:
        yield c


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ec(echo: Backend) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        descriptor_sets()["gwtest"],
        [f"127.0.0.1:{echo.port}"],
        options=GatewayOptions(max_body_bytes=64 * 1024),
    )
    async with _client(app) as c:
        yield c


def _is_status(r: httpx.Response, http: int, code: int) -> dict[str, Any]:
    assert r.status_code == http, r.text
    assert r.headers["content-type"] == "application/json"
    body: dict[str, Any] = r.json()
    assert set(body) == {"code", "message", "details"}
    assert body["code"] == code
    return body


# --------------------------------------------------------------------------- shop: unary


async def test_get_with_path_variable(sc: httpx.AsyncClient) -> None:
    r = await sc.get("/v1/orders/o-1")
    assert r.status_code == 200
    body = r.json()
    assert body["orderId"] == "o-1" and body["status"] == "ORDER_STATUS_CREATED"
    assert body["total"] == {"currency": "KRW", "amountMinor": "3000"}  # int64 as string
    assert body["createdAt"] == "2024-05-01T12:00:00Z" and body["labels"] == {"tier": "gold"}
    assert "cancelReason" not in body  # unpopulated fields omitted by default
    assert r.headers["x-request-id"]


async def test_additional_binding(sc: httpx.AsyncClient) -> None:
    assert (await sc.get("/v1/customers/c-1/orders/o-1")).status_code == 200
    _is_status(await sc.get("/v1/customers/c-2/orders/o-1"), 403, 7)
    r = await sc.get("/v1/orders/o-1/payment")
    assert r.json()["paymentId"] == "p-o-1"


async def test_list_orders_query_params(sc: httpx.AsyncClient) -> None:
    r = await sc.get(
        "/v1/orders",
        params=[
            ("status", "ORDER_STATUS_CREATED"),
            ("orderIds", "o-1"),
            ("order_ids", "o-9"),
            ("pageSize", "5"),
            ("created_after", "2024-01-01T00:00:00Z"),
        ],
    )
    assert r.status_code == 200
    body = r.json()
    assert [o["orderId"] for o in body["orders"]] == ["o-1"]
    assert body["nextPageToken"] == "size=5;token=;status=2;ids=o-1,o-9;after=2024-01-01T00:00:00Z"
    r = await sc.get("/v1/orders", params={"status": "2"})
    assert r.json()["nextPageToken"].startswith("size=0;token=;status=2")


async def test_create_order_body_star(sc: httpx.AsyncClient) -> None:
    r = await sc.post(
        "/v1/orders",
        json={
            "customer_id": "c-7",
            "requestId": "r1",
            "items": [
                {"sku": "a", "quantity": 2, "unitPrice": {"currency": "KRW", "amountMinor": "250"}}
            ],
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["orderId"] == "o-r1" and r.json()["total"]["amountMinor"] == "500"
    _is_status(await sc.post("/v1/orders", json={"items": []}), 400, 3)


async def test_patch_with_nested_path_var_and_auto_field_mask(sc: httpx.AsyncClient) -> None:
    r = await sc.patch(
        "/v1/orders/o-1", json={"shippingAddress": {"city": "Busan"}, "labels": {"a": "b"}}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shippingAddress"] == {"city": "Busan"}
    assert body["labels"] == {"a": "b"}  # replaced: the mask named "labels"
    assert body["cancelReason"] == "mask=shipping_address.city,labels"
    assert body["customerId"] == "c-1"  # untouched


async def test_custom_verb(sc: httpx.AsyncClient) -> None:
    r = await sc.post("/v1/orders/o-1:cancel", json={"reason": "changed mind"})
    assert (
        r.json()["status"] == "ORDER_STATUS_CANCELLED"
        and r.json()["cancelReason"] == "changed mind"
    )
    _is_status(await sc.post("/v1/orders/nope:cancel", json={}), 404, 5)


async def test_body_field_and_duration(sc: httpx.AsyncClient) -> None:
    r = await sc.post("/v1/shipments", json={"orderId": "o-1", "address": {"city": "Seoul"}})
    assert r.status_code == 200
    assert r.json() == {
        "shipmentId": "s-o-1",
        "orderId": "o-1",
        "address": {"city": "Seoul"},
        "status": "SHIPMENT_STATUS_SCHEDULED",
        "eta": "86400s",
    }


async def test_delete_returning_empty(sc: httpx.AsyncClient) -> None:
    r = await sc.delete("/v1/shipments/s-1")
    assert r.status_code == 200 and r.json() == {}
    _is_status(await sc.delete("/v1/shipments/missing"), 404, 5)


async def test_wrappers_and_enums_in(sc: httpx.AsyncClient) -> None:
    r = await sc.post(
        "/v1/notifications",
        json={"orderId": "o-1", "channel": "CHANNEL_SMS", "message": "hi", "urgent": True},
    )
    assert r.json() == {
        "notificationId": "n-o-1",
        "channel": "CHANNEL_SMS",
        "message": "hi (urgent)",
    }


async def test_http_body_response(sc: httpx.AsyncClient) -> None:
    r = await sc.get("/v1/receipts/o-1")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.content == b"<h1>Receipt o-1</h1>"


async def test_error_details_decoded(sc: httpx.AsyncClient) -> None:
    r = await sc.post("/v1/payments", json={"orderId": "o-1", "amount": {"amountMinor": 0}})
    body = _is_status(r, 400, 3)
    assert body["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "amount.amount_minor", "description": "must be > 0"}],
        }
    ]


async def test_unknown_path_and_wrong_method(sc: httpx.AsyncClient) -> None:
    _is_status(await sc.get("/v2/nothing"), 404, 5)
    r = await sc.put("/v1/orders/o-1")
    _is_status(r, 405, 12)
    assert r.headers["allow"] == "GET, PATCH"


# --------------------------------------------------------------------------- streaming (buffered)


async def test_server_streaming_ndjson(sc: httpx.AsyncClient) -> None:
    r = await sc.get("/v1/orders:watch", params={"orderId": "o-1", "limit": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [x["result"]["detail"] for x in lines] == ["event 0", "event 1", "event 2"]


async def test_server_streaming_in_band_error(sc: httpx.AsyncClient) -> None:
    r = await sc.get("/v1/orders:watch", params={"orderId": "fail", "limit": 2})
    assert r.status_code == 200
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert len(lines) == 3 and "result" in lines[1]
    assert lines[2] == {"error": {"code": 13, "message": "watch broke", "details": []}}


async def test_server_streaming_sse(sc: httpx.AsyncClient) -> None:
    r = await sc.get(
        "/v1/orders:watch", params={"limit": 2}, headers={"accept": "text/event-stream"}
    )
    assert r.headers["content-type"] == "text/event-stream"
    events = [e for e in r.text.split("\n\n") if e]
    assert len(events) == 2 and events[0].startswith("data: {")
    assert json.loads(events[1][len("data: ") :])["detail"] == "event 1"
    r = await sc.get(
        "/v1/orders:watch",
        params={"orderId": "fail", "limit": 1},
        headers={"accept": "text/event-stream"},
    )
    last = r.text.strip().split("\n\n")[-1]
    assert (
        last.startswith("event: error\ndata: ")
        and json.loads(last.split("data: ", 1)[1])["code"] == 13
    )


async def test_client_streaming_ndjson(sc: httpx.AsyncClient) -> None:
    body = b'{"sku": "a", "delta": 2}\n{"sku": "b", "delta": -1}\n\n{"sku": "a", "delta": 3}'
    r = await sc.post("/v1/inventory:adjust", content=body)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "adjustments": 3,
        "stock": [{"sku": "a", "available": 5}, {"sku": "b", "available": -1}],
    }
    r = await sc.post("/v1/inventory:adjust", content=b'{"sku": "a", "delta": 1}\n{"delta": "x"}\n')
    body_ = _is_status(r, 400, 3)
    assert "line 2" in body_["message"]


# --------------------------------------------------------------------------- gwtest: templates


async def test_deep_and_nested_templates(ec: httpx.AsyncClient) -> None:
    assert (await ec.get("/v1/files/a/b%2Fc/d%20e")).json() == {"path": "a/b%2Fc/d e"}
    assert (await ec.get("/v1/shelves/s1/books/docs/x/y")).json() == {
        "name": "shelves/s1",
        "path": "docs/x/y",
    }
    assert (await ec.get("/v1/wild/anything/x/n%2F1")).json() == {"name": "n/1"}
    assert (await ec.get("/v1/nested/a/b")).json() == {
        "inner": {"name": "a", "child": {"name": "b"}}
    }
    r = await ec.get("/v1/int/-9007199254740993/COLOR_RED")
    assert r.json() == {"i64": "-9007199254740993", "color": "COLOR_RED"}
    _is_status(await ec.get("/v1/int/abc/COLOR_RED"), 400, 3)
    _is_status(await ec.get("/v1/echo/%zz"), 400, 3)


async def test_put_custom_delete_methods(ec: httpx.AsyncClient) -> None:
    r = await ec.put("/v1/echo/n", json={"name": "inner", "count": 5})
    assert r.json() == {"name": "n", "inner": {"name": "inner", "count": "5"}}
    r = await ec.request("LOCK", "/v1/echo/n?i32=3")
    assert r.json() == {"name": "n", "i32": 3}
    r = await ec.delete("/v1/echo/n")
    assert r.json() == {"name": "n"}
    r = await ec.post("/v1/echo/n:tags", json=["a", "b"])
    assert r.json() == {"name": "n", "tags": ["a", "b"]}
    r = await ec.request("OPTIONS", "/v1/echo/n")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {
        "DELETE",
        "GET",
        "LOCK",
        "PUT",
    }


async def test_response_body_and_http_body_request(ec: httpx.AsyncClient) -> None:
    r = await ec.get("/v1/inner/x?inner.name=in")
    assert r.json() == {"name": "in"}
    r = await ec.post(
        "/v1/uploads/f1", content=b"\x00raw\xff", headers={"content-type": "image/png"}
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png; echoed" and r.content == b"f1:\x00raw\xff"


async def test_update_field_mask(ec: httpx.AsyncClient) -> None:
    r = await ec.patch("/v1/items/7/inner", json={"name": "x", "child": {"count": 1}})
    assert r.json() == {
        "inner": {"name": "x", "child": {"count": "1"}},
        "updateMask": "name,child.count",
        "parent": "items/7",
    }


async def test_fallback_route_for_method_without_rule(ec: httpx.AsyncClient) -> None:
    r = await ec.post("/gwtest.v1.EchoService/NoRule", json={"name": "x", "i64": "5"})
    assert r.json() == {"name": "x", "i64": "5"}
    _is_status(await ec.get("/gwtest.v1.EchoService/NoRule"), 405, 12)


async def test_all_error_codes_map(ec: httpx.AsyncClient) -> None:
    expected = {
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
    }
    for code, http in expected.items():
        r = await ec.get(f"/v1/fail/{code}")
        body = _is_status(r, http, code)
        assert body["message"].startswith("failed with")
        if http == 401:
            assert r.headers["www-authenticate"] == "Bearer"


async def test_rich_error_details(ec: httpx.AsyncClient) -> None:
    r = await ec.get("/v1/fail/8", params={"details": "true", "message": "slow down"})
    body = _is_status(r, 429, 8)
    assert body["message"] == "slow down"
    assert body["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "name", "description": "too short"}],
        },
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "QUOTA",
            "domain": "gwtest",
            "metadata": {"k": "v"},
        },
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"},
    ]


# --------------------------------------------------------------------------- headers and deadlines


async def test_headers_forwarded_and_metadata_returned(ec: httpx.AsyncClient) -> None:
    r = await ec.get(
        "/v1/headers",
        headers={
            "authorization": "Bearer tok",
            "x-request-id": "rid-42",
            "traceparent": "00-abc-def-01",
            "tracestate": "k=v",
            "grpc-metadata-tenant": "acme",
            "grpc-metadata-blob-bin": base64.b64encode(b"\x00\xff").decode(),
            "x-forwarded-for": "198.51.100.1",
            "cookie": "secret",
            "connection": "keep-alive",
        },
    )
    assert r.status_code == 200
    labels = r.json()["labels"]
    assert labels["authorization"] == "Bearer tok" and labels["x-request-id"] == "rid-42"
    assert labels["traceparent"] == "00-abc-def-01" and labels["tracestate"] == "k=v"
    assert (
        labels["tenant"] == "acme" and labels["blob-bin"] == base64.b64encode(b"\x00\xff").decode()
    )
    assert labels["x-forwarded-for"] == "198.51.100.1, 203.0.113.9"
    assert "cookie" not in labels and "connection" not in labels
    assert r.headers["x-request-id"] == "rid-42"
    assert r.headers["grpc-metadata-x-initial"] == "1"
    assert r.headers["grpc-metadata-x-initial-bin"] == base64.b64encode(b"\x01\x02").decode()
    assert r.headers["grpc-metadata-x-trailer"] == "2"


async def test_grpc_timeout_becomes_deadline(ec: httpx.AsyncClient) -> None:
    r = await ec.get("/v1/headers", headers={"grpc-timeout": "2S"})
    assert 0.5 < r.json()["dbl"] <= 2.1
    r = await ec.get("/v1/headers")
    assert r.json()["dbl"] == -1.0  # no deadline by default
    _is_status(await ec.get("/v1/headers", headers={"grpc-timeout": "soon"}), 400, 3)


async def test_route_default_timeout_and_cap(echo: Backend) -> None:
    opts = GatewayOptions(
        default_timeout=5.0, max_timeout=3.0, route_timeouts={"gwtest.v1.EchoService.Echo": 1.0}
    )
    app = create_app(descriptor_sets()["gwtest"], [f"127.0.0.1:{echo.port}"], options=opts)
    async with _client(app) as c:
        r = await c.get("/v1/headers")
        assert 1.0 < r.json()["dbl"] <= 3.1  # default 5s capped at 3s
        r = await c.get("/v1/headers", headers={"grpc-timeout": "100S"})
        assert 1.0 < r.json()["dbl"] <= 3.1  # the client's ask is capped too


async def test_upstream_unreachable_is_503() -> None:
    app = create_app(descriptor_sets()["gwtest"], [f"127.0.0.1:{free_port()}"])
    async with _client(app) as c:
        r = await c.get("/v1/echo/x", headers={"grpc-timeout": "5S"})
        _is_status(r, 503, 14)


async def test_service_split_across_upstreams(shop: Backend, echo: Backend) -> None:
    app = create_app(
        descriptor_sets()["shop"],
        [f"shop.v1.OrderService=127.0.0.1:{shop.port}", f"127.0.0.1:{free_port()}"],
    )
    async with _client(app) as c:
        assert (await c.get("/v1/orders/o-1")).status_code == 200
        r = await c.get("/v1/inventory/sku-1")
        assert r.status_code == 503
        assert r.headers["content-type"] == "application/json"
        assert r.json()["code"] == 14 and r.json()["message"]  # UNAVAILABLE, with a reason


# --------------------------------------------------------------------------- options


async def test_proto_names_and_emit_unpopulated(shop: Backend) -> None:
    app = create_app(
        descriptor_sets()["shop"],
        [f"127.0.0.1:{shop.port}"],
        options=GatewayOptions(proto_names=True, emit_unpopulated=True),
    )
    async with _client(app) as c:
        body = (await c.get("/v1/inventory/sku-9")).json()
        assert body == {"sku": "sku-9", "available": 10, "reserved": 2}
        body = (await c.get("/v1/orders/o-1")).json()
        assert body["order_id"] == "o-1" and body["cancel_reason"] == ""


async def test_strict_mode(echo: Backend) -> None:
    app = create_app(
        descriptor_sets()["gwtest"], [f"127.0.0.1:{echo.port}"], options=GatewayOptions(strict=True)
    )
    async with _client(app) as c:
        _is_status(await c.post("/v1/echo", json={"name": "x", "bogus": 1}), 400, 3)
        _is_status(await c.get("/v1/echo/x", params={"bogus": "1"}), 400, 3)
        assert (await c.post("/v1/echo", json={"name": "x"})).status_code == 200


async def test_json_array_stream_format(echo: Backend) -> None:
    app = create_app(
        descriptor_sets()["gwtest"],
        [f"127.0.0.1:{echo.port}"],
        options=GatewayOptions(stream_format="json-array"),
    )
    async with _client(app) as c:
        r = await c.get("/v1/count/3")
        assert r.json() == [{"name": "0"}, {"name": "1", "i32": 1}, {"name": "2", "i32": 2}]
        assert (await c.get("/v1/count/0")).json() == []
        r = await c.get("/v1/count/5", params={"failAfter": 2})
        assert r.json()[-1] == {"error": {"code": 8, "message": "stream quota", "details": []}}


async def test_middleware_and_route_middleware(echo: Backend) -> None:
    seen: list[str] = []

    def outer(app: Any) -> Any:
        async def mw(scope: Any, receive: Any, send: Any) -> None:
            seen.append("outer:" + scope["path"])
            await app(scope, receive, send)

        return mw

    def per_route(route: Any, app: Any) -> Any:
        if route.method_name != "gwtest.v1.EchoService.Echo":
            return app

        async def mw(scope: Any, receive: Any, send: Any) -> None:
            seen.append(f"route:{route.binding.template}:{scope['path_params']}")
            if scope["path_params"].get("name") == "blocked":
                body = b'{"code":7,"message":"no","details":[]}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            await app(scope, receive, send)

        return mw

    app = create_app(
        descriptor_sets()["gwtest"],
        [f"127.0.0.1:{echo.port}"],
        middleware=[outer],
        route_middleware=[per_route],
    )
    async with _client(app) as c:
        assert (await c.get("/v1/echo/ok")).status_code == 200
        assert (await c.get("/v1/echo/blocked")).status_code == 403
        assert (await c.get("/v1/headers")).status_code == 200
    assert seen == [
        "outer:/v1/echo/ok",
        "route:/v1/echo/{name}:{'name': 'ok'}",
        "outer:/v1/echo/blocked",
        "route:/v1/echo/{name}:{'name': 'blocked'}",
        "outer:/v1/headers",
    ]


async def test_reload_swaps_routes(echo: Backend) -> None:
    app = create_app(descriptor_sets()["gwtest"], [f"127.0.0.1:{echo.port}"])
    async with _client(app) as c:
        assert (await c.post("/gwtest.v1.EchoService/Echo", json={})).status_code == 404
        catalog = app.state.catalog
        app.reload(app.build_state(catalog, options=GatewayOptions(fallback_routes="all")))
        assert (await c.post("/gwtest.v1.EchoService/Echo", json={"name": "x"})).json() == {
            "name": "x"
        }


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("method", "url", "kw"), BAD_REQUESTS)
async def test_bad_input_is_4xx_status_json(
    ec: httpx.AsyncClient, method: str, url: str, kw: dict[str, Any]
) -> None:
    r = await ec.request(method, url, **kw)
    if is_long_header(kw):
        assert r.status_code == 200  # long but valid headers are simply not forwarded
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    _is_status(r, r.status_code, 3)
    assert "Traceback" not in r.text


async def test_huge_body_is_413(ec: httpx.AsyncClient) -> None:
    r = await ec.post("/v1/echo", content=b'{"name": "' + b"x" * 100_000 + b'"}')
    _is_status(r, 413, 8)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 8192  # no Content-Length: the limit applies while reading

    r = await ec.post("/v1/echo", content=chunks())
    _is_status(r, 413, 8)


async def test_very_long_path_is_404(ec: httpx.AsyncClient) -> None:
    _is_status(await ec.get("/v1/" + "a/" * 5000), 404, 5)
    r = await ec.get("/v1/files/" + "/".join(["a"] * 2000))
    assert r.status_code == 200 and r.json()["path"].count("/") == 1999


async def test_server_survives_garbage(ec: httpx.AsyncClient, echo: Backend) -> None:
    for body in garbage_bodies():
        r = await ec.post("/v1/echo", content=body)
        assert r.status_code in (200, 400), r.text
        assert r.headers["content-type"] == "application/json"
    assert (await ec.get("/v1/echo/alive")).json() == {"name": "alive"}


async def test_memory_flat_under_bad_input(ec: httpx.AsyncClient) -> None:
    import gc
    import tracemalloc

    bad = [
        b'{"name": ',
        b"\xff\xfe",
        b'{"i32": "x"}',
        b"[" * 5000,
        b'{"meta": {"a": [1, {"b": 2}]}}',
    ]

    async def burst(n: int) -> None:
        for i in range(n):
            r = await ec.post("/v1/echo", content=bad[i % len(bad)])
            assert r.status_code in (200, 400)

    await burst(150)  # warm caches
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    await burst(600)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert after - before < 2_000_000, after - before  # a 4 KB-per-request leak would fail


async def test_openapi_document_of_every_rule_kind_validates() -> None:
    # gwtest exercises every HttpRule form, including a custom verb (LOCK), which OpenAPI
    # has no operation field for: it is kept as an extension and the document stays valid.
    from openapi_spec_validator import validate

    from meshkit.gateway.core.app import load_catalog
    from meshkit.gateway.openapi import generate_openapi

    doc = generate_openapi(load_catalog(descriptor_sets()["gwtest"]))
    validate(doc)
    item = doc["paths"]["/v1/echo/{name}"]
    assert "x-http-method-lock" in item and "lock" not in item


async def test_mounts_under_a_prefix_in_starlette(shop: Backend) -> None:
    # The gateway is a plain ASGI app: mounted under /api next to other routes, it routes
    # on the path below its mount point (ASGI root_path), whichever way the host passes it.
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    gateway = create_app(descriptor_sets()["shop"], [f"127.0.0.1:{shop.port}"])
    host = Starlette(
        routes=[
            Route("/hello", lambda request: PlainTextResponse("hi")),
            Mount("/api", app=gateway),
        ]
    )
    async with _client(host) as c:
        assert (await c.get("/hello")).text == "hi"
        r = await c.get("/api/v1/orders/o-1")
        assert r.status_code == 200, r.text
        assert r.json()["orderId"] == "o-1"
        _is_status(await c.get("/api/v1/nowhere"), 404, 5)
        assert (await c.get("/v1/orders/o-1")).status_code == 404  # only under the mount


# --------------------------------------------------------------------------- request ids


_ID = r"[A-Za-z0-9._-]{1,128}"


async def test_every_response_carries_a_request_id(ec: httpx.AsyncClient) -> None:
    import re

    bad = [
        await ec.get("/v2/nothing"),  # 404
        await ec.put("/v1/headers"),  # 405
        await ec.get("/v1/echo/%C0%AF"),  # 400 bad path
        await ec.get("/v1/headers", headers={"grpc-metadata-bad@key": "v"}),  # 400 metadata
        await ec.post("/v1/echo", content=b'{"name": '),  # 400 transcoding
        await ec.post("/v1/echo", content=b'{"name": "' + b"x" * 100_000 + b'"}'),  # 413
        await ec.get("/v1/fail/14"),  # 503 from the upstream
    ]
    assert [r.status_code for r in bad] == [404, 405, 400, 400, 400, 413, 503]
    ids = [r.headers.get("x-request-id") for r in bad]
    assert all(i and re.fullmatch(_ID, i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    # A sane incoming id is kept, on errors as on success, and is what the upstream sees.
    for url in ("/v2/nothing", "/v1/headers"):
        r = await ec.get(url, headers={"x-request-id": "abc.DEF_1-2"})
        assert r.headers["x-request-id"] == "abc.DEF_1-2"
    assert r.json()["labels"]["x-request-id"] == "abc.DEF_1-2"
    # Anything else (too long, spaces, other characters) is replaced by a generated id,
    # and the upstream sees the same one the client gets back.
    for given in ("a" * 129, "has space", "x;y", "é"):
        r = await ec.get("/v1/headers", headers={"x-request-id": given.encode("utf-8")})
        rid = r.headers["x-request-id"]
        assert rid != given and re.fullmatch(_ID, rid)
        assert r.json()["labels"]["x-request-id"] == rid


async def test_unreachable_upstream_carries_a_request_id() -> None:
    app = create_app(descriptor_sets()["gwtest"], [f"127.0.0.1:{free_port()}"])
    async with _client(app) as c:
        r = await c.get("/v1/echo/x", headers={"grpc-timeout": "5S", "x-request-id": "rq-1"})
        _is_status(r, 503, 14)
        assert r.headers["x-request-id"] == "rq-1"


# --------------------------------------------------------------------------- local failures


async def test_local_channel_failures_are_generic_and_logged_once(
    echo: Backend, ec: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """gRPC core's own text (internal addresses, connection errors) stays in the log; the
    client gets a generic message with its request id. A status the upstream service
    sent itself keeps its own message."""
    import logging

    port = free_port()
    app = create_app(descriptor_sets()["gwtest"], [f"127.0.0.1:{port}"])
    caplog.set_level(logging.DEBUG)
    async with _client(app) as c:
        r = await c.get("/v1/echo/x", headers={"grpc-timeout": "5S", "x-request-id": "rq-down"})
    body = _is_status(r, 503, 14)
    assert body["message"] == "upstream unavailable (request id rq-down)"
    assert str(port) not in r.text and "127.0.0.1" not in r.text and "ipv4" not in r.text
    warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    [w] = warnings
    assert str(port) in w.getMessage() and "rq-down" in w.getMessage()
    assert w.exc_info is None and "Traceback" not in caplog.text
    # A deadline that runs out in the gateway's own channel, here in the middle of a
    # server stream (its in-band error record): generic too.
    r = await ec.get(
        "/v1/count/3?delayMs=2000", headers={"grpc-timeout": "300m", "x-request-id": "rq-late"}
    )
    records = [json.loads(line) for line in r.text.splitlines()]
    assert records[0] == {"result": {"name": "0"}}
    assert records[-1]["error"]["code"] == 4
    assert records[-1]["error"]["message"] == "upstream deadline exceeded (request id rq-late)"
    # The service's own UNAVAILABLE passes through as it was sent.
    r = await ec.get("/v1/fail/14")
    body = _is_status(r, 503, 14)
    assert body["message"].startswith("failed with")
