"""meshkit gateway vs Envoy's grpc_json_transcoder, same backend, same load generator.

Scenarios: GET with path and query variables, POST with a JSON body. For each
gateway: requests/s, p50/p99 latency (wrk --latency) and CPU-microseconds per
request of the gateway process (utime+stime from /proc/<pid>/stat).

    .venv/bin/python bench/bench_gateway.py [--duration 10] [--connections 32]

Needs wrk (Debian package ``wrk``). Writes bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from gateway_backend import compile_descriptor_sets, free_port, load_catalog, shop_backend  # noqa: E402
from gateway_envoy import Envoy  # noqa: E402

SHOP_SERVICES = [
    "shop.v1.OrderService",
    "shop.v1.InventoryService",
    "shop.v1.PaymentService",
    "shop.v1.ShippingService",
    "shop.v1.NotificationService",
]
POST_BODY = json.dumps(
    {
        "customerId": "c-42",
        "requestId": "bench",
        "items": [
            {
                "sku": "sku-1",
                "quantity": 2,
                "unitPrice": {"currency": "KRW", "amountMinor": "1500"},
            },
            {"sku": "sku-2", "quantity": 1, "unitPrice": {"currency": "KRW", "amountMinor": "990"}},
        ],
        "shippingAddress": {
            "name": "Kim",
            "line1": "1 Main St",
            "city": "Seoul",
            "postalCode": "04524",
            "country": "KR",
        },
    }
)
SCENARIOS = {
    "get_path_query": ("GET", "/v1/orders/o-1?customer_id=c-1", None),
    "post_json": ("POST", "/v1/orders", POST_BODY),
}
TICK = os.sysconf("SC_CLK_TCK")


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
    url: str, method: str, body: str | None, duration: int, connections: int, workdir: Path
) -> dict[str, float]:
    script = workdir / f"wrk_{method}.lua"
    lines = [f'wrk.method = "{method}"', 'wrk.headers["Content-Type"] = "application/json"']
    if body is not None:
        lines.append(f"wrk.body = {json.dumps(body)}")
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": total, "non_2xx": errors}


def measure(
    pid: int, base: str, scenario: str, duration: int, connections: int, workdir: Path
) -> dict[str, float]:
    method, path, body = SCENARIOS[scenario]
    run_wrk(base + path, method, body, 2, connections, workdir)  # warm-up
    before = cpu_seconds(pid)
    res = run_wrk(base + path, method, body, duration, connections, workdir)
    used = cpu_seconds(pid) - before
    res["cpu_us_per_request"] = used * 1e6 / max(1, res["requests"])
    return res


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


def _bare_app(desc: Path, upstream: str) -> object:
    """The floor: a hand-written uvicorn + grpc.aio proxy for just these two routes
    (no routing table, no header handling, json_format both ways)."""
    import grpc
    from google.protobuf import json_format

    cat = load_catalog(desc)
    get_req = cat.message_class("shop.v1.GetOrderRequest")
    create_req = cat.message_class("shop.v1.CreateOrderRequest")
    order = cat.message_class("shop.v1.Order")
    calls: dict[str, object] = {}

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return
        if not calls:
            ch = grpc.aio.insecure_channel(upstream)
            for name, req in (("GetOrder", get_req), ("CreateOrder", create_req)):
                calls[name] = ch.unary_unary(
                    f"/shop.v1.OrderService/{name}",
                    request_serializer=req.SerializeToString,
                    response_deserializer=order.FromString,
                )
        if scope["method"] == "GET":
            msg = get_req(order_id=scope["path"].rsplit("/", 1)[1])
            for pair in scope["query_string"].decode().split("&"):
                k, _, v = pair.partition("=")
                if k == "customer_id":
                    msg.customer_id = v
            call = calls["GetOrder"]
        else:
            body = b""
            while True:
                m = await receive()  # type: ignore[operator]
                body += m.get("body", b"")
                if not m.get("more_body"):
                    break
            msg = json_format.Parse(body, create_req())
            call = calls["CreateOrder"]
        resp = await call(msg)  # type: ignore[operator]
        out = json_format.MessageToJson(resp, indent=None).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,  # type: ignore[operator]
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(out)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": out})  # type: ignore[operator]

    return app


def _serve_bare(desc: Path, upstream: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        _bare_app(desc, upstream),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


async def _serve_backend(desc: Path, port: int) -> None:
    backend = shop_backend(load_catalog(desc))
    await backend.start(port)
    await asyncio.Event().wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds per scenario")
    ap.add_argument("--serve-backend", nargs=2, metavar=("DESC", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--serve-bare", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--no-bare", action="store_true", help="skip the bare-proxy reference")
    ap.add_argument(
        "--baseline",
        nargs=2,
        metavar=("ROOT", "PYTHON"),
        help="also run the meshkit gateway of another checkout (e.g. a `git worktree` of an "
        "earlier commit) with its own interpreter, in the same alternating rounds, and "
        "report this tree's CPU per request against it",
    )
    args = ap.parse_args()
    if args.serve_bare:
        _serve_bare(Path(args.serve_bare[0]), args.serve_bare[1], int(args.serve_bare[2]))
        return 0
    if args.serve_backend:
        asyncio.run(_serve_backend(Path(args.serve_backend[0]), int(args.serve_backend[1])))
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        desc = compile_descriptor_sets(work)["shop"]
        bport, gport = free_port(), free_port()
        procs: list[subprocess.Popen[bytes]] = []
        envoy: Envoy | None = None
        try:
            backend = subprocess.Popen([py, __file__, "--serve-backend", str(desc), str(bport)])
            procs.append(backend)
            wait_port(bport, backend)

            def start_gateway(python: str, root: Path, port: int) -> subprocess.Popen[bytes]:
                cli = [python, "-m", "meshkit.cli", "gateway", "--descriptor-set", str(desc)]
                proc = subprocess.Popen(
                    [*cli, "--upstream", f"127.0.0.1:{bport}", "--port", str(port)], cwd=root
                )
                procs.append(proc)
                wait_port(port, proc)
                return proc

            gateway = start_gateway(py, ROOT, gport)
            envoy = Envoy(work, desc, SHOP_SERVICES, bport, concurrency=1)
            targets = {
                "meshkit": (gateway.pid, f"http://127.0.0.1:{gport}"),
                "envoy": (envoy.proc.pid, envoy.url),
            }
            if args.baseline:
                base_port = free_port()
                base = start_gateway(args.baseline[1], Path(args.baseline[0]), base_port)
                targets["baseline"] = (base.pid, f"http://127.0.0.1:{base_port}")
            if not args.no_bare:
                bare_port = free_port()
                bare = subprocess.Popen(
                    [py, __file__, "--serve-bare", str(desc), f"127.0.0.1:{bport}", str(bare_port)]
                )
                procs.append(bare)
                wait_port(bare_port, bare)
                targets["bare_proxy"] = (bare.pid, f"http://127.0.0.1:{bare_port}")
            results: dict[str, dict[str, list[dict[str, float]]]] = {}
            for scenario in SCENARIOS:
                for r in range(args.rounds):
                    order = [
                        n for n in ("envoy", "meshkit", "bare_proxy", "baseline") if n in targets
                    ]
                    if r % 2:
                        order.reverse()
                    for name in order:
                        pid, base = targets[name]
                        res = measure(pid, base, scenario, args.duration, args.connections, work)
                        results.setdefault(scenario, {}).setdefault(name, []).append(res)
                        print(
                            f"{scenario:15s} {name:8s} {res['rps']:8.0f} rps  p50 {res['p50_ms']:.2f} ms"
                            f"  p99 {res['p99_ms']:.2f} ms  cpu {res['cpu_us_per_request']:.0f} us/req"
                            f"  non2xx {res['non_2xx']}"
                        )
        finally:
            if envoy is not None:
                envoy.stop()
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    summary: dict[str, object] = {}
    for scenario, by in results.items():
        med = {
            name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            for name, runs in by.items()
        }
        m, e = med["meshkit"], med["envoy"]
        summary[scenario] = {
            **med,
            "runs": by,
            "throughput_ratio": m["rps"] / e["rps"],
            "p99_ratio": m["p99_ms"] / e["p99_ms"],
            "p50_ratio": m["p50_ms"] / e["p50_ms"],
            "cpu_ratio": m["cpu_us_per_request"] / e["cpu_us_per_request"],
            "targets_met": m["rps"] >= 0.9 * e["rps"] and m["p99_ms"] <= 1.5 * e["p99_ms"],
        }
        if "bare_proxy" in med:
            b = med["bare_proxy"]
            summary[scenario]["bare_proxy_vs_envoy_throughput"] = b["rps"] / e["rps"]  # type: ignore[index]
            summary[scenario]["meshkit_vs_bare_proxy_cpu"] = (
                m["cpu_us_per_request"] / b["cpu_us_per_request"]
            )  # type: ignore[index]
        if "baseline" in med:
            base = med["baseline"]
            summary[scenario]["meshkit_vs_baseline_cpu"] = (  # type: ignore[index]
                m["cpu_us_per_request"] / base["cpu_us_per_request"]
            )
            summary[scenario]["meshkit_vs_baseline_throughput"] = m["rps"] / base["rps"]  # type: ignore[index]
            print(
                f"{scenario}: cpu/req {summary[scenario]['meshkit_vs_baseline_cpu']:.2f}x "  # type: ignore[index]
                f"the baseline ({args.baseline[0]})"
            )
        print(
            f"{scenario}: throughput {summary[scenario]['throughput_ratio']:.2f}x envoy, "  # type: ignore[index]
            f"p99 {summary[scenario]['p99_ratio']:.2f}x, cpu/req {summary[scenario]['cpu_ratio']:.2f}x"
        )  # type: ignore[index]
    out = {
        "benchmark": "gateway",
        "load_generator": "wrk -t1 (keep-alive)",
        "duration_s": args.duration,
        "connections": args.connections,
        "rounds": args.rounds,
        "baseline": args.baseline[0] if args.baseline else None,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "note": "medians over alternating rounds (short rounds, so a busy shared machine "
        "disturbs every target alike); cpu_us_per_request is utime+stime of the gateway "
        "process only; same Python grpc.aio backend; "
        "meshkit: 1 worker of its own HTTP server (uvloop+httptools); envoy --concurrency 1; "
        "bare_proxy: hand-written uvicorn+grpc.aio proxy for the two routes (the floor)",
        "scenarios": summary,
    }
    dest = ROOT / "bench" / "results" / "gateway.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
