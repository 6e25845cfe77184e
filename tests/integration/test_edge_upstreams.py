"""Balancing, health checking, canary splits and blue-green switches over real backends."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from meshkit.gateway.edge.edge import EdgeApp, create_edge_app
from meshkit.gateway.edge.profiles import EdgeConfig
from meshkit.gateway.upstream.balancing import BalancedUpstream
from meshkit.resilience.clock import FakeClock
from meshkit.resilience.registry import ResilienceRegistry
from tests.conftest import free_port
from tests.integration._edge_backends import ShopBackend, edge_client

pytestmark = pytest.mark.integration


@pytest.fixture
async def pair() -> AsyncIterator[tuple[ShopBackend, ShopBackend]]:
    a = await ShopBackend("blue").start()
    b = await ShopBackend("green").start()
    yield a, b
    await asyncio.gather(a.stop(None), b.stop(None))


def client_for(edge: EdgeApp) -> httpx.AsyncClient:
    return edge_client(edge.asgi())


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def served_by(
    c: httpx.AsyncClient, n: int, headers: dict[str, str] | None = None, concurrency: int = 25
) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            r = await c.get(f"/v1/orders/o-{i}", headers=headers)
            assert r.status_code == 200, r.text
            out[r.json()["labels"]["server"]] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


def canary_config(stable: str, canary: str, **extra: Any) -> dict[str, Any]:
    return {
        "edge": {
            "upstreams": {"v1": [stable], "v2": [canary]},
            "services": {
                "default": {"canary": {"stable": "v1", "canary": "v2", "weight": 10, **extra}}
            },
        }
    }


async def test_canary_split_is_within_binomial_bounds_and_pinned_by_header(
    pair: tuple[ShopBackend, ShopBackend], shop_descriptor_set: Path
) -> None:
    stable, canary = pair
    edge = create_edge_app(canary_config(stable.target, canary.target), shop_descriptor_set)
    async with client_for(edge) as c:
        counts = await served_by(c, 1000)
        # 10% of 1000 = 100; sd = sqrt(1000*0.1*0.9) ~ 9.5; +-35 is ~3.7 sd (10% +- 3.5%).
        assert 65 <= counts["green"] <= 135, counts
        assert counts["blue"] + counts["green"] == 1000
        assert await served_by(c, 30, {"x-canary": "always"}) == {"green": 30}
        assert await served_by(c, 30, {"x-canary": "never"}) == {"blue": 30}
    await edge.shutdown()


async def test_sticky_canary_keeps_each_client_on_one_side(
    pair: tuple[ShopBackend, ShopBackend], shop_descriptor_set: Path
) -> None:
    stable, canary = pair
    edge = create_edge_app(
        canary_config(stable.target, canary.target, sticky="header:x-user-id", weight=50),
        shop_descriptor_set,
    )
    async with client_for(edge) as c:
        sides = set()
        for user in range(12):
            got = await served_by(c, 5, {"x-user-id": f"user-{user}"})
            assert len(got) == 1, got  # one user, one side
            sides.update(got)
        assert sides == {"blue", "green"}
    await edge.shutdown()


async def test_unhealthy_endpoint_leaves_rotation_and_returns(
    pair: tuple[ShopBackend, ShopBackend], shop_descriptor_set: Path
) -> None:
    a, b = pair
    cfg = {
        "edge": {
            "upstreams": {
                "shop": {
                    "targets": [a.target, b.target],
                    "health_check": {"interval": "100ms", "timeout": "1s"},
                }
            }
        }
    }
    edge = create_edge_app(cfg, shop_descriptor_set)
    await edge.startup()
    up = edge.registry.upstreams["shop"]
    assert isinstance(up, BalancedUpstream)
    async with client_for(edge) as c:
        assert await served_by(c, 20) == {"blue": 10, "green": 10}
        await a.set_serving(False)
        await wait_for(lambda: up.healthy[a.target] is False)
        assert await served_by(c, 20) == {"green": 20}
        assert (await c.get("/readyz")).status_code == 200
        metrics = (await c.get("/metrics")).text
        assert f'meshkit_gateway_upstream_healthy{{endpoint="shop/{a.target}"' in metrics
        await b.set_serving(False)
        await wait_for(lambda: up.healthy[b.target] is False)
        r = await c.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {
            "status": "not ready",
            "upstreams": {"shop": "no endpoint reports SERVING"},
        }
        await a.set_serving(True)
        await b.set_serving(True)
        await wait_for(lambda: up.healthy[a.target] and up.healthy[b.target])
        assert (await c.get("/readyz")).status_code == 200
        assert await served_by(c, 20) == {"blue": 10, "green": 10}
    await edge.shutdown()


async def readyz_until(c: httpx.AsyncClient, status: int, timeout: float = 10.0) -> httpx.Response:
    """Poll ``/readyz`` until it answers ``status`` (within ``timeout``)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        r = await c.get("/readyz")
        if r.status_code == status:
            return r
        if loop.time() > end:
            raise AssertionError(f"/readyz still {r.status_code} {r.text}, wanted {status}")
        await asyncio.sleep(0.05)


