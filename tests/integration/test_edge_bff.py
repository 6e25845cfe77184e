"""BFF composite routes, profiles and the admin reload endpoint over a real loopback backend."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from meshkit.gateway.edge.edge import EdgeApp, create_edge_app
from tests.integration._edge_backends import ShopBackend, edge_client

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-secret-token"


@pytest.fixture
async def backend() -> AsyncIterator[ShopBackend]:
    b = await ShopBackend("blue").start()
    yield b
    await b.stop(None)


def config(target: str) -> dict[str, Any]:
    return {
        "upstreams": {"default": target},
        "edge": {
            "admin": {"token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
            "profiles": {
                "web": {},
                "mobile": {
                    "prefix": "/mobile",
                    "bff": [
                        {
                            "name": "order_summary",
                            "path": "/v1/orders/{order_id}/summary",
                            "timeout": "2s",
                            "calls": {
                                "order": {
                                    "rpc": "shop.v1.OrderService.GetOrder",
                                    "request": {"orderId": "{path.order_id}"},
                                },
                                "shipment": {
                                    "rpc": "shop.v1.ShippingService.GetShipment",
                                    "request": {"orderId": "{order.orderId}"},
                                    "optional": True,
                                    "timeout": "1s",
                                },
                                "payment": {
                                    "rpc": "shop.v1.PaymentService.GetPayment",
                                    "request": {"orderId": "{path.order_id}"},
                                    "optional": True,
                                },
                            },
                            "fields": [
                                "order.orderId",
                                "order.status",
                                "order.total",
                                "shipment.status",
                                "payment.status",
                            ],
                        },
                        {
                            "name": "slow",
                            "path": "/v1/slow/{order_id}",
                            "timeout": "200ms",
                            "calls": {
                                "order": {
                                    "rpc": "shop.v1.OrderService.GetOrder",
                                    "request": {"orderId": "{path.order_id}"},
                                }
                            },
                        },
                        {
                            # Requests built from the client's query: checked as a
                            # request body is.
                            "name": "customer_orders",
                            "path": "/v1/customers/{customer_id}/orders",
                            "calls": {
                                "orders": {
                                    "rpc": "shop.v1.OrderService.ListOrders",
                                    "request": {
                                        "customerId": "{path.customer_id}",
                                        "status": "{query.status}",
                                        "pageSize": "{query.n}",
                                    },
                                },
                            },
                        },
                        {
                            "name": "extras",
                            "path": "/v1/orders/{order_id}/extras",
                            "calls": {
                                "order": {
                                    "rpc": "shop.v1.OrderService.GetOrder",
                                    "request": {"orderId": "{path.order_id}"},
                                },
                                "extra": {
                                    "rpc": "shop.v1.OrderService.ListOrders",
                                    "request": {"status": "{query.extra}"},
                                    "optional": True,
                                },
                                "update": {
                                    "rpc": "shop.v1.OrderService.UpdateOrder",
                                    "request": {"order": "{query.order}"},
                                    "optional": True,
                                },
                            },
                        },
                    ],
                },
            },
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


async def test_mobile_composite_returns_the_trimmed_composed_document(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    r = await client.get("/mobile/v1/orders/o-1/summary", headers={"x-request-id": "rid-bff"})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "order": {
            "orderId": "o-1",
            "status": "ORDER_STATUS_CREATED",
            "total": {"currency": "KRW", "amountMinor": "10000"},
        },
        "shipment": {"status": "SHIPMENT_STATUS_SCHEDULED"},
        "payment": {"status": "PAYMENT_STATUS_CHARGED"},
    }
    assert dict(backend.calls) == {"GetOrder": 1, "GetShipment": 1, "GetPayment": 1}
    # Request metadata reaches every call.
    assert {m.get("x-request-id") for m in backend.metadata} == {"rid-bff"}
    # The composite is only on the mobile profile.
    r = await client.get("/v1/orders/o-1/summary")
    assert r.status_code == 404
    assert r.json()["code"] == 5  # NOT_FOUND, as a Status body


async def test_failing_optional_call_gives_partial_results_and_an_error_list(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    backend.fail_payment = grpc.StatusCode.UNAVAILABLE
    r = await client.get("/mobile/v1/orders/o-2/summary")
    assert r.status_code == 200
    body = r.json()
    assert body["order"]["orderId"] == "o-2"
    assert body["shipment"] == {"status": "SHIPMENT_STATUS_SCHEDULED"}
    assert "payment" not in body
    assert body["errors"] == [
        {"call": "payment", "code": 14, "status": "UNAVAILABLE", "message": "payments are down"}
    ]


async def test_failing_required_call_fails_the_request_and_skips_dependents(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    r = await client.get("/mobile/v1/orders/missing/summary")
    assert r.status_code == 404
    assert r.json()["code"] == 5
    assert r.json()["message"].startswith("order:")
    assert backend.calls["GetShipment"] == 0


async def test_composite_deadline(client: httpx.AsyncClient, backend: ShopBackend) -> None:
    backend.delay = 1.0
    r = await client.get("/mobile/v1/slow/o-1")
    assert r.status_code == 504
    assert r.json()["code"] == 4


async def test_admin_reload_needs_the_token_and_reloads(
    backend: ShopBackend, shop_descriptor_set: Path, tmp_path: Path
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config(backend.target)))
    edge = create_edge_app(path, shop_descriptor_set)
    async with edge_client(edge.asgi()) as c:
        r = await c.post("/admin/reload")
        assert r.status_code == 401
        assert r.json() == {"code": 16, "message": "admin token required", "details": []}
        assert r.headers["www-authenticate"] == 'Bearer realm="meshkit-admin"'
        for wrong in ("Bearer wrong", f"Basic {ADMIN_TOKEN}", f"Bearer{ADMIN_TOKEN}"):
            r = await c.post("/admin/reload", headers={"authorization": wrong})
            assert (r.status_code, r.json()["code"]) == (401, 16), wrong
        assert edge.reloads == 0
        r = await c.get("/admin/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert (r.status_code, r.headers["allow"], r.json()["code"]) == (405, "POST", 12)
        r = await c.post("/admin/reload", headers={"authorization": f"bearer  {ADMIN_TOKEN} "})
        assert r.status_code == 200
        assert r.json() == {"status": "reloaded"}
        assert edge.reloads == 1
        bad = config(backend.target)
        bad["edge"]["profiles"]["web"] = {
            "routes": [{"match": {"rpc": "x"}, "cache": {"ttl": "soon"}}]
        }
        path.write_text(yaml.safe_dump(bad))
        r = await c.post("/admin/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 400
        assert "edge.profiles.web.routes[0].cache.ttl" in r.json()["message"]
        assert edge.reloads == 1
        assert (await c.get("/v1/orders/o-1")).status_code == 200
    await edge.shutdown()


async def test_profile_on_its_own_port_serves_without_prefix(
    edge: EdgeApp, backend: ShopBackend
) -> None:
    async with edge_client(edge.app_for("mobile")) as c:
        assert (await c.get("/v1/orders/o-3/summary")).status_code == 200
        assert (await c.get("/mobile/v1/orders/o-3/summary")).status_code == 200


async def test_independent_calls_run_concurrently(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    # GetOrder answers only once GetPayment has started: sequential calls would time out.
    backend.payment_started = asyncio.Event()
    r = await client.get("/mobile/v1/orders/o-5/summary")
    assert r.status_code == 200, r.text
    assert "errors" not in r.json()
    assert r.json()["payment"] == {"status": "PAYMENT_STATUS_CHARGED"}


async def test_reload_with_an_unknown_rpc_is_refused_and_the_old_config_serves(
    edge: EdgeApp, client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    from meshkit.errors import ConfigError
    from meshkit.gateway.edge.profiles import EdgeConfig

    bad = config(backend.target)
    bad["edge"]["profiles"]["mobile"]["bff"][0]["calls"]["order"]["rpc"] = (
        "shop.v1.OrderService.Nope"
    )
    with pytest.raises(ConfigError) as ei:
        await edge.reload(EdgeConfig.from_mapping(bad))
    assert ei.value.path == "edge.profiles.mobile.bff[0].calls.order.rpc"
    assert edge.reloads == 0
    assert (await client.get("/mobile/v1/orders/o-1/summary")).status_code == 200


async def test_composite_requests_are_checked_like_request_bodies(
    client: httpx.AsyncClient, backend: ShopBackend
) -> None:
    """A value a composite's request takes from the client is checked against the call's
    message as a transcoded request body is: a wrong-shaped value or an unknown enum name
    is 400 naming the field and the value, never dropped on the way to the upstream."""
    url = "/mobile/v1/customers/c-1/orders"
    r = await client.get(url, params={"status": "ORDER_STATUS_CREATED", "n": "5"})
    assert r.status_code == 200, r.text
    assert r.json()["orders"] == {"orders": [{"orderId": "o-1", "status": "ORDER_STATUS_CREATED"}]}
    [req] = backend.list_requests
    assert (req.customer_id, req.status, req.page_size) == ("c-1", 2, 5)

    for params, field, value, why in [
        ({"status": "POETRY"}, "status", "POETRY", "not a value of enum shop.v1.OrderStatus"),
        ({"n": "abc"}, "pageSize", "abc", "expected an integer"),
        ({"n": "1_000"}, "pageSize", "1_000", "expected an integer"),
    ]:
        r = await client.get(url, params=params)
        assert r.status_code == 400, (params, r.text)
        body = r.json()
        assert body["code"] == 3, body  # INVALID_ARGUMENT
        assert body["message"].startswith("orders: cannot build the request: "), body
        assert f'invalid value "{value}" for field {field}: {why}' in body["message"], body
        [violation] = body["details"]
        assert violation["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        assert violation["fieldViolations"][0]["field"] == field
    assert backend.calls["ListOrders"] == 1  # none of the refused requests went upstream

    # An optional call whose request cannot be built is left out with its error, as an
    # optional call that fails upstream is; the required call still answers.
    r = await client.get("/mobile/v1/orders/o-7/extras", params={"extra": "POETRY", "order": "x"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "extra" not in body and "update" not in body
    assert body["order"]["orderId"] == "o-7"
    errors = {e["call"]: e for e in body["errors"]}
    assert errors["extra"]["code"] == 3 and errors["extra"]["status"] == "INVALID_ARGUMENT"
    assert 'invalid value "POETRY" for field status' in errors["extra"]["message"]
    assert (
        'invalid value "x" for field order: expected a JSON object (shop.v1.Order)'
        in (errors["update"]["message"])
    )
    assert backend.calls["ListOrders"] == 1 and backend.calls["UpdateOrder"] == 0


def test_a_misspelt_field_in_a_request_template_stops_the_load(
    backend: ShopBackend, shop_descriptor_set: Path
) -> None:
    from meshkit.errors import ConfigError

    bad = config(backend.target)
    calls = bad["edge"]["profiles"]["mobile"]["bff"][2]["calls"]
    calls["orders"]["request"]["pageSise"] = "{query.n}"
    with pytest.raises(ConfigError) as ei:
        create_edge_app(bad, shop_descriptor_set)
    assert ei.value.path == "edge.profiles.mobile.bff[2].calls.orders.request.pageSise"
    assert "shop.v1.ListOrdersRequest" in str(ei.value)
    del calls["orders"]["request"]["pageSise"]
    calls = bad["edge"]["profiles"]["mobile"]["bff"][3]["calls"]
    calls["update"]["request"] = {"order": {"labels": {"any": "key"}, "totl": {}}}
    with pytest.raises(ConfigError) as ei:
        create_edge_app(bad, shop_descriptor_set)
    assert ei.value.path == "edge.profiles.mobile.bff[3].calls.update.request.order.totl"
