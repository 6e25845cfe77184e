"""The order saga: meshkit's shop against the same choreography written by hand, in one run.

Both sides run the order saga's success path with every participant its own process
(order, inventory, payment, shipping, notification) on its own nats-server, started
by the same driver (this process) with the same gRPC ``CreateOrder`` through the
shop's client channel, and ending at the same signal (the saga's ``CustomerNotified``
event, seen on a core subscription, its payload naming the order):

* **meshkit**: ``examples/shop`` (``meshkit.saga`` participants with their inboxes,
  tracing context, dead letters, the order service's event store);
* **peer**: ``bench/_saga_peer.py``, the same six events, payloads, subjects and
  SQLite work written by hand with nats-py (no inbox, tracing, event store).

Each round runs three phases, the sides taking turns within each phase (the first
side alternates between rounds), so the two runs a per-round ratio compares are
seconds apart:

* **open** (backlog drain): S orders placed as fast as the order service takes them,
  at most ``--concurrency`` CreateOrder calls in flight (not sagas: the sagas pile up
  behind the calls), timed until the last saga ends;
* **closed** (closed loop): ``--slots`` clients, each placing an order and waiting
  for its saga to end before placing the next, until S sagas ended;
* **moderate**: ``--rate`` sagas/s for ``--seconds``; latency CreateOrder -> end.

CPU per saga is user+system time (Linux /proc/<pid>/stat) of every process of the
side, its nats-server and the driver included, over the phase, divided by its sagas:
on a shared machine a steadier measure than wall-clock rates. Figures are medians
over the rounds; a ratio (meshkit / peer) is the median of the per-round ratios,
with a distribution-free interval for that median (order statistics: with 5 rounds
the per-round range, at 94%) and, for each target, whether the interval meets it,
misses it or straddles it ("undecided": the run cannot tell on this machine);
moderate latencies are percentiles of every round's sagas pooled. Without
``--only saga`` a raw JetStream publish+consume+ack run per round (on meshkit's
server) is reported as context. Writes bench/results/saga.json.

    .venv/bin/python -m bench.bench_saga [--only saga|meshkit|peer] [--rounds 5]
        [--sagas 2000] [--concurrency 200] [--slots 100] [--rate 50] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVENTS_PER_SAGA = 6
END_SUBJECT = "shop.events.shop.v1.CustomerNotified"
SIDES = ("meshkit", "peer")
ROLES = ("order", "inventory", "payment", "shipping", "notification")
# The goal (#15): meshkit / hand-written.
TARGET_THROUGHPUT_RATIO = 0.95
TARGET_CPU_RATIO = 1.05


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
                    headers={"Nats-Msg-Id": f"{name}-{i}", "Meshkit-Envelope": "1;raw;;;;0;"},
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


def order_request(request_id: str, customer_id: str = "bench") -> Any:
    """The order every saga of the benchmarks places: one pen, shipped to Seoul."""
    from examples.shop.gen.shop.v1 import common_pb2, orders_pb2

    return orders_pb2.CreateOrderRequest(
        customer_id=customer_id,
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


class SagaDriver:
    """Places orders over gRPC and times each saga until its CustomerNotified event.

    The same for both sides: the shop's client channel (``wiring.channel``, meshkit's
    client interceptors) and a core subscription to CustomerNotified whose payload
    names the order (the saga id on both sides), so the driver's cost per saga is the
    same whichever side it drives.
    """

    def __init__(self, url: str, order_address: str) -> None:
        self.url = url
        self.order_address = order_address
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> None:
        import nats

        from examples.shop import wiring
        from examples.shop.gen.shop.v1 import events_pb2, orders_pb2_grpc

        self._notified = events_pb2.CustomerNotified
        self.nc = await nats.connect(self.url)
        # A core subscription sees every stored event without being a JetStream consumer.
        await self.nc.subscribe(END_SUBJECT, cb=self._on_done)
        self.channel = wiring.channel(self.order_address)
        self.stub = orders_pb2_grpc.OrderServiceStub(self.channel)  # type: ignore[no-untyped-call]

    async def _on_done(self, msg: Any) -> None:
        now = time.perf_counter()
        saga = self._notified.FromString(msg.data).order_id
        if saga and saga not in self.finished:
            self.finished[saga] = now
            fut = self._waiters.pop(saga, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def order(self, request_id: str) -> str:
        req = order_request(request_id)
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

    async def wait_one(self, order_id: str, within: float) -> None:
        fut = self._waiters.get(order_id)
        if fut is not None and order_id not in self.finished:
            await asyncio.wait_for(fut, within)

    async def wait_all(self, ids: list[str], within: float) -> None:
        pending = [self._waiters[i] for i in ids if i in self._waiters and i not in self.finished]
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending), within)

    def latencies_ms(self, ids: list[str]) -> list[float]:
        return [(self.finished[i] - self.started[i]) * 1000 for i in ids if i in self.finished]

    async def close(self) -> None:
        await self.channel.close(None)
        await self.nc.close()


async def add_stock(address: str, sku: str, qty: int) -> None:
    from examples.shop import wiring
    from examples.shop.gen.shop.v1 import inventory_pb2, inventory_pb2_grpc

    async with wiring.channel(address) as ch:
        stub = inventory_pb2_grpc.InventoryServiceStub(ch)  # type: ignore[no-untyped-call]

        async def adjustments() -> Any:
            yield inventory_pb2.StockAdjustment(sku=sku, delta=qty)

        await stub.AdjustStock(adjustments(), timeout=10)


def _latency(lat: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(_pct(lat, 50), 2),
        "p90_ms": round(_pct(lat, 90), 2),
        "p99_ms": round(_pct(lat, 99), 2),
        "max_ms": round(max(lat), 2) if lat else float("nan"),
    }


async def open_drain(driver: SagaDriver, n: int, concurrency: int) -> dict[str, Any]:
    """n orders, at most ``concurrency`` CreateOrder calls in flight; until every saga ended."""
    sem = asyncio.Semaphore(concurrency)
    tag = uuid.uuid4().hex[:8]

    async def one(i: int) -> str:
        async with sem:
            return await driver.order(f"open-{tag}-{i}")

    t0 = time.perf_counter()
    ids = await asyncio.gather(*(one(i) for i in range(n)))
    await driver.wait_all(ids, within=150)
    elapsed = max(driver.finished[i] for i in ids) - t0
    return {
        "sagas": n,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "sagas_per_s": round(n / elapsed, 1),
        **_latency(driver.latencies_ms(ids)),
    }


async def closed_loop(driver: SagaDriver, n: int, slots: int) -> dict[str, Any]:
    """``slots`` clients, each holding its slot until its saga ended; n sagas in all."""
    tag = uuid.uuid4().hex[:8]
    numbers: Iterator[int] = iter(range(n))
    ids: list[str] = []

    async def slot() -> None:
        for i in numbers:  # shared: each number is taken once
            order_id = await driver.order(f"closed-{tag}-{i}")
            await driver.wait_one(order_id, 60)
            ids.append(order_id)

    t0 = time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(slots)))
    elapsed = time.perf_counter() - t0
    return {
        "sagas": n,
        "slots": slots,
        "seconds": round(elapsed, 3),
        "sagas_per_s": round(n / elapsed, 1),
        **_latency(driver.latencies_ms(ids)),
    }


async def moderate(driver: SagaDriver, rate: float, seconds: float) -> dict[str, Any]:
    """``rate`` sagas/s for ``seconds`` (open loop, fixed schedule); latency to the end."""
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
        **_latency(lat),
        "mean_ms": round(statistics.fmean(lat), 2),
        "latencies_ms": lat,  # pooled over the rounds, then dropped
    }


# -- the two sides -------------------------------------------------------------------------


@dataclass
class PeerProcess:
    """One process of the hand-written peer (``python -m bench._saga_peer <role>``)."""

    role: str
    proc: subprocess.Popen[str]
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_peer(
    role: str, nats_url: str, data_dir: Path, interceptors: str, timeout: float = 30.0
) -> PeerProcess:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    args = [
        sys.executable,
        "-m",
        "bench._saga_peer",
        role,
        "--nats-url",
        nats_url,
        "--port",
        "0",
        "--db",
        str(data_dir / f"peer-{role}.sqlite"),
        "--interceptors",
        interceptors,
    ]
    with open(data_dir / f"peer-{role}.log", "a") as log_file:
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            start_new_session=True,
        )
    ready: list[int] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY ") and not ready:
                ready.append(int(line.split()[1]))
                done.set()
        done.set()

    threading.Thread(target=read, name=f"peer-{role}-stdout", daemon=True).start()
    done.wait(timeout)
    if not ready:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)
        tail = (data_dir / f"peer-{role}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"peer {role} did not become ready (exit {proc.poll()}):\n{tail}")
    return PeerProcess(role, proc, ready[0])


def stop_peer(p: PeerProcess) -> None:
    if p.proc.poll() is None:
        p.proc.terminate()
        try:
            p.proc.wait(10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait(5)


def stop_peers(procs: list[PeerProcess]) -> None:
    for p in procs:
        stop_peer(p)


@dataclass
class Side:
    """One side's running processes and the driver pointed at them."""

    name: str
    driver: SagaDriver
    pids: dict[str, int]
    latencies: list[float] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def meshkit_side(log_level: str) -> Any:
    from examples.shop.runner import SAGA_SERVICES, ShopCluster
    from meshkit.nats import NatsServer

    async with NatsServer() as server:
        # The saga's own processes: the five participants. The CQRS query service follows
        # the same events for the read side; its catch-up rate is in eventstore.json.
        cluster = ShopCluster(
            server.url,
            services=SAGA_SERVICES,
            env={n: {"SHOP_LOG_LEVEL": log_level} for n in SAGA_SERVICES},
        )
        await asyncio.to_thread(cluster.start)
        driver = SagaDriver(server.url, cluster.address("order"))
        try:
            await driver.start()
            await add_stock(cluster.address("inventory"), "pen", 1_000_000)
            pids = {n: p.proc.pid for n, p in cluster.procs.items()}
            pids["nats-server"] = server.pid or 0
            pids["driver"] = os.getpid()
            yield Side("meshkit", driver, pids), server.url
        finally:
            await driver.close()
            await asyncio.to_thread(cluster.stop)
            cluster.cleanup()


