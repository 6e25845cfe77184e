"""meshkit's fused interceptors vs bare grpcio, in one run, on loopback.

The servers run in a child process (bare and meshkit side by side, sync and aio);
this process is the client. With meshkit, client and server both apply a deadline,
retries, a circuit breaker and a bulkhead (none of which fire: the cost measured is
the happy path). Each phase runs many short rounds; each round runs bare and meshkit
back to back (ABBA: the order flips every round so drift and warm-up hit both alike):

* asyncio unary throughput with 50 concurrent calls (target: meshkit >= 0.90x bare);
* sync unary p50 latency, one call at a time (target: meshkit <= 1.10x bare);

and for every run the CPU time per call of the client process and of the server
process, measured separately (``time.process_time()`` in each: all threads, ns
resolution; the child reports its own on request). On a shared, loaded machine the
wall-clock numbers swing with the neighbours; CPU per call does not (a busy neighbour
delays our work, it does not add to it), so the CPU ratios are the trustworthy ones.
Each number is quoted as the ratio of the medians over the rounds, plus the median of
the per-round ratios. Then everything again with the OpenTelemetry SDK on (a
MeterProvider with a reader and a TracerProvider) in both processes.
Writes bench/results/interceptors.json.

    .venv/bin/python -m bench.bench_interceptors [--rounds 25] [--aio-calls 600]
        [--sync-calls 300] [--phases off,on]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
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
CONCURRENCY = 50

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
    """Child process: four servers; prints their ports as JSON, then answers each
    ``cpu`` line on stdin with its own CPU seconds so far; stops when stdin closes."""
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

    def answer_cpu(done: threading.Event) -> None:
        # A thread of its own (not the event loop): a reading costs the servers nothing.
        for line in sys.stdin:
            if line.strip() == "cpu":
                sys.stdout.write(f"{time.process_time():.9f}\n")
                sys.stdout.flush()
        done.set()

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
        done = threading.Event()
        print(json.dumps(ports), flush=True)
        threading.Thread(target=answer_cpu, args=(done,), daemon=True).start()
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
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


class _NoopAio(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """The floor: a hand-written pass-through that waits for the outcome, as any
    interceptor that acts on a status must. grpcio's interceptor machinery alone."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        await call
        return call


