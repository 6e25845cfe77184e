"""The order saga (every participant its own process) vs raw JetStream, in one run.

* raw: publish N events with nats-py (awaiting each PubAck, a window in flight) while
  a pull consumer fetches and acks them — the floor any event-driven design pays;
* saga at saturation: S orders placed over gRPC as fast as the order service takes
  them; each success saga is 6 events (OrderCreated, StockReserved, PaymentCompleted,
  ShipmentScheduled, OrderCompleted, CustomerNotified), each handled by a separate
  participant process in a SQLite transaction with its inbox, then published and acked;
* saga at a moderate fixed rate: latency p50/p99 from CreateOrder to CustomerNotified.

The ratio is the saga's event rate (6 x completed sagas/s) over the raw event rate for
the same number of events. Targets: ratio >= 0.5; p99 < 50 ms at the moderate rate.
CPU time per saga is recorded per process (Linux /proc): on a shared machine it is a
steadier measure than wall-clock rates. Writes bench/results/saga.json.

    .venv/bin/python -m bench.bench_saga [--sagas 2000] [--rounds 5] [--rate 50] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVENTS_PER_SAGA = 6


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def bench_raw(url: str, n: int, window: int = 256) -> dict[str, Any]:
    """Publish n events (awaiting PubAcks, ``window`` in flight) while a pull consumer acks them."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    name = f"RAW{uuid.uuid4().hex[:6]}"
    await js.add_stream(
        StreamConfig(name=name, subjects=[f"{name.lower()}.>"], duplicate_window=120)
    )
    sub = await js.pull_subscribe(
        f"{name.lower()}.>",
        durable="raw",
        stream=name,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20000),
    )
    payload = os.urandom(120)
    done = asyncio.Event()
    acked = 0

    async def consume() -> None:
        nonlocal acked
        while acked < n:
            try:
                msgs = await sub.fetch(256, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
            acked += len(msgs)
        done.set()

    async def publish() -> None:
        sem = asyncio.Semaphore(window)

        async def one(i: int) -> None:
            async with sem:
                await js.publish(
                    f"{name.lower()}.ev",
                    payload,
                    headers={"Nats-Msg-Id": f"{name}-{i}", "Meshkit-Event-Type": "raw"},
                )

        await asyncio.gather(*(one(i) for i in range(n)))

    t0 = time.perf_counter()
    consumer = asyncio.create_task(consume())
    await publish()
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - t0
    await consumer
    await js.delete_stream(name)
    await nc.close()
    return {"events": n, "seconds": round(elapsed, 3), "events_per_s": round(n / elapsed, 1)}


class SagaDriver:
    """Places orders over gRPC and times each saga until its CustomerNotified event."""

    def __init__(self, url: str, order_address: str) -> None:
        self.url = url
        self.order_address = order_address
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.outcome: dict[str, str] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> None:
        import nats

        from examples.shop import wiring
        from examples.shop.gen.shop.v1 import orders_pb2_grpc

        self.nc = await nats.connect(self.url)
        # A core subscription sees every stored event without being a JetStream consumer.
        await self.nc.subscribe("shop.events.shop.v1.CustomerNotified", cb=self._on_done)
        self.channel = wiring.channel(self.order_address)
        self.stub = orders_pb2_grpc.OrderServiceStub(self.channel)

    async def _on_done(self, msg: Any) -> None:
        saga = (msg.headers or {}).get("Meshkit-Saga-Id", "")
        if saga and saga not in self.finished:
            self.finished[saga] = time.perf_counter()
            fut = self._waiters.pop(saga, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def order(self, request_id: str) -> str:
        from examples.shop.gen.shop.v1 import common_pb2, orders_pb2

        req = orders_pb2.CreateOrderRequest(
            customer_id="bench",
            items=[
                common_pb2.LineItem(
                    sku="pen",
                    quantity=1,
                    unit_price=common_pb2.Money(currency="KRW", amount_minor=1200),
                )
            ],
            shipping_address=common_pb2.Address(
                name="b", line1="1", city="Seoul", postal_code="1", country="KR"
            ),
            request_id=request_id,
        )
        t0 = time.perf_counter()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        order_id = uuid.uuid5(
            uuid.NAMESPACE_URL, f"order/{request_id}"
        ).hex  # as the service derives it
        self._waiters[order_id] = fut
        self.started[order_id] = t0
        got = await self.stub.CreateOrder(req, timeout=30)
        assert got.order_id == order_id, "order id derivation changed"
        return order_id

    async def wait_all(self, ids: list[str], within: float) -> None:
        pending = [self._waiters[i] for i in ids if i in self._waiters and i not in self.finished]
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending), within)

    def latencies_ms(self, ids: list[str]) -> list[float]:
        return [(self.finished[i] - self.started[i]) * 1000 for i in ids if i in self.finished]

    async def close(self) -> None:
        await self.channel.close()
        await self.nc.close()