@contextlib.asynccontextmanager
async def peer_side(interceptors: str) -> Any:
    from meshkit.nats import NatsServer

    async with NatsServer() as server:
        keep = os.environ.get("BENCH_SAGA_PEER_DIR")  # keep the peer's logs and databases
        with (
            contextlib.nullcontext(keep)
            if keep
            else tempfile.TemporaryDirectory(prefix="meshkit-saga-peer-")
        ) as tmp:
            procs: dict[str, PeerProcess] = {}
            errors: list[BaseException] = []

            def one(role: str) -> None:
                try:
                    procs[role] = start_peer(role, server.url, Path(tmp), interceptors)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=one, args=(r,)) for r in ROLES]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            driver: SagaDriver | None = None
            try:
                if errors:
                    raise errors[0]
                driver = SagaDriver(server.url, procs["order"].address)
                await driver.start()
                pids = {r: p.proc.pid for r, p in procs.items()}
                pids["nats-server"] = server.pid or 0
                pids["driver"] = os.getpid()
                yield Side("peer", driver, pids), server.url
            finally:
                if driver is not None:
                    await driver.close()
                await asyncio.to_thread(stop_peers, list(procs.values()))


async def measured(side: Side, sagas: int, phase: Awaitable[dict[str, Any]]) -> Any:
    """Run one phase (a coroutine not yet started); add its CPU per saga per process (ms)."""
    before = {n: _cpu_seconds(pid) for n, pid in side.pids.items()}
    result = await phase
    n = result.get("sagas", sagas)
    cpu = {
        n_: round((_cpu_seconds(pid) - before[n_]) * 1000 / n, 3) for n_, pid in side.pids.items()
    }
    cpu["total"] = round(sum(cpu.values()), 3)
    result["cpu_ms_per_saga"] = cpu
    return result