class _NoopSync(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """See :class:`_NoopAio`."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        outcome.code()
        return outcome


class _Child:
    """The server process, and its CPU seconds on request."""

    def __init__(self, otel: bool) -> None:
        env = dict(os.environ, BENCH_OTEL="1" if otel else "0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_interceptors", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self._in, self._out = self.proc.stdin, self.proc.stdout
        self.ports: dict[str, int] = json.loads(self._out.readline())

    def cpu(self) -> float:
        self._in.write("cpu\n")
        self._in.flush()
        return float(self._out.readline())

    def close(self) -> None:
        try:
            self._in.close()
            self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


class _Sample:
    """One run: its wall-clock figure and CPU microseconds per call on each side."""

    __slots__ = ("client_us", "server_us", "wall")

    def __init__(self, wall: float, client_us: float, server_us: float) -> None:
        self.wall = wall
        self.client_us = client_us
        self.server_us = server_us


async def _aio_run(call: Any, calls: int, child: _Child) -> _Sample:
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call(b"payload")

    s0, c0, t0 = child.cpu(), time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    t1, c1, s1 = time.perf_counter(), time.process_time(), child.cpu()
    return _Sample(calls / (t1 - t0), (c1 - c0) / calls * 1e6, (s1 - s0) / calls * 1e6)


def _sync_run(call: Any, calls: int, child: _Child) -> _Sample:
    samples = []
    clock = time.perf_counter
    s0, c0 = child.cpu(), time.process_time()
    for _ in range(calls):
        t = clock()
        call(b"payload")
        samples.append(clock() - t)
    c1, s1 = time.process_time(), child.cpu()
    return _Sample(
        statistics.median(samples) * 1e6, (c1 - c0) / calls * 1e6, (s1 - s0) / calls * 1e6
    )


def _summary(
    runs: dict[str, list[_Sample]], unit: str, target: str, higher_is_better: bool
) -> dict[str, Any]:
    out = _compare(runs["bare"], runs["meshkit"], unit, target, higher_is_better)
    if runs.get("noop"):
        # grpcio's own cost of one Python interceptor (client side only; bare server):
        # the part of meshkit's client ratio that no interceptor can avoid.
        ref = _compare(runs["bare"], runs["noop"], unit, target, higher_is_better)
        out["noop_interceptor_reference"] = {
            "wall_ratio": ref["wall"]["ratio"],
            "cpu_client_ratio": ref["cpu_client"]["ratio"],
            "cpu_client_paired_ratio": ref["cpu_client"]["paired_ratio"],
            "cpu_client_us_median": ref["cpu_client"]["meshkit_median"],
        }
    if runs.get("bare_again"):
        # A/A control: bare against a second bare channel. Its distance from 1.0 is
        # the noise of this run's ratios.
        aa = _compare(runs["bare"], runs["bare_again"], unit, target, higher_is_better)
        out["aa_control"] = {
            "wall_ratio": aa["wall"]["ratio"],
            "cpu_client_ratio": aa["cpu_client"]["ratio"],
            "cpu_server_ratio": aa["cpu_server"]["ratio"],
            "cpu_total_ratio": aa["cpu_total"]["ratio"],
            "cpu_total_paired_ratio": aa["cpu_total"]["paired_ratio"],
        }
    return out


def _compare(
    bare: list[_Sample], mesh: list[_Sample], unit: str, target: str, higher_is_better: bool
) -> dict[str, Any]:
    med = statistics.median

    def figure(get: Any, scale: int) -> dict[str, Any]:
        b, m = [get(s) for s in bare], [get(s) for s in mesh]
        return {
            "bare_median": round(med(b), 1),
            "meshkit_median": round(med(m), 1),
            # meshkit / bare: above 1 means meshkit is bigger (more CPU, more latency).
            "ratio": round(med(m) / med(b), 3),
            # Each round's two runs are adjacent in time; the median of their ratios
            # is the least exposed to a shared machine's swings.
            "paired_ratio": round(med(y / x for x, y in zip(b, m, strict=True)), 3),
            "runs": {"bare": [round(x, scale) for x in b], "meshkit": [round(x, scale) for x in m]},
        }

    wall = figure(lambda s: s.wall, 1)
    client = figure(lambda s: s.client_us, 1)
    server = figure(lambda s: s.server_us, 1)
    total = figure(lambda s: s.client_us + s.server_us, 1)
    for f in (client, server, total):
        f["unit"] = "cpu us/call"
        f["target"] = "<= 1.10"
    wall["unit"] = unit
    wall["target"] = target
    key = "throughput_ratio" if higher_is_better else "latency_ratio"
    return {
        key: wall["ratio"],
        f"paired_{key}": wall["paired_ratio"],
        "wall": wall,
        "cpu_client": client,
        "cpu_server": server,
        "cpu_total": total,
    }


def _phase(
    otel: bool, rounds: int, aio_calls: int, sync_calls: int, reference: bool
) -> dict[str, Any]:
    import meshkit.grpc
    import meshkit.grpc.aio
    from meshkit import Policy

    child = _Child(otel)
    policy = Policy.from_dict(POLICY)
    t = {k: f"127.0.0.1:{v}" for k, v in child.ports.items()}
    labels: tuple[str, ...] = ("bare", "meshkit")
    if reference:
        labels = ("bare", "meshkit", "noop", "bare_again")
    aio: dict[str, list[_Sample]] = {k: [] for k in labels}
    sync: dict[str, list[_Sample]] = {k: [] for k in labels}
    loop = asyncio.new_event_loop()
    raw_sync = {
        "bare": grpc.insecure_channel(t["sync_bare"]),
        "mesh": grpc.insecure_channel(t["sync_mesh"]),
        "bare_again": grpc.insecure_channel(t["sync_bare"]),
    }
    try:

        async def open_aio() -> dict[str, Any]:
            # grpc.aio channels bind to the loop running when they are made.
            return {
                "bare": grpc.aio.insecure_channel(t["aio_bare"]),
                "meshkit": grpc.aio.insecure_channel(
                    t["aio_mesh"],
                    interceptors=meshkit.grpc.aio.client_interceptors(policy, target=t["aio_mesh"]),
                ),
                "noop": grpc.aio.insecure_channel(t["aio_bare"], interceptors=[_NoopAio()]),
                "bare_again": grpc.aio.insecure_channel(t["aio_bare"]),
            }

        achans = loop.run_until_complete(open_aio())
        acalls = {k: ch.unary_unary(METHOD) for k, ch in achans.items()}
        scalls = {
            "bare": raw_sync["bare"].unary_unary(METHOD),
            "meshkit": grpc.intercept_channel(
                raw_sync["mesh"],
                *meshkit.grpc.client_interceptors(policy, target=t["sync_mesh"]),
            ).unary_unary(METHOD),
            "noop": grpc.intercept_channel(raw_sync["bare"], _NoopSync()).unary_unary(METHOD),
            "bare_again": raw_sync["bare_again"].unary_unary(METHOD),
        }

        async def warm() -> None:
            for call in acalls.values():
                await asyncio.gather(*(call(b"x") for _ in range(300)))

        loop.run_until_complete(warm())
        for call in scalls.values():
            for _ in range(300):
                call(b"x")
        for i in range(rounds):
            # ABBA: the order reverses every round, so drift hits every variant alike.
            order = labels if i % 2 == 0 else labels[::-1]
            for label in order:
                aio[label].append(
                    loop.run_until_complete(_aio_run(acalls[label], aio_calls, child))
                )
            for label in order:
                sync[label].append(_sync_run(scalls[label], sync_calls, child))
        for ch in achans.values():
            loop.run_until_complete(ch.close())
    finally:
        loop.close()
        for ch in raw_sync.values():
            ch.close()
        child.close()
    return {
        "aio_unary_50_concurrent": {
            "calls_per_run": aio_calls,
            **_summary(aio, "calls/s", ">= 0.90", True),
        },
        "sync_unary_p50": {
            "calls_per_run": sync_calls,
            **_summary(sync, "us", "<= 1.10", False),
        },
    }


def _line(phase: str, name: str, r: dict[str, Any]) -> str:
    w = r["wall"]
    parts = [
        f"{phase:7s} {name:5s} wall {w['bare_median']:.0f} vs {w['meshkit_median']:.0f} {w['unit']}"
        f" ratio {w['ratio']:.3f} (paired {w['paired_ratio']:.3f}; {w['target']})"
    ]
    for side in ("client", "server", "total"):
        c = r[f"cpu_{side}"]
        parts.append(
            f"cpu {side} {c['bare_median']:.0f} vs {c['meshkit_median']:.0f}us"
            f" x{c['ratio']:.3f} (paired {c['paired_ratio']:.3f})"
        )
    ref = r.get("noop_interceptor_reference")
    if ref:
        parts.append(
            f"reference: a no-op interceptor alone costs cpu client x{ref['cpu_client_ratio']:.3f}"
            f" (paired {ref['cpu_client_paired_ratio']:.3f}), wall x{ref['wall_ratio']:.3f}"
        )
    aa = r.get("aa_control")
    if aa:
        parts.append(
            f"A/A control (bare vs bare): cpu total x{aa['cpu_total_ratio']:.3f}"
            f" (paired {aa['cpu_total_paired_ratio']:.3f}), client x{aa['cpu_client_ratio']:.3f},"
            f" server x{aa['cpu_server_ratio']:.3f}, wall x{aa['wall_ratio']:.3f}"
        )
    return "\n        ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--aio-calls", type=int, default=600, help="per aio throughput run")
    parser.add_argument("--sync-calls", type=int, default=300, help="per sync latency run")
    parser.add_argument("--phases", default="off,on", help="OpenTelemetry SDK off, on or both")
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the reference runs: a no-op interceptor (grpcio's interceptor floor) "
        "and an A/A control (bare vs bare, the noise floor)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "interceptors.json"))
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
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "read_me": "cpu_* are CPU microseconds per call of each process (steady under load); "
        "wall is throughput (aio) or p50 latency (sync) and swings with the machine's load. "
        "ratio = median(meshkit)/median(bare); paired_ratio = median of per-round ratios.",
    }
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    for phase in phases:
        if phase == "on":
            _otel_on()  # this process; the child turns it on from BENCH_OTEL
        results[f"otel_{'sdk_on' if phase == 'on' else 'off'}"] = _phase(
            phase == "on",
            args.rounds,
            args.aio_calls,
            args.sync_calls,
            reference=phase == "off" and not args.no_reference,
        )
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for key in ("otel_off", "otel_sdk_on"):
        if key in results:
            print(_line(key[5:], "aio", results[key]["aio_unary_50_concurrent"]))
            print(_line(key[5:], "sync", results[key]["sync_unary_p50"]))
    print(f"wrote {out} in {results['elapsed_s']}s ({args.rounds} rounds per phase)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