async def test_readyz_without_health_check_follows_connectivity(
    shop_descriptor_set: Path,
) -> None:
    # No health_check: readiness comes from the channels. "shop" has one live and one
    # refusing endpoint (ready: one is enough); every endpoint of "payments" refuses.
    live = await ShopBackend("blue").start()
    dead, later = free_port(), free_port()
    cfg = {
        "edge": {
            "upstreams": {
                "shop": [live.target, f"127.0.0.1:{dead}"],
                "payments": [f"127.0.0.1:{later}"],
            },
            "services": {"default": "shop", "shop.v1.PaymentService": "payments"},
        }
    }
    edge = create_edge_app(cfg, shop_descriptor_set)
    await edge.startup()
    late: ShopBackend | None = None
    try:
        async with client_for(edge) as c:
            r = await c.get("/readyz")
            assert r.status_code == 503
            assert r.json() == {
                "status": "not ready",
                "upstreams": {"payments": "no endpoint accepts connections"},
            }
            assert (await c.get("/healthz")).json() == {"status": "ok"}  # liveness unaffected
            # A server starting on the refusing port makes the edge ready, and the call the
            # probe's channel carries works.
            late = await ShopBackend("late").start(later)
            r = await readyz_until(c, 200)
            assert r.json() == {"status": "ready"}
            assert (await c.get("/v1/payments/p-1")).status_code == 200
            await late.stop(None)
            late = None
            r = await readyz_until(c, 503)
            assert r.json()["upstreams"] == {"payments": "no endpoint accepts connections"}
            assert (await c.get("/healthz")).status_code == 200
    finally:
        await edge.shutdown()
        await live.stop(None)
        if late is not None:
            await late.stop(None)


async def test_readyz_is_bounded_when_an_endpoint_never_finishes_connecting(
    shop_descriptor_set: Path,
) -> None:
    # A listener that never accepts: TCP connects (the kernel's backlog) but no HTTP/2
    # settings ever come, so the channel stays CONNECTING for gRPC's 20 s connect timeout.
    # /readyz waits for it only BalancedUpstream.connect_timeout, concurrent probes alike.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        target = f"127.0.0.1:{hole.getsockname()[1]}"
        edge = create_edge_app({"edge": {"upstreams": {"stuck": [target]}}}, shop_descriptor_set)
        try:
            async with client_for(edge) as c:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                answers = await asyncio.gather(*(c.get("/readyz") for _ in range(10)))
                elapsed = loop.time() - t0
                assert [r.status_code for r in answers] == [503] * 10
                assert answers[0].json()["upstreams"] == {
                    "stuck": "no endpoint accepts connections"
                }
                assert elapsed < 5.0, elapsed  # bound 0.5 s; the connect timeout is 20 s
        finally:
            await edge.shutdown()


async def test_blue_green_switch_under_load_loses_no_request(
    pair: tuple[ShopBackend, ShopBackend], shop_descriptor_set: Path
) -> None:
    blue, green = pair

    def cfg(target: str) -> EdgeConfig:
        return EdgeConfig.from_mapping(
            {
                "edge": {
                    "upstreams": {
                        "shop": {
                            "targets": [target],
                            "drain": "500ms",
                            "health_check": {"interval": "200ms"},
                        }
                    },
                    "admin": {"token_sha256": "0" * 64},
                }
            }
        )

    edge = create_edge_app(cfg(blue.target), shop_descriptor_set)
    await edge.startup()
    results: list[tuple[int, str]] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def worker(c: httpx.AsyncClient, w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = await c.get(f"/v1/orders/w{w}-{i}")
            except Exception as exc:  # a transport error is a lost request too
                failures.append(repr(exc))
                continue
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text}")
            else:
                results.append((len(results), r.json()["labels"]["server"]))

    async with client_for(edge) as c:
        workers = [asyncio.create_task(worker(c, w)) for w in range(8)]
        await wait_for(lambda: len(results) >= 200)
        switched_at = len(results)
        await edge.reload(cfg(green.target))
        after_reload = len(results)
        # Keep the load on past the drain, so old channels close while requests flow.
        await wait_for(lambda: len(results) >= after_reload + 400)
        await asyncio.sleep(0.6)
        stop.set()
        await asyncio.gather(*workers)
    assert failures == []
    servers = [s for _, s in results]
    assert set(servers[:switched_at]) == {"blue"}
    # Only requests already in flight at the switch may still land on blue.
    assert set(servers[after_reload + 16 :]) == {"green"}
    assert green.calls["GetOrder"] > 300
    await edge.shutdown()


