"""The event store, snapshots and projections vs raw JetStream, in one run.

* append: N single-event appends with the optimistic check
  (``Nats-Expected-Last-Subject-Sequence``), sequentially and from 16 concurrent
  writers on different aggregates, vs the same number of raw ``js.publish`` calls
  awaiting their PubAcks; and 10-event atomic batches vs 10 raw publishes;
* load: replaying a 1,000-event aggregate (decode + apply) vs fetching the same
  messages raw, with an ephemeral filtered pull consumer and with batched direct get;
* snapshots: load time of aggregates of 10, 1,000 and 10,000 events with and
  without snapshots (every 100 events; a tail of 7 events after the last one);
* projections: catch-up rate of the order view into SQLite (file, WAL) and memory,
  vs reading the same events raw.

Medians of several repeats; ratios are meshkit / raw. Writes bench/results/eventstore.json.

    .venv/bin/python -m bench.bench_eventstore [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _gen_shop() -> None:
    from meshkit.codegen import generate

    generate(ROOT / "proto", ROOT, package="examples.shop.gen", only=["shop"])


_gen_shop()  # the aggregate below names generated message classes in its annotations

from examples.shop.gen.shop.v1 import events_pb2  # noqa: E402


def med(values: list[float]) -> float:
    return statistics.median(values)


async def timed(fn: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


async def paired(a: Any, b: Any, repeats: int) -> tuple[float, float]:
    """Median times of ``a`` and ``b``, run alternately so machine noise hits both alike."""
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(repeats):
        ta += await timed(a, 1)
        tb += await timed(b, 1)
    return med(ta), med(tb)


async def bench_append(nc: Any, n: int, repeats: int) -> dict[str, Any]:
    from examples.shop.gen.shop.v1 import common_pb2
    from meshkit.saga.envelope import Envelope
    from meshkit.saga.eventstore import EventStore, EventStoreConfig, Version

    store = EventStore(nc, EventStoreConfig(stream="BENCH_ES", prefix="bench_es"))
    await store.ensure()
    js = nc.jetstream()
    event = events_pb2.PaymentCompleted(
        order_id="o-123456",
        payment_id="p-123456",
        amount=common_pb2.Money(currency="KRW", amount_minor=12345),
    )
    payload = event.SerializeToString()
    headers = Envelope.new(event).to_headers()

    async def es_seq() -> None:
        agg = uuid.uuid4().hex[:10]
        v = Version()
        for _ in range(n):
            v = (await store.append("acct", agg, [event], expected=v)).version

    async def raw_seq() -> None:
        subj = f"bench_es.raw.{uuid.uuid4().hex[:10]}"
        for _ in range(n):
            h = dict(headers)
            h["Nats-Msg-Id"] = uuid.uuid4().hex
            await js.publish(subj, payload, headers=h)

    writers = 16

    async def es_conc() -> None:
        async def one() -> None:
            agg = uuid.uuid4().hex[:10]
            v = Version()
            for _ in range(n // writers):
                v = (await store.append("acct", agg, [event], expected=v)).version

        await asyncio.gather(*(one() for _ in range(writers)))

    async def raw_conc() -> None:
        async def one() -> None:
            subj = f"bench_es.raw.{uuid.uuid4().hex[:10]}"
            for _ in range(n // writers):
                h = dict(headers)
                h["Nats-Msg-Id"] = uuid.uuid4().hex
                await js.publish(subj, payload, headers=h)

        await asyncio.gather(*(one() for _ in range(writers)))

    batches = max(1, n // 10)

    async def es_batch() -> None:
        agg = uuid.uuid4().hex[:10]
        v = Version()
        for _ in range(batches):
            v = (await store.append("acct", agg, [event] * 10, expected=v)).version

    async def raw_batch() -> None:
        subj = f"bench_es.raw.{uuid.uuid4().hex[:10]}"
        for _ in range(batches):
            for _ in range(10):
                h = dict(headers)
                h["Nats-Msg-Id"] = uuid.uuid4().hex
                await js.publish(subj, payload, headers=h)

    res: dict[str, Any] = {"events": n, "payload_bytes": len(payload)}
    for name, es_fn, raw_fn, count in [
        ("sequential", es_seq, raw_seq, n),
        (f"concurrent_{writers}", es_conc, raw_conc, (n // writers) * writers),
        ("atomic_batch_10", es_batch, raw_batch, batches * 10),
    ]:
        es_t, raw_t = await paired(es_fn, raw_fn, repeats)
        res[name] = {
            "eventstore_events_per_s": round(count / es_t),
            "raw_publish_events_per_s": round(count / raw_t),
            "ratio": round(raw_t / es_t, 3),
        }
        print(
            f"append {name:18} eventstore {count / es_t:8.0f}/s  raw publish {count / raw_t:8.0f}/s"
            f"  ratio {raw_t / es_t:.2f}",
            flush=True,
        )
    return res


class Account:
    def __init__(self, acct_id: str) -> None:
        self.total = 0
        self.n = 0

    def apply_paid(self, e: events_pb2.PaymentCompleted) -> None:
        self.total += e.amount.amount_minor
        self.n += 1


async def build_aggregate(store: Any, repo: Any, agg: str, n: int, tail: int) -> None:
    """n events: the body through ``repo`` (snapshots as it goes), then ``tail`` more
    appended directly, so a load replays exactly ``tail`` events after the snapshot."""
    from examples.shop.gen.shop.v1 import common_pb2

    event = events_pb2.PaymentCompleted(order_id=agg, amount=common_pb2.Money(amount_minor=1))
    loaded = await repo.load(agg)
    body = n - tail
    while loaded.version.number < body:
        k = min(500, body - loaded.version.number)
        loaded = await repo.save(loaded, [event] * k)
    await repo.snapshot(loaded)
    v = loaded.version
    for _ in range(tail):
        v = (await store.append("acct", agg, [event], expected=v)).version


async def bench_load(nc: Any, repeats: int, sizes: list[int]) -> dict[str, Any]:
    import json as _json

    from nats.js import api

    from meshkit.saga.eventstore import EventStore, EventStoreConfig, Repository, StateCodec
    from meshkit.saga.snapshots import SnapshotStore

    store = EventStore(nc, EventStoreConfig(stream="BENCH_ES", prefix="bench_es"))
    snaps = SnapshotStore(nc, bucket="bench_snaps")
    codec = StateCodec(
        dump=lambda a: _json.dumps([a.total, a.n]).encode(),
        load=lambda i, raw: _restore(Account, i, _json.loads(raw)),
    )
    repo = Repository(store, "acct", Account, snapshots=snaps, snapshot_every=100, codec=codec)
    js = nc.jetstream()
    out: dict[str, Any] = {"snapshot_every": 100, "tail_after_snapshot": 7, "sizes": {}}
    for size in sizes:
        agg = f"load{size}-{uuid.uuid4().hex[:6]}"
        await build_aggregate(store, repo, agg, size, tail=min(7, size))
        with_snap = await timed(lambda agg=agg: repo.load(agg), repeats)
        no_snap = await timed(
            lambda agg=agg: repo.load(agg, use_snapshots=False), repeats if size < 10000 else 3
        )
        probe = await repo.load(agg)
        assert probe.state.n == size, (probe.state.n, size)
        row = {
            "with_snapshots_ms": round(med(with_snap) * 1000, 2),
            "without_snapshots_ms": round(med(no_snap) * 1000, 2),
            "replayed_with_snapshots": probe.replayed,
            "speedup": round(med(no_snap) / med(with_snap), 1),
        }
        out["sizes"][str(size)] = row
        print(
            f"load {size:6} events: snapshots {row['with_snapshots_ms']:8.2f} ms (replays {probe.replayed})"
            f"   no snapshots {row['without_snapshots_ms']:8.2f} ms",
            flush=True,
        )
        if size == 1000:
            subject = store.aggregate_filter("acct", agg)

            async def raw_consumer(subject: str = subject, size: int = size) -> None:
                sub = await js.pull_subscribe(
                    subject,
                    stream="BENCH_ES",
                    config=api.ConsumerConfig(
                        ack_policy=api.AckPolicy.NONE, mem_storage=True, inactive_threshold=10.0
                    ),
                )
                got = 0
                while got < size:
                    got += len(await sub.fetch(size - got, timeout=5))
                await sub.unsubscribe()

            from meshkit.saga.eventstore import read_batches

            async def raw_direct(subject: str = subject, size: int = size) -> None:
                got = 0
                async for chunk in read_batches(nc, "BENCH_ES", subject, 1, 1000, 5.0):
                    got += len(chunk)
                assert got == size

            t_es, t_cons = await paired(
                lambda agg=agg: repo.load(agg, use_snapshots=False), raw_consumer, repeats
            )
            _, t_direct = await paired(
                lambda agg=agg: repo.load(agg, use_snapshots=False), raw_direct, repeats
            )
            out["load_1000_vs_raw"] = {
                "eventstore_events_per_s": round(size / t_es),
                "raw_pull_consumer_events_per_s": round(size / t_cons),
                "raw_direct_get_events_per_s": round(size / t_direct),
                "ratio_vs_pull_consumer": round(t_cons / t_es, 3),
                "ratio_vs_direct_get": round(t_direct / t_es, 3),
            }
            print(
                f"load 1000 (replay+apply) {size / t_es:8.0f} ev/s   raw pull consumer {size / t_cons:8.0f} ev/s"
                f"   raw direct get {size / t_direct:8.0f} ev/s",
                flush=True,
            )
    return out


def _restore(cls: Any, i: str, d: list[int]) -> Any:
    a = cls(i)
    a.total, a.n = d
    return a


async def bench_projection(nc: Any, orders: int) -> dict[str, Any]:
    from examples.es_orders.view import OrderView
    from examples.shop.gen.shop.v1 import common_pb2
    from meshkit.saga.eventstore import EventStore, EventStoreConfig, Version, read_batches
    from meshkit.saga.projections import Projector, Source
    from meshkit.saga.readmodels import MemoryReadModelStore, SqliteReadModelStore

    stream = "BENCH_PROJ"
    # Filled with chained single publishes: atomic batches cost more (see "append").
    store = EventStore(nc, EventStoreConfig(stream=stream, prefix="bench_proj", atomic=False))
    await store.ensure()

    async def fill(worker: int) -> None:
        for i in range(worker, orders, 16):
            oid = f"o{i}"
            evs = [
                events_pb2.OrderCreated(
                    order_id=oid,
                    customer_id=f"c{i % 50}",
                    items=[common_pb2.LineItem(sku="apple", quantity=1)],
                    total=common_pb2.Money(currency="KRW", amount_minor=1000),
                ),
                events_pb2.StockReserved(order_id=oid, reservation_id=f"r{i}"),
                events_pb2.PaymentCompleted(order_id=oid, payment_id=f"p{i}"),
                events_pb2.ShipmentScheduled(order_id=oid, shipment_id=f"s{i}"),
                events_pb2.OrderCompleted(order_id=oid),
            ]
            await store.append("order", oid, evs, expected=Version())

    t = time.perf_counter()
    await asyncio.gather(*(fill(w) for w in range(16)))
    fill_s = time.perf_counter() - t
    total = orders * 5
    print(f"projection: wrote {total} events in {fill_s:.1f}s", flush=True)
    source = Source(stream, "bench_proj.>")

    async def raw_read() -> None:
        n = 0
        async for chunk in read_batches(nc, stream, "bench_proj.>", 1, 1000, 5.0):
            n += len(chunk)
        assert n == total

    t_raw = med(await timed(raw_read, 3))
    res: dict[str, Any] = {"events": total, "aggregates": orders}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in [
            (
                "sqlite_file",
                lambda: SqliteReadModelStore(os.path.join(tmp, f"{uuid.uuid4().hex}.db")),
            ),
            ("memory", MemoryReadModelStore),
        ]:
            times = []
            for _ in range(2):
                rm = make()
                proj = Projector(nc, OrderView([source]), rm, batch=1000)
                t = time.perf_counter()
                n = await proj.catch_up()
                times.append(time.perf_counter() - t)
                assert n == total, (n, total)
                assert len(rm.find("order_view", "orders", status="COMPLETED")) == orders
            res[name] = {
                "events_per_s": round(total / med(times)),
                "ratio_vs_raw_read": round(t_raw / med(times), 3),
            }
            print(
                f"projection catch-up {name:12} {total / med(times):8.0f} ev/s  (raw read {total / t_raw:8.0f} ev/s)",
                flush=True,
            )
    res["raw_read_events_per_s"] = round(total / t_raw)
    return res


async def main(quick: bool) -> dict[str, Any]:
    from meshkit.nats import NatsServer

    n = 500 if quick else 1600
    repeats = 3 if quick else 5
    sizes = [10, 1000, 10000]
    async with NatsServer() as server:
        import nats

        nc = await nats.connect(server.url)
        try:
            started = time.perf_counter()
            result = {
                "benchmark": "eventstore",
                "description": __doc__.split("\n\n")[0] if __doc__ else "",
                "append": await bench_append(nc, n, 3),
                "load": await bench_load(nc, repeats, sizes),
                "projection": await bench_projection(nc, 1000 if quick else 3000),
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            result["bench_seconds"] = round(time.perf_counter() - started, 1)
            return result
        finally:
            await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer events and repeats")
    args = parser.parse_args()
    res = asyncio.run(main(args.quick))
    out = ROOT / "bench" / "results" / "eventstore.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out} ({res['bench_seconds']}s)")