async def add_stock(address: str, sku: str, qty: int) -> None:
    from examples.shop import wiring
    from examples.shop.gen.shop.v1 import inventory_pb2, inventory_pb2_grpc

    async with wiring.channel(address) as ch:
        stub = inventory_pb2_grpc.InventoryServiceStub(ch)

        async def adjustments() -> Any:
            yield inventory_pb2.StockAdjustment(sku=sku, delta=qty)

        await stub.AdjustStock(adjustments(), timeout=10)


async def saturation(driver: SagaDriver, n: int, concurrency: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    tag = uuid.uuid4().hex[:8]

    async def one(i: int) -> str:
        async with sem:
            return await driver.order(f"sat-{tag}-{i}")

    t0 = time.perf_counter()
    ids = await asyncio.gather(*(one(i) for i in range(n)))
    await driver.wait_all(ids, within=150)
    elapsed = max(driver.finished[i] for i in ids) - t0
    lat = driver.latencies_ms(ids)
    return {
        "sagas": n,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "sagas_per_s": round(n / elapsed, 1),
        "events_per_s": round(n * EVENTS_PER_SAGA / elapsed, 1),
        "p50_ms": round(_pct(lat, 50), 2),
        "p99_ms": round(_pct(lat, 99), 2),
    }


async def moderate(driver: SagaDriver, rate: float, seconds: float) -> dict[str, Any]:
    n = int(rate * seconds)
    tag = uuid.uuid4().hex[:8]
    t0 = time.perf_counter()
    tasks = []
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(driver.order(f"mod-{tag}-{i}")))
    ids = await asyncio.gather(*tasks)
    await driver.wait_all(ids, within=60)
    lat = driver.latencies_ms(ids)
    return {
        "rate_per_s": rate,
        "sagas": n,
        "p50_ms": round(_pct(lat, 50), 2),
        "p90_ms": round(_pct(lat, 90), 2),
        "p99_ms": round(_pct(lat, 99), 2),
        "max_ms": round(max(lat), 2),
        "mean_ms": round(statistics.fmean(lat), 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from examples.shop._gen import ensure_generated

    load_at_start = os.getloadavg()[0]
    ensure_generated()
    from examples.shop.runner import SAGA_SERVICES, ShopCluster
    from meshkit.nats import NatsServer

    async with NatsServer() as server:
        # The saga's own processes: the five participants. The CQRS query service follows
        # the same events for the read side; its catch-up rate is in eventstore.json.
        cluster = ShopCluster(
            server.url,
            services=SAGA_SERVICES,
            env={
                n: {"SHOP_LOG_LEVEL": "ERROR"}
                for n in ("order", "inventory", "payment", "shipping", "notification")
            },
        )
        await asyncio.to_thread(cluster.start)
        driver = SagaDriver(server.url, cluster.address("order"))
        try:
            await driver.start()
            await add_stock(cluster.address("inventory"), "pen", 1_000_000)
            print("warm-up ...", flush=True)
            await saturation(driver, 100, 50)
            pids = {n: p.proc.pid for n, p in cluster.procs.items()}
            pids["nats-server"] = server.pid or 0
            pids["driver"] = os.getpid()
            raw_pids = {"nats-server": server.pid or 0, "driver": os.getpid()}
            sats: list[dict[str, Any]] = []
            raws: list[dict[str, Any]] = []
            # Alternating rounds: a shared machine's noise then hits both sides alike.
            for r in range(1, args.rounds + 1):
                print(
                    f"round {r}/{args.rounds}: saga saturation, {args.sagas} sagas ...", flush=True
                )
                before = {n: _cpu_seconds(pid) for n, pid in pids.items()}
                sat = await saturation(driver, args.sagas, args.concurrency)
                cpu = {
                    n: round((_cpu_seconds(pid) - before[n]) * 1000 / args.sagas, 3)
                    for n, pid in pids.items()
                }
                cpu["total"] = round(sum(cpu.values()), 3)
                sat["cpu_ms_per_saga"] = cpu
                print(f"  {sat}", flush=True)
                sats.append(sat)
                events = args.sagas * EVENTS_PER_SAGA
                print(f"round {r}/{args.rounds}: raw JetStream, {events} events ...", flush=True)
                before = {n: _cpu_seconds(pid) for n, pid in raw_pids.items()}
                raw = await bench_raw(server.url, events)
                raw["cpu_ms_per_6_events"] = {
                    n: round((_cpu_seconds(pid) - before[n]) * 1000 * EVENTS_PER_SAGA / events, 3)
                    for n, pid in raw_pids.items()
                }
                print(f"  {raw}", flush=True)
                raws.append(raw)
            print(f"moderate: {args.rate}/s for {args.seconds}s ...", flush=True)
            mod = await moderate(driver, args.rate, args.seconds)
            print(f"  {mod}", flush=True)
        finally:
            await driver.close()
            await asyncio.to_thread(cluster.stop)
            cluster.cleanup()
    ratios = [s["events_per_s"] / r["events_per_s"] for s, r in zip(sats, raws, strict=True)]
    ratio = statistics.median(ratios)

    def median_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in rows[0].items():
            if isinstance(value, dict):
                out[key] = median_of([r[key] for r in rows])
            elif isinstance(value, (int, float)):
                out[key] = round(statistics.median(r[key] for r in rows), 3)
        return out

    return {
        "benchmark": "saga",
        "description": "example order saga, 5 participant processes + gRPC order entry (the CQRS query service not running), vs raw nats-py JetStream publish+consume+ack",
        "note": "alternating rounds of saga saturation and raw JetStream on the same server; figures are medians over the rounds, the ratio the median of the per-round ratios",
        "events_per_saga": EVENTS_PER_SAGA,
        "rounds": args.rounds,
        "raw_jetstream": median_of(raws),
        "saga_saturation": median_of(sats),
        "saga_moderate": mod,
        "event_rate_ratio": round(ratio, 3),
        "per_round": {
            "raw_events_per_s": [r["events_per_s"] for r in raws],
            "saga_events_per_s": [s["events_per_s"] for s in sats],
            "ratio": [round(x, 3) for x in ratios],
        },
        "targets": {
            "event_rate_ratio_min": 0.5,
            "moderate_p99_ms_max": 50,
            "ratio_met": ratio >= 0.5,
            "p99_met": mod["p99_ms"] < 50,
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # The machine is shared: a load average above the CPU count means noisy numbers.
            "load_avg_1m_at_start": round(load_at_start, 2),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "saga.json"))
    args = parser.parse_args()
    started = time.monotonic()
    try:
        import uvloop  # the services run on uvloop too; raw and saga share this loop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    result["bench_seconds"] = round(time.monotonic() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    t = result["targets"]
    print(
        f"\nsaga {result['saga_saturation']['sagas_per_s']} sagas/s "
        f"({result['saga_saturation']['events_per_s']} events/s) vs raw JetStream "
        f"{result['raw_jetstream']['events_per_s']} events/s: ratio {result['event_rate_ratio']} "
        f"(target >= 0.5: {'met' if t['ratio_met'] else 'NOT met'})"
    )
    print(
        f"moderate {result['saga_moderate']['rate_per_s']}/s: p50 {result['saga_moderate']['p50_ms']} ms, "
        f"p99 {result['saga_moderate']['p99_ms']} ms (target < 50: {'met' if t['p99_met'] else 'NOT met'})"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
