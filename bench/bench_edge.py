"""Cost per request of each edge feature, against the plain gateway, in one run.

One gateway process serves two ports: the plain transcoding gateway
(``meshkit.gateway.create_app``) and the edge (``create_edge_app``) with one
profile per feature on a path prefix. The same grpc.aio shop backend runs in
another process. wrk drives ``GET /v1/orders/o-1?customer_id=c-1`` through each
variant in turn; CPU-microseconds per request are the gateway process's CPU
time during the variant's run divided by its requests.

    .venv/bin/python bench/bench_edge.py [--duration 5] [--connections 32] [--rounds 1]

Needs wrk. Writes bench/results/edge.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TICK = os.sysconf("SC_CLK_TCK")
PATH = "/v1/orders/o-1?customer_id=c-1"
HS_SECRET = "bench-secret-bench-secret-bench-secret!"
API_KEY = "bench-api-key"

# name -> (port kind, prefix, extra headers)
VARIANTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "plain_gateway": ("plain", "", {}),
    "edge_no_features": ("edge", "/none", {}),
    "auth_jwt_hs256": ("edge", "/jwt", {"Authorization": "Bearer {jwt}"}),
    "auth_api_key": ("edge", "/key", {"x-api-key": API_KEY}),
    "rate_limit": ("edge", "/rl", {}),
    "cache_hit": ("edge", "/cache", {}),
    "auth_rl_cache": ("edge", "/all", {"Authorization": "Bearer {jwt}"}),
}


def edge_config(backend: str) -> dict[str, Any]:
    get_order = {"rpc": "shop.v1.OrderService.GetOrder"}
    rl = {"rate": 1_000_000, "per": "1s", "key": "ip"}
    return {
        "upstreams": {"default": backend},
        "edge": {
            "access_log": False,
            "auth": {
                "jwt": {
                    "audience": "bench",
                    "keys": [{"kid": "k", "algorithm": "HS256", "secret": HS_SECRET}],
                },
                "api_keys": {
                    "keys": [
                        {"name": "bench", "sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}
                    ]
                },
            },
            "profiles": {
                "none": {"prefix": "/none"},
                "jwt": {
                    "prefix": "/jwt",
                    "routes": [{"match": get_order, "auth": {"require": "jwt"}}],
                },
                "key": {
                    "prefix": "/key",
                    "routes": [{"match": get_order, "auth": {"require": "api_key"}}],
                },
                "rl": {"prefix": "/rl", "routes": [{"match": get_order, "rate_limit": rl}]},
                "cache": {
                    "prefix": "/cache",
                    "routes": [{"match": get_order, "cache": {"ttl": "600s"}}],
                },
                "all": {
                    "prefix": "/all",
                    "routes": [
                        {
                            "match": get_order,
                            "auth": {"require": "jwt"},
                            "rate_limit": rl,
                            "cache": {"ttl": "600s"},
                        }
                    ],
                },
            },
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v


def run_wrk(
    url: str, headers: dict[str, str], duration: int, connections: int, workdir: Path
) -> dict[str, float]:
    script = workdir / "wrk.lua"
    script.write_text("".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items()))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    reqs = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    # Anchored: "75.50%" in the thread-stats table must not match.
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    return {
        "rps": rps,
        "requests": reqs,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "p50_ms": _ms(p50.group(1)) if p50 else float("nan"),
        "p99_ms": _ms(p99.group(1)) if p99 else float("nan"),
    }


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


# --------------------------------------------------------------------------- child processes


async def _serve_backend(port: int) -> None:
    import grpc  # noqa: F401

    from tests.conftest import SHOP_DESCRIPTOR_SET  # noqa: F401  (generates the shop code)
    from tests.integration._edge_backends import ShopBackend

    b = ShopBackend("bench")
    await b.start()
    # Re-bind on the requested port: the test backend picks a free one itself.
    print(b.port, flush=True)
    await asyncio.Event().wait()


def _serve_gateways(backend: str, plain_port: int, edge_port: int, desc: str) -> None:
    import uvicorn

    from meshkit.gateway import create_app
    from meshkit.gateway.edge.edge import create_edge_app

    plain = create_app(desc, [backend])
    edge = create_edge_app(edge_config(backend), desc)

    async def main() -> None:
        servers = [
            uvicorn.Server(
                uvicorn.Config(
                    app,
                    host="127.0.0.1",
                    port=port,
                    loop="none",
                    http="httptools",
                    lifespan="off",
                    access_log=False,
                    log_level="warning",
                )
            )
            for app, port in ((plain, plain_port), (edge.asgi(), edge_port))
        ]
        await asyncio.gather(*(s.serve() for s in servers))

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# --------------------------------------------------------------------------- isolated costs


def isolated_costs(token: str, n: int = 20000) -> dict[str, float]:
    """CPU-us per request of each feature's middleware around a stub app, in-process:
    no network, no backend, so the machine's noise mostly cancels out."""
    from meshkit.auth import AuthConfig, Authenticator, hash_api_key
    from meshkit.gateway.edge.auth import AuthMiddleware, AuthPolicy
    from meshkit.gateway.edge.cache import CacheMiddleware, CacheRule, ResponseCache
    from meshkit.gateway.edge.observability import EdgeMetrics, TelemetryMiddleware
    from meshkit.gateway.edge.ratelimit import RateLimitMiddleware, RateLimitRule
    from meshkit.gateway.edge.shaping import ShapingMiddleware, ShapingRule

    body = json.dumps(
        {
            "orderId": "o-1",
            "customerId": "c-1",
            "status": "ORDER_STATUS_CREATED",
            "total": {"currency": "KRW", "amountMinor": "10000"},
            "items": [{"sku": "sku-1", "quantity": 2}],
        }
    ).encode()

    async def stub(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    auth_cfg = AuthConfig.from_mapping(
        {
            "jwt": {
                "audience": "bench",
                "keys": [{"kid": "k", "algorithm": "HS256", "secret": HS_SECRET}],
            },
            "api_keys": {"keys": [{"name": "b", "sha256": hash_api_key(API_KEY)}]},
        }
    )
    rl = RateLimitRule.from_mapping({"rate": 1e9, "per": "1s", "key": "ip"}, "rl")
    variants: dict[str, tuple[Any, list[tuple[bytes, bytes]]]] = {
        "stub": (stub, []),
        "auth_jwt_memoized": (
            AuthMiddleware(stub, Authenticator(auth_cfg), AuthPolicy("jwt")),
            [(b"authorization", b"Bearer " + token.encode())],
        ),
        "auth_jwt_verify_every_time": (
            AuthMiddleware(stub, Authenticator(auth_cfg, memo_size=0), AuthPolicy("jwt")),
            [(b"authorization", b"Bearer " + token.encode())],
        ),
        "auth_api_key": (
            AuthMiddleware(stub, Authenticator(auth_cfg), AuthPolicy("api_key")),
            [(b"x-api-key", API_KEY.encode())],
        ),
        "rate_limit": (RateLimitMiddleware(stub, rl), []),
        "cache_hit": (CacheMiddleware(stub, CacheRule(600.0), ResponseCache()), []),
        "shaping_mask": (ShapingMiddleware(stub, ShapingRule(fields=("orderId", "status"))), []),
        "telemetry_metrics": (
            TelemetryMiddleware(stub, metrics=EdgeMetrics(), access_logs=False, tracing=False),
            [],
        ),
    }

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def drive(app: Any, headers: list[tuple[bytes, bytes]]) -> float:
        base = {
            "type": "http",
            "method": "GET",
            "path": "/v1/orders/o-1",
            "raw_path": b"/v1/orders/o-1",
            "query_string": b"customer_id=c-1",
            "client": ("127.0.0.1", 1),
        }
        for _ in range(200):
            await app({**base, "headers": [(b"host", b"x"), *headers]}, receive, send)
        t0 = time.process_time()
        for _ in range(n):
            await app({**base, "headers": [(b"host", b"x"), *headers]}, receive, send)
        return (time.process_time() - t0) * 1e6 / n

    async def all_variants() -> dict[str, float]:
        return {name: await drive(app, h) for name, (app, h) in variants.items()}

    raw = asyncio.run(all_variants())
    return {
        name: round(v - raw["stub"], 2) if name != "stub" else round(v, 2)
        for name, v in raw.items()
    }


# --------------------------------------------------------------------------- driver


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-gateways", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_backend is not None:
        asyncio.run(_serve_backend(args.serve_backend))
        return 0
    if args.serve_gateways:
        b, pp, ep, desc = args.serve_gateways
        _serve_gateways(b, int(pp), int(ep), desc)
        return 0

    import jwt

    from tests.conftest import SHOP_DESCRIPTOR_SET

    token = jwt.encode(
        {"sub": "bench", "aud": "bench", "exp": int(time.time()) + 3600},
        HS_SECRET,
        algorithm="HS256",
        headers={"kid": "k"},
    )
    py = sys.executable
    backend = subprocess.Popen(
        [py, __file__, "--serve-backend", "0"], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert backend.stdout is not None
    bport = int(backend.stdout.readline())
    plain_port, edge_port = free_port(), free_port()
    gw = subprocess.Popen(
        [
            py,
            __file__,
            "--serve-gateways",
            f"127.0.0.1:{bport}",
            str(plain_port),
            str(edge_port),
            str(SHOP_DESCRIPTOR_SET),
        ],
        cwd=ROOT,
    )
    results: dict[str, list[dict[str, float]]] = {k: [] for k in VARIANTS}
    try:
        wait_port(plain_port, gw)
        wait_port(edge_port, gw)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for kind, prefix, hdrs in VARIANTS.values():  # warm-up: channels, caches
                port = plain_port if kind == "plain" else edge_port
                h = {k: v.replace("{jwt}", token) for k, v in hdrs.items()}
                run_wrk(f"http://127.0.0.1:{port}{prefix}{PATH}", h, 1, 4, work)
            for _ in range(args.rounds):
                for name, (kind, prefix, hdrs) in VARIANTS.items():
                    port = plain_port if kind == "plain" else edge_port
                    h = {k: v.replace("{jwt}", token) for k, v in hdrs.items()}
                    before = cpu_seconds(gw.pid)
                    r = run_wrk(
                        f"http://127.0.0.1:{port}{prefix}{PATH}",
                        h,
                        args.duration,
                        args.connections,
                        work,
                    )
                    r["cpu_us_per_request"] = (
                        (cpu_seconds(gw.pid) - before) * 1e6 / max(1, r["requests"])
                    )
                    results[name].append(r)
                    print(
                        f"{name:18s} {r['rps']:9.1f} rps  p50 {r['p50_ms']:6.2f} ms  "
                        f"p99 {r['p99_ms']:6.2f} ms  cpu {r['cpu_us_per_request']:7.1f} us/req  "
                        f"non-2xx {int(r['non_2xx'])}",
                        flush=True,
                    )
    finally:
        gw.terminate()
        backend.terminate()
        gw.wait(10)
        backend.wait(10)

    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for name, rs in results.items()
    }
    base = med["plain_gateway"]
    edge0 = med["edge_no_features"]
    out: dict[str, Any] = {
        "benchmark": "edge",
        "load_generator": "wrk -t1 (keep-alive)",
        "request": f"GET {PATH}",
        "duration_s": args.duration,
        "connections": args.connections,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "note": "one gateway process (uvloop+httptools) serving the plain gateway and the edge on two "
        "ports; medians over rounds; cpu = gateway process CPU / requests; edge access log off, "
        "metrics on",
        "variants": {},
    }
    for name, m in med.items():
        out["variants"][name] = {
            **m,
            "throughput_ratio_vs_plain": m["rps"] / base["rps"],
            "cpu_ratio_vs_plain": m["cpu_us_per_request"] / base["cpu_us_per_request"],
            "feature_cpu_us_vs_edge_no_features": m["cpu_us_per_request"]
            - edge0["cpu_us_per_request"],
        }
    out["cache_hit_cheaper_than_transcoded_call"] = (
        med["cache_hit"]["cpu_us_per_request"] < base["cpu_us_per_request"]
    )
    iso = isolated_costs(token)
    out["isolated_feature_cpu_us_per_request"] = iso
    out["isolated_note"] = (
        "in-process, middleware around a stub app, minus the stub's own cost "
        "(stub = bare ASGI call); medians are not needed: no network, no backend"
    )
    for name, v in iso.items():
        print(f"isolated {name:28s} {v:8.2f} us/req")
    dest = ROOT / "bench" / "results" / "edge.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"cache hit vs plain transcoded call: cpu ratio "
        f"{med['cache_hit']['cpu_us_per_request'] / base['cpu_us_per_request']:.2f}, "
        f"throughput ratio {med['cache_hit']['rps'] / base['rps']:.2f}"
    )
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