def median_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric field's median over the rounds (nested dicts too)."""
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = median_of([r[key] for r in rows])
        elif isinstance(value, (int, float)):
            out[key] = round(statistics.median(r[key] for r in rows), 3)
    return out


def median_interval(values: list[float]) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``values`` (order statistics:
    the k-th smallest to the k-th largest, k the largest with a binomial tail of at
    most 5% on each side) and its coverage. Five rounds give [min, max] at 94%."""
    n = len(values)
    ordered = sorted(values)
    k, tail = 0, 0.0
    while True:
        nxt = tail + math.comb(n, k) / 2**n
        if nxt > 0.05 or k >= (n - 1) // 2:
            break
        tail, k = nxt, k + 1
    if k == 0:  # too few rounds for 90%: the whole range, with what it covers
        return ordered[0], ordered[-1], round(1 - 2 / 2**n, 3)
    return ordered[k - 1], ordered[n - k], round(1 - 2 * tail, 3)


def _verdict(low: float, high: float, ok: Callable[[float], bool], coverage: float = 1.0) -> str:
    """Whether a whole interval meets a target, misses it, or straddles it (or covers too
    little, with fewer than five rounds, to say either)."""
    if coverage < 0.9:
        return "undecided"
    if ok(low) and ok(high):
        return "met"
    if not ok(low) and not ok(high):
        return "not met"
    return "undecided"


def _get(row: dict[str, Any], path: str) -> float:
    value: Any = row
    for part in path.split("."):
        value = value[part]
    return float(value)


# What is compared, per round: (name in the results, path in a round's record).
COMPARED = (
    ("open_sagas_per_s_ratio", "open.sagas_per_s"),
    ("closed_sagas_per_s_ratio", "closed.sagas_per_s"),
    ("open_cpu_per_saga_ratio", "open.cpu_ms_per_saga.total"),
    ("closed_cpu_per_saga_ratio", "closed.cpu_ms_per_saga.total"),
    ("moderate_cpu_per_saga_ratio", "moderate.cpu_ms_per_saga.total"),
    ("closed_p50_ratio", "closed.p50_ms"),
    ("moderate_p50_ratio", "moderate.p50_ms"),
    ("moderate_p99_ratio", "moderate.p99_ms"),
)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from examples.shop._gen import ensure_generated

    load_at_start = os.getloadavg()[0]
    ensure_generated()
    wanted = SIDES if args.only in (None, "saga") else (args.only,)
    with_raw = args.only is None
    sides: dict[str, Side] = {}
    raws: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        mk_url = ""
        if "meshkit" in wanted:
            side, mk_url = await stack.enter_async_context(meshkit_side(args.log_level))
            sides["meshkit"] = side
        if "peer" in wanted:
            side, _ = await stack.enter_async_context(peer_side(args.peer_interceptors))
            sides["peer"] = side
        print("warm-up ...", flush=True)
        for side in sides.values():
            await open_drain(side.driver, 200, 50)
            await closed_loop(side.driver, 200, min(args.slots, 50))
        for r in range(1, args.rounds + 1):
            # Alternating rounds, the first side alternating too, and within a round
            # the sides take turns phase by phase: the two runs a ratio compares are
            # seconds apart, so a shared machine's slow drifts hit both alike.
            names = list(sides) if r % 2 else list(reversed(sides))
            row: dict[str, dict[str, Any]] = {name: {} for name in names}
            for phase in ("open", "closed", "moderate"):
                for name in names:
                    side = sides[name]
                    d = side.driver
                    if phase == "open":
                        got = await measured(
                            side, args.sagas, open_drain(d, args.sagas, args.concurrency)
                        )
                    elif phase == "closed":
                        got = await measured(
                            side, args.sagas, closed_loop(d, args.sagas, args.slots)
                        )
                    else:
                        got = await measured(side, 0, moderate(d, args.rate, args.seconds))
                        side.latencies.extend(got.pop("latencies_ms"))
                    row[name][phase] = got
                    print(f"round {r}/{args.rounds} {name:8s} {phase:8s} {_brief(got)}", flush=True)
            for name in names:
                sides[name].rounds.append(row[name])
            if with_raw and mk_url:
                events = args.sagas * EVENTS_PER_SAGA
                pids = {"nats-server": sides["meshkit"].pids["nats-server"], "driver": os.getpid()}
                before = {n: _cpu_seconds(pid) for n, pid in pids.items()}
                raw = await bench_raw(mk_url, events)
                raw["cpu_ms_per_6_events"] = {
                    n: round((_cpu_seconds(pid) - before[n]) * 1000 * EVENTS_PER_SAGA / events, 3)
                    for n, pid in pids.items()
                }
                print(f"round {r}/{args.rounds} raw JetStream (context): {raw}", flush=True)
                raws.append(raw)

    result: dict[str, Any] = {
        "benchmark": "saga",
        "description": (
            "the example shop's order saga (meshkit.saga; 5 participant processes, gRPC "
            "CreateOrder entry) vs the same choreography written by hand with nats-py "
            "(bench/_saga_peer.py: same processes, events, payloads, SQLite work); each "
            "on its own nats-server, one driver"
        ),
        "note": (
            "alternating rounds (the first side alternates; within a round the sides take "
            "turns phase by phase); figures are medians over the rounds, ratios (meshkit / peer) medians of the per-round ratios, moderate "
            "latencies percentiles of all rounds' sagas pooled; CPU per saga includes "
            "nats-server and the driver. open: at most `concurrency` CreateOrder calls in "
            "flight (a backlog drain); closed: `slots` sagas in flight, each slot held "
            "until its saga's CustomerNotified"
        ),
        "events_per_saga": EVENTS_PER_SAGA,
        "rounds": args.rounds,
        "peer_grpc_interceptors": args.peer_interceptors,
    }
    for name, side in sides.items():
        summary: dict[str, Any] = {
            phase: median_of([r[phase] for r in side.rounds])
            for phase in ("open", "closed", "moderate")
        }
        summary["moderate_pooled"] = {
            "sagas": len(side.latencies),
            **_latency(side.latencies),
            "mean_ms": round(statistics.fmean(side.latencies), 2),
        }
        summary["per_round"] = {
            "open_sagas_per_s": [r["open"]["sagas_per_s"] for r in side.rounds],
            "closed_sagas_per_s": [r["closed"]["sagas_per_s"] for r in side.rounds],
            "open_cpu_ms_per_saga": [r["open"]["cpu_ms_per_saga"]["total"] for r in side.rounds],
            "closed_cpu_ms_per_saga": [
                r["closed"]["cpu_ms_per_saga"]["total"] for r in side.rounds
            ],
            "moderate_p99_ms": [r["moderate"]["p99_ms"] for r in side.rounds],
        }
        result[name] = summary
    if len(sides) == 2:
        mk, peer = sides["meshkit"], sides["peer"]
        ratios: dict[str, Any] = {}
        per_round: dict[str, list[float]] = {}
        intervals: dict[str, dict[str, float]] = {}
        for key, path in COMPARED:
            rs = [
                _get(a, path) / _get(b, path)
                for a, b in zip(mk.rounds, peer.rounds, strict=True)
                if _get(b, path)
            ]
            ratios[key] = round(statistics.median(rs), 3)
            per_round[key] = [round(x, 3) for x in rs]
            low, high, coverage = median_interval(rs)
            intervals[key] = {"low": round(low, 3), "high": round(high, 3), "coverage": coverage}
        ratios["moderate_pooled_p50_ratio"] = round(
            result["meshkit"]["moderate_pooled"]["p50_ms"]
            / result["peer"]["moderate_pooled"]["p50_ms"],
            3,
        )
        ratios["moderate_pooled_p99_ratio"] = round(
            result["meshkit"]["moderate_pooled"]["p99_ms"]
            / result["peer"]["moderate_pooled"]["p99_ms"],
            3,
        )
        result["ratios"] = ratios
        result["ratios_per_round"] = per_round
        result["ratio_intervals"] = intervals
        thr = min(ratios["open_sagas_per_s_ratio"], ratios["closed_sagas_per_s_ratio"])
        cpu = max(ratios["open_cpu_per_saga_ratio"], ratios["closed_cpu_per_saga_ratio"])
        result["targets"] = {
            "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
            "cpu_per_saga_ratio_max": TARGET_CPU_RATIO,
            "throughput_met": thr >= TARGET_THROUGHPUT_RATIO,
            "cpu_met": cpu <= TARGET_CPU_RATIO,
            "moderate_p99_no_worse": ratios["moderate_pooled_p99_ratio"] <= 1.0,
            # What the rounds' spread allows to say of each target: "undecided" when
            # the median's interval straddles it (this run cannot tell either way).
            "decided_by_this_run": {
                key: _verdict(
                    intervals[key]["low"],
                    intervals[key]["high"],
                    (lambda r: r >= TARGET_THROUGHPUT_RATIO)
                    if "sagas_per_s" in key
                    else (lambda r: r <= TARGET_CPU_RATIO),
                    intervals[key]["coverage"],
                )
                for key in (
                    "open_sagas_per_s_ratio",
                    "closed_sagas_per_s_ratio",
                    "open_cpu_per_saga_ratio",
                    "closed_cpu_per_saga_ratio",
                )
            },
        }
    if raws:
        result["context"] = {
            "raw_jetstream": median_of(raws),
            "note": (
                "one Python process publishing (PubAck awaited, 256 in flight) and "
                "pull-consuming 6 x sagas events on meshkit's server: the floor of any "
                "event-driven design, not a peer"
            ),
        }
    result["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        # The machine is shared: a load average above the CPU count means noisy numbers.
        "load_avg_1m_at_start": round(load_at_start, 2),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def _brief(row: dict[str, Any]) -> str:
    cpu = row["cpu_ms_per_saga"]
    procs = " ".join(f"{k}={v}" for k, v in cpu.items() if k != "total")
    rate = f"{row['sagas_per_s']} sagas/s, " if "sagas_per_s" in row else ""
    return f"{rate}p50 {row['p50_ms']} p99 {row['p99_ms']} ms; cpu {cpu['total']} ms/saga ({procs})"


def _report(result: dict[str, Any]) -> None:
    print()
    for name in SIDES:
        s = result.get(name)
        if not s:
            continue
        print(
            f"{name:8} open {s['open']['sagas_per_s']} sagas/s ({s['open']['cpu_ms_per_saga']['total']}"
            f" ms CPU/saga), closed {s['closed']['sagas_per_s']} sagas/s"
            f" ({s['closed']['cpu_ms_per_saga']['total']} ms CPU/saga, p50"
            f" {s['closed']['p50_ms']} ms), moderate {s['moderate']['rate_per_s']}/s p50"
            f" {s['moderate_pooled']['p50_ms']} p99 {s['moderate_pooled']['p99_ms']} ms"
        )
    if "ratios" in result:
        print("meshkit / peer: " + ", ".join(f"{k} {v}" for k, v in result["ratios"].items()))
        t = result["targets"]
        print(
            f"targets: throughput >= {t['throughput_ratio_min']}: "
            f"{'met' if t['throughput_met'] else 'NOT met'}; CPU per saga <= "
            f"{t['cpu_per_saga_ratio_max']}: {'met' if t['cpu_met'] else 'NOT met'}; "
            f"moderate p99 no worse: {'yes' if t['moderate_p99_no_worse'] else 'no'}"
        )
        spans = result["ratio_intervals"]
        print(
            "median ratios' intervals (order statistics): "
            + ", ".join(
                f"{k} [{v['low']}, {v['high']}] at {v['coverage']:.0%}: "
                f"{t['decided_by_this_run'][k]}"
                for k, v in spans.items()
                if k in t["decided_by_this_run"]
            )
        )
    if "context" in result:
        raw = result["context"]["raw_jetstream"]
        print(f"context: raw JetStream {raw['events_per_s']} events/s")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        choices=("saga", "meshkit", "peer"),
        help="saga: the meshkit/peer comparison alone (no raw JetStream context); "
        "meshkit or peer: that side alone (for profiling; no ratios)",
    )
    parser.add_argument("--sagas", type=int, default=2000, help="sagas per open/closed phase")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--concurrency", type=int, default=200, help="open: CreateOrder calls in flight"
    )
    parser.add_argument("--slots", type=int, default=100, help="closed: sagas in flight")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--peer-interceptors",
        choices=("meshkit", "none"),
        default="meshkit",
        help="the peer's gRPC server interceptors: the shop's (the same entry cost; default) or none",
    )
    parser.add_argument("--log-level", default="ERROR", help="the shop services' log level")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "saga.json"))
    args = parser.parse_args()
    started = time.monotonic()
    try:
        import uvloop  # the services run on uvloop too

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    result["bench_seconds"] = round(time.monotonic() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    _report(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