async def test_blue_green_over_real_http_via_the_admin_endpoint(
    pair: tuple[ShopBackend, ShopBackend], shop_descriptor_set: Path, tmp_path: Path
) -> None:
    import hashlib

    import uvicorn
    import yaml

    blue, green = pair
    token = "admin-token"
    path = tmp_path / "gateway.yaml"

    def write(target: str) -> None:
        path.write_text(
            yaml.safe_dump(
                {
                    "edge": {
                        "upstreams": {"shop": {"targets": [target], "drain": "300ms"}},
                        "admin": {"token_sha256": hashlib.sha256(token.encode()).hexdigest()},
                    }
                }
            )
        )

    write(blue.target)
    edge = create_edge_app(path, shop_descriptor_set)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            edge.asgi(),
            host="127.0.0.1",
            port=port,
            lifespan="on",
            access_log=False,
            log_level="warning",
        )
    )
    serving = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started)
    seen: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def worker(c: httpx.AsyncClient, w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = await c.get(f"/v1/orders/h{w}-{i}")
                if r.status_code == 200:
                    seen.append(r.json()["labels"]["server"])
                else:
                    failures.append(f"{r.status_code} {r.text}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            workers = [asyncio.create_task(worker(c, w)) for w in range(6)]
            await wait_for(lambda: len(seen) >= 100)
            write(green.target)
            r = await c.post("/admin/reload", headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            mark = len(seen)
            await wait_for(lambda: len(seen) >= mark + 200)
            await asyncio.sleep(0.4)  # past the drain: old channels close under load
            stop.set()
            await asyncio.gather(*workers)
    finally:
        server.should_exit = True
        await serving
    assert failures == []
    assert seen[0] == "blue"
    assert set(seen[mark + 12 :]) == {"green"}


async def test_reload_with_an_unrelated_change_keeps_an_open_breaker_open(
    shop_descriptor_set: Path,
) -> None:
    """The policies' registry outlives the document (#16): a reload that changes another
    rule's timeout keeps the payment breaker OPEN (it used to come back CLOSED)."""
    backend = await ShopBackend("blue").start()
    backend.fail_payment = grpc.StatusCode.UNAVAILABLE

    def doc(order_timeout: str) -> dict[str, Any]:
        return {
            "policy": {
                "rules": [
                    {
                        "match": "shop.v1.PaymentService",
                        "circuit_breaker": {
                            "window": {"type": "count", "size": 1},
                            "minimum_calls": 1,
                            "open_duration": "10s",
                        },
                    },
                    {"match": "shop.v1.OrderService", "timeout": order_timeout},
                ]
            },
            "edge": {"upstreams": {"shop": {"targets": [backend.target]}}},
        }

    clock = FakeClock()
    first = EdgeConfig.from_mapping(doc("2s"))
    assert first.policy is not None
    registry = ResilienceRegistry(clock=clock)
    edge = create_edge_app(
        dataclasses.replace(first, policy=first.policy.with_registry(registry)),
        shop_descriptor_set,
    )
    await edge.startup()
    try:
        async with client_for(edge) as c:
            assert (await c.get("/v1/payments/p-1")).status_code == 503  # the backend's failure
            (breaker,) = registry.breakers().values()
            assert str(breaker.state) == "OPEN"
            assert (await c.get("/v1/payments/p-1")).status_code == 503  # refused, not sent
            assert backend.calls["GetPayment"] == 1

            await edge.reload(EdgeConfig.from_mapping(doc("3s")))
            policy = edge.config.policy
            assert policy is not None and policy is not first.policy
            assert policy.for_method("/shop.v1.OrderService/GetOrder").timeout == 3.0
            assert policy.registry is registry
            assert registry.breakers() == {breaker.name: breaker}
            assert str(breaker.state) == "OPEN"
            assert (await c.get("/v1/payments/p-1")).status_code == 503
            assert backend.calls["GetPayment"] == 1  # still refused after the reload

            # The registry's clock still drives it: past open_duration a probe goes out.
            backend.fail_payment = None
            clock.advance(10)
            assert (await c.get("/v1/payments/p-1")).status_code == 200
            assert backend.calls["GetPayment"] == 2
    finally:
        await edge.shutdown()
        await backend.stop(None)
