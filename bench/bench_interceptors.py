"""meshkit's fused interceptors vs bare grpcio, in one run, on loopback.

The servers run in a child process (bare and meshkit side by side, sync and aio);
this process is the client. With meshkit, client and server both apply a deadline,
retries, a circuit breaker and a bulkhead (none of which fire: the cost measured is
the happy path). Runs alternate bare/meshkit (ABAB...) and the medians are compared:

* asyncio unary throughput with 50 concurrent calls (target: meshkit >= 0.90x bare);
* sync unary p50 latency, one call at a time (target: meshkit <= 1.10x bare);

then both again with the OpenTelemetry SDK on (a MeterProvider with a reader and a
TracerProvider) in both processes. Writes bench/results/interceptors.json.

    .venv/bin/python -m bench.bench_interceptors [--rounds 9] [--seconds 0.8] [--calls 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Unary"

POLICY = {
    "defaults": {},
    "rules": [
        {
            "match": SERVICE,
            "timeout": "2s",
            "retry": {
                "max_attempts": 3,
                "initial_backoff": "10ms",
                "retryable_codes": ["UNAVAILABLE"],
            },
            "circuit_breaker": {"window": {"type": "count", "size": 100}},
            "bulkhead": {"max_concurrent": 10000, "side": "both"},
        }
    ],
}


def _otel_on() -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    trace.set_tracer_provider(TracerProvider())


# ------------------------------------------------------------------------------ server


def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _aecho(request: bytes, context: Any) -> bytes:
    return request


def _handlers(fn: Any) -> list[grpc.GenericRpcHandler]:
    return [
        grpc.method_handlers_generic_handler(
            SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(fn)}
        )
    ]


def serve() -> None:
    """Child process: four servers; prints their ports as JSON, runs until stdin closes."""
    import meshkit.grpc
    import meshkit.grpc.aio
    from meshkit import Policy

    if os.environ.get("BENCH_OTEL") == "1":
        _otel_on()
    policy = Policy.from_dict(POLICY)
    ports: dict[str, int] = {}
    sync_servers = []
    for name, interceptors in (
        ("sync_bare", []),
        ("sync_mesh", meshkit.grpc.server_interceptors(policy)),
    ):
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=interceptors)
        srv.add_generic_rpc_handlers(_handlers(_echo))
        ports[name] = srv.add_insecure_port("127.0.0.1:0")
        srv.start()
        sync_servers.append(srv)

    async def main() -> None:
        servers = []
        for name, interceptors in (
            ("aio_bare", []),
            ("aio_mesh", meshkit.grpc.aio.server_interceptors(policy)),
        ):
            srv = grpc.aio.server(interceptors=interceptors)
            srv.add_generic_rpc_handlers(_handlers(_aecho))
            ports[name] = srv.add_insecure_port("127.0.0.1:0")
            await srv.start()
            servers.append(srv)
        print(json.dumps(ports), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for srv in servers:
            await srv.stop(0)

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(main())
    for s in sync_servers:
        s.stop(0)


# ------------------------------------------------------------------------------ client


def _cpu_reader(pid: int) -> Any:
    """CPU seconds used so far by this process plus the server child."""
    tick = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        child = (int(fields[11]) + int(fields[12])) / tick
        return time.process_time() + child

    return read


async def aio_throughput(
    target: str, mesh: bool, policy: Any, seconds: float, cpu: Any
) -> tuple[float, float]:
    import meshkit.grpc.aio

    interceptors = meshkit.grpc.aio.client_interceptors(policy, target=target) if mesh else None
    async with grpc.aio.insecure_channel(target, interceptors=interceptors) as ch:
        call = ch.unary_unary(METHOD)
        for _ in range(200):  # warm up
            await call(b"x")
        count = 0
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < end:
                await call(b"payload")
                count += 1

        start, cpu0 = time.perf_counter(), cpu()
        await asyncio.gather(*(worker() for _ in range(50)))
        elapsed, used = time.perf_counter() - start, cpu() - cpu0
        return count / elapsed, used / count * 1e6


def sync_p50(target: str, mesh: bool, policy: Any, calls: int, cpu: Any) -> tuple[float, float]:
    import meshkit.grpc

    raw = grpc.insecure_channel(target)
    ch = (
        grpc.intercept_channel(raw, *meshkit.grpc.client_interceptors(policy, target=target))
        if mesh
        else raw
    )
    call = ch.unary_unary(METHOD)
    for _ in range(200):
        call(b"x")
    samples = []
    clock = time.perf_counter
    cpu0 = cpu()
    for _ in range(calls):
        t = clock()
        call(b"payload")
        samples.append(clock() - t)
    used = cpu() - cpu0
    raw.close()
    return statistics.median(samples) * 1e6, used / calls * 1e6  # microseconds


def _phase(otel: bool, rounds: int, seconds: float, calls: int) -> dict[str, Any]:
    from meshkit import Policy

    env = dict(os.environ, BENCH_OTEL="1" if otel else "0")
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_interceptors", "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        ports = json.loads(child.stdout.readline())
        policy = Policy.from_dict(POLICY)
        t = {k: f"127.0.0.1:{v}" for k, v in ports.items()}
        cpu = _cpu_reader(child.pid)
        aio: dict[str, list[float]] = {"bare": [], "meshkit": []}
        sync: dict[str, list[float]] = {"bare": [], "meshkit": []}
        aio_cpu: dict[str, list[float]] = {"bare": [], "meshkit": []}
        sync_cpu: dict[str, list[float]] = {"bare": [], "meshkit": []}
        loop = asyncio.new_event_loop()
        try:
            for _ in range(rounds):
                # ABAB: bare then meshkit, each round, so drift hits both alike.
                for label, key, mesh in (
                    ("bare", "aio_bare", False),
                    ("meshkit", "aio_mesh", True),
                ):
                    rate, per_call = loop.run_until_complete(
                        aio_throughput(t[key], mesh, policy if mesh else None, seconds, cpu)
                    )
                    aio[label].append(rate)
                    aio_cpu[label].append(per_call)
                for label, key, mesh in (
                    ("bare", "sync_bare", False),
                    ("meshkit", "sync_mesh", True),
                ):
                    p50, per_call = sync_p50(t[key], mesh, policy if mesh else None, calls, cpu)
                    sync[label].append(p50)
                    sync_cpu[label].append(per_call)
        finally:
            loop.close()
        child.stdin.close()
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    med = statistics.median
    aio_bare, aio_mesh = med(aio["bare"]), med(aio["meshkit"])
    sync_bare, sync_mesh = med(sync["bare"]), med(sync["meshkit"])
    acpu_bare, acpu_mesh = med(aio_cpu["bare"]), med(aio_cpu["meshkit"])
    scpu_bare, scpu_mesh = med(sync_cpu["bare"]), med(sync_cpu["meshkit"])
    return {
        "aio_unary_50_concurrent": {
            "unit": "calls/s",
            "bare_median": round(aio_bare, 1),
            "meshkit_median": round(aio_mesh, 1),
            "throughput_ratio": round(aio_mesh / aio_bare, 3),
            # Each round's bare and meshkit runs are adjacent in time: the median of the
            # per-round ratios is less exposed to a shared machine's swings.
            "paired_throughput_ratio": round(
                med(m / b for b, m in zip(aio["bare"], aio["meshkit"], strict=True)), 3
            ),
            "target": ">= 0.90",
            "runs": {k: [round(x, 1) for x in v] for k, v in aio.items()},
            # CPU (client + server processes) per call: steadier than wall-clock
            # throughput on a shared machine; bare/meshkit is the CPU-bound throughput ratio.
            "cpu_us_per_call": {"bare": round(acpu_bare, 1), "meshkit": round(acpu_mesh, 1)},
            "cpu_throughput_ratio": round(acpu_bare / acpu_mesh, 3),
        },
        "sync_unary_p50": {
            "unit": "us",
            "bare_median": round(sync_bare, 1),
            "meshkit_median": round(sync_mesh, 1),
            "latency_ratio": round(sync_mesh / sync_bare, 3),
            "paired_latency_ratio": round(
                med(m / b for b, m in zip(sync["bare"], sync["meshkit"], strict=True)), 3
            ),
            "target": "<= 1.10",
            "runs": {k: [round(x, 1) for x in v] for k, v in sync.items()},
            "cpu_us_per_call": {"bare": round(scpu_bare, 1), "meshkit": round(scpu_mesh, 1)},
            "cpu_ratio": round(scpu_mesh / scpu_bare, 3),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.8, help="per aio throughput run")
    parser.add_argument("--calls", type=int, default=1000, help="per sync latency run")
    args = parser.parse_args()
    if args.serve:
        serve()
        return 0
    started = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "interceptors",
        "policy": "deadline + retry + circuit breaker + bulkhead, client and server",
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
    }
    results["otel_off"] = _phase(False, args.rounds, args.seconds, args.calls)
    # The SDK goes on for the second phase, in this process and the server's.
    _otel_on()
    results["otel_sdk_on"] = _phase(True, args.rounds, args.seconds, args.calls)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    out = ROOT / "bench" / "results" / "interceptors.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for phase in ("otel_off", "otel_sdk_on"):
        a = results[phase]["aio_unary_50_concurrent"]
        s = results[phase]["sync_unary_p50"]
        print(
            f"{phase:12s} aio 50-concurrent: bare {a['bare_median']:.0f}/s, "
            f"meshkit {a['meshkit_median']:.0f}/s, ratio {a['throughput_ratio']:.3f} "
            f"(paired {a['paired_throughput_ratio']:.3f}; >= 0.90); "
            f"cpu/call {a['cpu_us_per_call']['bare']:.0f} vs "
            f"{a['cpu_us_per_call']['meshkit']:.0f}us, ratio {a['cpu_throughput_ratio']:.3f}"
        )
        print(
            f"{phase:12s} sync p50: bare {s['bare_median']:.0f}us, "
            f"meshkit {s['meshkit_median']:.0f}us, ratio {s['latency_ratio']:.3f} "
            f"(paired {s['paired_latency_ratio']:.3f}; <= 1.10); "
            f"cpu/call ratio {s['cpu_ratio']:.3f}"
        )
    print(f"wrote {out.relative_to(ROOT)} in {results['elapsed_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
