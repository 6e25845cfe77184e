"""``meshkit edge`` as a real process: BFF profiles each on their own port, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.integration._edge_backends import ShopBackend

pytestmark = pytest.mark.integration


@pytest.fixture
async def backend() -> AsyncIterator[ShopBackend]:
    b = await ShopBackend("blue").start()
    yield b
    await b.stop(None)


def _two_ports() -> tuple[int, int]:
    a = free_port()
    b = free_port()
    while b == a:
        b = free_port()
    return a, b


def _config(target: str, web: int, mobile: int) -> str:
    # The mobile profile trims orders to two fields and adds a composite route; the web
    # profile has neither. Each has its own port; mobile also has a prefix.
    return f"""
edge:
  upstreams:
    shop: [{target}]
  services: {{default: shop}}
  profiles:
    web:
      port: {web}
    mobile:
      port: {mobile}
      prefix: /mobile
      routes:
        - match: {{rpc: "shop.v1.OrderService.*"}}
          shaping: {{fields: [orderId, status]}}
      bff:
        - name: order_summary
          path: /v1/orders/{{order_id}}/summary
          calls:
            order: {{rpc: shop.v1.OrderService.GetOrder, request: {{orderId: "{{path.order_id}}"}}}}
            payment: {{rpc: shop.v1.PaymentService.GetPayment,
                       request: {{orderId: "{{path.order_id}}"}}}}
          fields: [order.orderId, payment.status]
"""


async def _wait_up(proc: subprocess.Popen[bytes], log: Path, urls: list[str]) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    async with httpx.AsyncClient(timeout=2) as c:
        for url in urls:
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"edge exited {proc.returncode}: {log.read_text()}")
                try:
                    await c.get(url)
                    break
                except httpx.TransportError:
                    if loop.time() > end:
                        raise AssertionError(f"edge not up: {log.read_text()}") from None
                    await asyncio.sleep(0.05)


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int | None:
    # Polled, not proc.wait(): the backend serving the edge runs on this loop.
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while proc.poll() is None and loop.time() < end:
        await asyncio.sleep(0.05)
    return proc.poll()


async def test_edge_cli_serves_each_profile_on_its_own_port_and_stops_on_sigterm(
    backend: ShopBackend, shop_descriptor_set: Path, tmp_path: Path
) -> None:
    web_port, mobile_port = _two_ports()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(_config(backend.target, web_port, mobile_port))
    log = tmp_path / "edge.log"
    args = ["--descriptor-set", str(shop_descriptor_set), "--config", str(cfg)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshkit.cli", "edge", *args, "--port", str(free_port())],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    web_url, mobile_url = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{mobile_port}"
    try:
        await _wait_up(proc, log, [web_url + "/healthz", mobile_url + "/healthz"])
        async with (
            httpx.AsyncClient(base_url=web_url, timeout=10) as web,
            httpx.AsyncClient(base_url=mobile_url, timeout=10) as mobile,
        ):
            # The web port serves the web profile: whole orders, no composite.
            order = (await web.get("/v1/orders/o-1")).json()
            assert order["orderId"] == "o-1" and order["customerId"] == "c-1"
            assert order["items"][0]["sku"] == "sku-1"
            # The mobile port serves the mobile profile: its shaping, with or without its
            # prefix, and its composite route.
            for path in ("/v1/orders/o-1", "/mobile/v1/orders/o-1"):
                r = await mobile.get(path)
                assert r.json() == {"orderId": "o-1", "status": "ORDER_STATUS_CREATED"}, path
            r = await mobile.get("/v1/orders/o-2/summary")
            assert r.status_code == 200
            assert r.json() == {
                "order": {"orderId": "o-2"},
                "payment": {"status": "PAYMENT_STATUS_CHARGED"},
            }
            # Nothing of the mobile profile on the web port, not even by its prefix.
            for path in (
                "/v1/orders/o-2/summary",
                "/mobile/v1/orders/o-2/summary",
                "/mobile/v1/orders/o-1",
            ):
                r = await web.get(path)
                assert r.status_code == 404, (path, r.text)
                assert r.json()["code"] == 5  # NOT_FOUND as a google.rpc.Status
            for c in (web, mobile):
                assert (await c.get("/readyz")).json() == {"status": "ready"}
            assert backend.calls["GetPayment"] == 1
            # The gateway CLI's HTTP protocol serves here too: a request it cannot parse
            # gets a google.rpc.Status body, not uvicorn's text/plain.
            reader, writer = await asyncio.open_connection("127.0.0.1", web_port)
            writer.write(b"GET /v1/orders/a b HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400"), raw
            assert b"application/json" in head.lower(), raw
            assert json.loads(body)["code"] == 3, raw  # INVALID_ARGUMENT

            # SIGTERM while a call is in flight on one port: it is answered, both ports
            # close, the process exits 0.
            backend.delay = 0.5
            calls = backend.calls["GetOrder"]
            slow = asyncio.create_task(mobile.get("/v1/orders/o-3"))
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while backend.calls["GetOrder"] == calls:
                assert loop.time() < end, "the slow call never reached the backend"
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            r = await slow
            assert r.status_code == 200 and r.json()["orderId"] == "o-3"
        code = await _wait_exit(proc)
        out = log.read_text()
        assert code == 0, out
        assert "Traceback" not in out, out
        async with httpx.AsyncClient(timeout=2) as c:
            for url in (web_url, mobile_url):
                with pytest.raises(httpx.ConnectError):
                    await c.get(url + "/healthz")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
