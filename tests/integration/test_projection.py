"""Projections on a real nats-server: rebuild equals incremental build, lag, atomic
checkpoints in SQLite, compare-and-set against a second runner, the CLI."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import api

from examples.es_orders.view import OrderView
from examples.shop.gen.shop.v1 import common_pb2, events_pb2
from meshkit.saga.envelope import Envelope
from meshkit.saga.eventstore import EventStore, EventStoreConfig, Version
from meshkit.saga.projections import Projector, Source
from meshkit.saga.readmodels import MemoryReadModelStore, SqliteReadModelStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
_n = itertools.count()


class World:
    """An event store stream plus a saga stream, and a way to fill them."""

    def __init__(self, nc: Any) -> None:
        n = next(_n)
        self.nc = nc
        self.es = EventStore(nc, EventStoreConfig(stream=f"PVORD{n}", prefix=f"pvord{n}"))
        self.saga_stream = f"PVSAGA{n}"
        self.saga_prefix = f"pvsaga{n}"
        self.versions: dict[str, Version] = {}
        self.published = 0

    async def setup(self) -> None:
        await self.es.ensure()
        await self.nc.jetstream().add_stream(
            api.StreamConfig(name=self.saga_stream, subjects=[f"{self.saga_prefix}.>"])
        )

    def view(self, name: str = "order_view") -> OrderView:
        return OrderView(
            [
                Source(self.es.stream, self.es.subjects),
                Source(self.saga_stream, f"{self.saga_prefix}.>"),
            ],
            name=name,
        )

    async def order_event(self, order_id: str, event: Any) -> None:
        r = await self.es.append(
            "order", order_id, [event], expected=self.versions.get(order_id, Version())
        )
        self.versions[order_id] = r.version
        self.published += 1

    async def saga_event(self, event: Any, saga_id: str = "s") -> None:
        env = Envelope.new(event, saga_id=saga_id, source="test")
        await self.nc.jetstream().publish(
            f"{self.saga_prefix}.{env.event_type}",
            event.SerializeToString(),
            headers=env.to_headers(),
        )
        self.published += 1

    async def orders(self, ids: list[str], rng: random.Random) -> None:
        for oid in ids:
            await self.order_event(
                oid,
                events_pb2.OrderCreated(
                    order_id=oid,
                    customer_id=f"c{rng.randrange(3)}",
                    items=[common_pb2.LineItem(sku="apple", quantity=rng.randrange(1, 4))],
                    total=common_pb2.Money(currency="KRW", amount_minor=rng.randrange(1000)),
                ),
            )
            await self.saga_event(
                events_pb2.StockReserved(order_id=oid, reservation_id=f"r{oid}"), oid
            )
            if rng.random() < 0.5:
                await self.saga_event(
                    events_pb2.PaymentCompleted(order_id=oid, payment_id=f"p{oid}"), oid
                )
                await self.saga_event(
                    events_pb2.ShipmentScheduled(order_id=oid, shipment_id=f"s{oid}"), oid
                )
                await self.order_event(oid, events_pb2.OrderCompleted(order_id=oid))
            else:
                await self.saga_event(
                    events_pb2.PaymentFailed(order_id=oid, reason="declined"), oid
                )
                await self.saga_event(events_pb2.StockReleased(order_id=oid), oid)
                await self.order_event(
                    oid, events_pb2.OrderCancelled(order_id=oid, reason="declined")
                )


@pytest.fixture
async def world(nats_server_module: Any) -> AsyncIterator[World]:
    nc = await nats.connect(nats_server_module.url)
    w = World(nc)
    await w.setup()
    yield w
    await nc.close()


async def test_rebuild_equals_incremental_build(world: World) -> None:
    rng = random.Random(7)
    store = MemoryReadModelStore()
    projector = Projector(world.nc, world.view(), store, batch=7, poll_interval=0.2)
    await projector.start()
    try:
        for wave in range(4):  # events arrive while the projector follows
            await world.orders([f"o{wave}-{i}" for i in range(5)], rng)
            await asyncio.sleep(0)
        status = await projector.wait_caught_up(within=20)
    finally:
        await projector.stop()
    assert status.lag == 0
    incremental = store.dump("order_view")
    assert len(incremental) == 20
    assert sum(d["version"] for d in incremental.values()) == world.published
    doc = store.get("order_view", "orders", "o0-0")
    assert (
        doc is not None
        and doc["status"] in ("COMPLETED", "CANCELLED")
        and doc["stock"] in ("RESERVED", "RELEASED")
    )
    assert (doc["status"] == "COMPLETED") == (
        doc.get("payment") == "PAID" and doc.get("shipment") == "SCHEDULED"
    )

    rebuilt_n = await projector.rebuild()
    assert rebuilt_n == world.published
    assert store.dump("order_view") == incremental
    # A fresh SQLite read model built in one go gives the same documents.
    sqlite = SqliteReadModelStore()
    await Projector(world.nc, world.view(), sqlite, batch=1000).catch_up()
    assert sqlite.dump("order_view") == incremental
    assert sqlite.checkpoints("order_view") == store.checkpoints("order_view")


async def test_lag_is_reported_per_source(world: World) -> None:
    store = MemoryReadModelStore()
    projector = Projector(world.nc, world.view(), store)
    await world.orders(["a", "b"], random.Random(1))
    status = await projector.status()
    assert status.lag == world.published
    assert {s.source for s in status.sources} == {
        world.es.stream + ":" + world.es.subjects,
        world.saga_stream + ":" + world.saga_prefix + ".>",
    }
    assert sum(s.pending for s in status.sources if s.source.startswith(world.es.stream)) == 4
    assert await projector.catch_up() == world.published
    assert (await projector.status()).lag == 0
    await world.saga_event(events_pb2.ShipmentFailed(order_id="a"))
    status = await projector.status()
    assert status.lag == 1 and status.sources[1].pending == 1


async def test_sqlite_commits_documents_and_checkpoint_together(
    world: World, tmp_path: Path
) -> None:
    await world.orders(["x", "y", "z"], random.Random(3))
    db = str(tmp_path / "view.db")
    store = SqliteReadModelStore(db)
    view = world.view()
    calls = {"n": 0}
    real = view.handle

    def failing(event: Any, tx: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("crash in the middle of a batch")
        real(event, tx)

    view.handle = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await Projector(world.nc, view, store, batch=100).catch_up()
    # Nothing of the failed batch is visible, and the checkpoint did not move.
    assert store.dump("order_view") == {}
    assert store.checkpoints("order_view") == {}
    store.close()
    reopened = SqliteReadModelStore(db)
    view.handle = real  # type: ignore[method-assign]
    assert await Projector(world.nc, view, reopened).catch_up() == world.published
    assert len(reopened.dump("order_view")) == 3
    reference = MemoryReadModelStore()
    await Projector(world.nc, world.view(), reference).catch_up()
    assert reopened.dump("order_view") == reference.dump("order_view")


async def test_two_runners_on_one_store_apply_each_event_once(world: World) -> None:
    await world.orders([f"k{i}" for i in range(10)], random.Random(5))
    store = SqliteReadModelStore()
    a = Projector(world.nc, world.view(), store, batch=3)
    b = Projector(world.nc, world.view(), store, batch=4)
    na, nb = await asyncio.gather(a.catch_up(), b.catch_up())
    assert na + nb == world.published
    docs = store.dump("order_view")
    assert sum(d["version"] for d in docs.values()) == world.published


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshkit.cli", "projection", *args],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_status_and_rebuild(
    nats_server_module: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from examples.es_orders import app

    nc = await nats.connect(nats_server_module.url)
    try:
        es = EventStore(nc, app.EVENTS)
        await es.ensure()
        await nc.jetstream().add_stream(
            api.StreamConfig(
                name=app.ORCHESTRATION.stream, subjects=[f"{app.ORCHESTRATION.prefix}.>"]
            )
        )
        for i in range(3):
            await es.append(
                "order", f"cli{i}", [events_pb2.OrderCreated(order_id=f"cli{i}")], expected=None
            )
    finally:
        await nc.close()
    env = {
        "NATS_URL": nats_server_module.url,
        "ES_ORDERS_DB": str(tmp_path / "v.db"),
        "MESHKIT_PROJECTIONS": "examples.es_orders.app:projections",
    }
    # One real process proves the entry point; the rest run in-process (faster).
    rb = await asyncio.to_thread(_cli, ["rebuild", "order_view"], env)
    assert rb.returncode == 0, rb.stderr
    assert "rebuilt order_view: 3 events" in rb.stdout
    from meshkit import cli

    def run(*args: str) -> int:
        return cli.main(
            [
                "projection",
                *args,
                "--app",
                env["MESHKIT_PROJECTIONS"],
                "--nats-url",
                env["NATS_URL"],
            ]
        )

    os.environ["ES_ORDERS_DB"] = env["ES_ORDERS_DB"]
    try:
        capsys.readouterr()
        assert await asyncio.to_thread(run, "status", "--json") == 0
        out = capsys.readouterr().out
        assert '"lag": 0' in out and '"checkpoint": 3' in out
        async with await nats.connect(env["NATS_URL"]) as nc2:
            await EventStore(nc2, app.EVENTS).append(
                "order", "cli9", [events_pb2.OrderCreated(order_id="cli9")], expected=None
            )
        assert await asyncio.to_thread(run, "status") == 0
        out = capsys.readouterr().out
        assert "order_view" in out and out.split("\n")[1].split()[-1] == "1"  # lag 1
        assert await asyncio.to_thread(run, "rebuild", "nope") == 1
        assert "known: order_view" in capsys.readouterr().err
    finally:
        del os.environ["ES_ORDERS_DB"]
    # The rebuild wrote the three orders it replayed (status reads, it does not apply cli9).
    docs = SqliteReadModelStore(env["ES_ORDERS_DB"]).dump("order_view")
    assert sorted(key for _, key in docs) == ["cli0", "cli1", "cli2"]
    assert {d["status"] for d in docs.values()} == {"CREATED"}


async def test_relay_forwards_each_event_once_across_a_crash(world: World) -> None:
    from meshkit.saga.projections import relay

    await world.orders(["r1", "r2", "r3"], random.Random(9))
    js = world.nc.jetstream()
    out_stream = f"{world.saga_stream}OUT"
    await js.add_stream(api.StreamConfig(name=out_stream, subjects=[f"{out_stream.lower()}.>"]))
    sent: list[str] = []
    crash_after = 4

    async def publish(ev: Any) -> None:
        if len(sent) == crash_after:
            raise RuntimeError("relay killed mid-batch")
        sent.append(ev.event_id)
        await js.publish(
            f"{out_stream.lower()}.{ev.event_type}", ev.data, headers=ev.envelope.to_headers()
        )

    store = SqliteReadModelStore()
    source = [Source(world.es.stream, world.es.subjects)]
    order_types = ["shop.v1.OrderCreated", "shop.v1.OrderCancelled", "shop.v1.OrderCompleted"]
    first = relay(world.nc, "order_relay", source, store, publish, types=order_types)
    with pytest.raises(RuntimeError):
        await first.catch_up()
    assert store.checkpoints("order_relay") == {}  # the batch did not commit
    crash_after = 10_000
    second = relay(world.nc, "order_relay", source, store, publish, types=order_types)
    await second.catch_up()
    info = await js.stream_info(out_stream)
    assert info.state.messages == 6  # 3 orders x 2 order events, the 4 re-sent ones deduped
    assert len(sent) == 4 + 6
    assert (await second.status()).lag == 0


async def test_whole_stream_source_follows_new_events(world: World) -> None:
    store = MemoryReadModelStore()
    view = OrderView([Source(world.saga_stream)], name="saga_only")
    projector = await Projector(world.nc, view, store, poll_interval=30.0).start()
    try:
        await _until_async(lambda: projector.stats.passes >= 1, 10)  # the first pass is done
        await world.saga_event(events_pb2.PaymentCompleted(order_id="w1", payment_id="p"))
        # A 30 s poll cannot explain a prompt catch-up: the wake-up subscription did it.
        await _until_async(lambda: store.get("saga_only", "orders", "w1") is not None, 10)
    finally:
        await projector.stop()
    assert store.checkpoints("saga_only") == {world.saga_stream: 1}


async def _until_async(cond: Any, within: float) -> None:
    end = asyncio.get_running_loop().time() + within
    while not cond():
        assert asyncio.get_running_loop().time() < end, "condition not met in time"
        await asyncio.sleep(0.02)
