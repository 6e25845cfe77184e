"""The example shop end to end: every service its own process, real nats-server.

The demo itself; a participant killed in the middle of a handler; a participant
that crashes after committing but before acknowledging; a nats-server restart in
the middle of many sagas; a stalled saga timing out. After each, every saga is final
and the invariants hold.

The chaos tests run twice (issue #17): on one nats-server, and on a 3-node cluster
with every stream and bucket R3 (``MESHKIT_NATS_REPLICAS=3``, the server list as the
NATS URL), where restarting "the nats-server" is a SIGKILL and restart of the node
that leads the ``SHOP`` stream. ``-m cluster`` selects the cluster variants.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from examples.shop import invariants
from examples.shop.chaos import _stream_leader
from examples.shop.demo import SCENARIOS, GrpcOrders, Scenario
from examples.shop.flow import INITIAL_STOCK, ORDER_SAGA, SHOP_STREAM
from examples.shop.runner import SERVICES, ShopCluster
from meshkit.nats import NatsCluster, NatsServer
from meshkit.saga import EventBus, SagaTracker, state_name

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
FAST_ENV = {"SHOP_ACK_WAIT": "2"}


class Nats:
    """The test's NATS: one nats-server, or a 3-node cluster with R3 streams."""

    def __init__(self, server: NatsServer | NatsCluster) -> None:
        self.server = server
        self.url = server.url

    async def restart(self) -> str:
        """Restart the server; on a cluster, SIGKILL and restart the ``SHOP`` leader.

        Returns the name of the node restarted ("" for the single server).
        """
        if isinstance(self.server, NatsServer):
            await asyncio.to_thread(self.server.restart)
            return ""
        bus = await EventBus.connect(self.url, name="test-leader")
        try:
            leader = await _stream_leader(bus.js, SHOP_STREAM.name)
        finally:
            await bus.close()
        assert leader, "SHOP has no leader"
        # Kill (a crash: no leadership handed over) and start again: an election.
        await asyncio.to_thread(self.server.restart, self.server.index_of(leader))
        return leader


class Shop:
    def __init__(self, nats: Nats, tmp: Path, env: dict[str, dict[str, str]] | None = None) -> None:
        per = {name: dict(FAST_ENV) for name in SERVICES}
        for name, extra in (env or {}).items():
            per[name].update(extra)
        self.nats = nats
        self.cluster = ShopCluster(nats.url, tmp / "data", env=per)
        self.bus: EventBus | None = None
        self.tracker: SagaTracker | None = None
        self.orders: GrpcOrders | None = None

    async def start(self) -> Shop:
        await asyncio.to_thread(self.cluster.start)
        self.bus = await EventBus.connect(self.nats.url, name="test-tracker", publish_retry=30)
        self.tracker = await SagaTracker(self.bus, SHOP_STREAM, ORDER_SAGA).start()
        if isinstance(self.nats.server, NatsCluster):  # R3 through the one setting alone
            for stream in (SHOP_STREAM.name, "KV_meshkit_sagas"):
                info = await self.bus.js.stream_info(stream)
                assert info.config.num_replicas == 3, (stream, info.config.num_replicas)
        self.orders = GrpcOrders(self.cluster.address("order"))
        return self

    async def place(self, scenarios: list[Scenario], tag: str) -> list[str]:
        assert self.orders is not None
        return list(
            await asyncio.gather(
                *(self.orders.create(s, f"{tag}-{i}") for i, s in enumerate(scenarios))
            )
        )

    async def final_states(self, ids: list[str], within: float = 60) -> dict[str, str]:
        assert self.tracker is not None and self.tracker.store is not None
        statuses = await asyncio.gather(*(self.tracker.store.wait(i, within=within) for i in ids))
        return {
            i: (state_name(s.state) if s is not None else "MISSING")
            for i, s in zip(ids, statuses, strict=True)
        }

    async def invariants(self, within: float = 15) -> invariants.Report:
        end = time.monotonic() + within
        while True:
            report = invariants.check(self.cluster.data_dir, INITIAL_STOCK)
            if report.ok or time.monotonic() > end:
                return report
            await asyncio.sleep(0.1)

    async def stop(self) -> dict[str, int | None]:
        if self.orders is not None:
            await self.orders.close()
        if self.tracker is not None:
            await self.tracker.stop()
        if self.bus is not None:
            await self.bus.close()
        return await asyncio.to_thread(self.cluster.stop)


@pytest.fixture(params=["single", pytest.param("cluster", marks=pytest.mark.cluster)])
async def nats(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Nats]:
    """One nats-server, or a fresh 3-node cluster (under a second to start) with every
    stream and bucket R3: the services inherit the setting, the test's tracker too."""
    if request.param == "single":
        async with NatsServer() as server:
            yield Nats(server)
        return
    monkeypatch.setenv("MESHKIT_NATS_REPLICAS", "3")
    async with NatsCluster(size=3, start_timeout=60.0) as cluster:
        yield Nats(cluster)


def _ledger(shop: Shop, order_id: str) -> list[str]:
    import sqlite3

    with sqlite3.connect(f"file:{shop.cluster.db_path('payment')}?mode=ro", uri=True) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT kind FROM ledger WHERE order_id = ? ORDER BY seq", (order_id,)
            )
        ]


def test_the_demo_exits_zero_with_every_invariant() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "examples.shop.demo", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary: OK" in proc.stdout
    assert time.monotonic() - started < 60
    for label in ("success", "out of stock", "payment declined", "shipping failure"):
        assert label in proc.stdout


async def test_participant_killed_mid_handler_is_redelivered_and_charges_once(
    nats: Nats, tmp_path: Path
) -> None:
    shop = await Shop(nats, tmp_path, env={"payment": {"SHOP_HANDLER_DELAY": "30"}}).start()
    try:
        [order_id] = await shop.place([SCENARIOS[0]], "kill")
        payment = shop.cluster.procs["payment"]
        for _ in range(400):
            if any(line.startswith("HANDLING") for line in payment.lines):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"payment never started handling: {payment.log_tail()}")
        await asyncio.to_thread(shop.cluster.kill, "payment")  # SIGKILL inside the transaction
        assert _ledger(shop, order_id) == []  # the uncommitted charge died with it
        await asyncio.to_thread(shop.cluster.restart, "payment", env={"SHOP_HANDLER_DELAY": "0"})
        states = await shop.final_states([order_id])
        assert states == {order_id: "COMPLETED"}
        assert _ledger(shop, order_id) == ["charge"]
        report = await shop.invariants()
        assert report.ok, report.problems
    finally:
        await shop.stop()


async def test_crash_after_commit_before_ack_replays_outputs_without_a_second_effect(
    nats: Nats, tmp_path: Path
) -> None:
    marker = tmp_path / "crash-once"
    marker.write_text("x")
    shop = await Shop(
        nats, tmp_path, env={"payment": {"SHOP_CRASH_AFTER_COMMIT": str(marker)}}
    ).start()
    try:
        [order_id] = await shop.place([SCENARIOS[0]], "crash")
        payment = shop.cluster.procs["payment"]
        await asyncio.to_thread(payment.proc.wait, 30)
        assert payment.proc.returncode == 137 and not marker.exists()
        assert _ledger(shop, order_id) == [
            "charge"
        ]  # committed, but never acknowledged or published
        await asyncio.to_thread(shop.cluster.restart, "payment")
        states = await shop.final_states([order_id])
        assert states == {order_id: "COMPLETED"}
        assert _ledger(shop, order_id) == ["charge"]  # the redelivery found it in the inbox
        assert shop.tracker is not None and await shop.tracker.wait_caught_up(within=10)
        status = await shop.tracker.store.get(order_id)  # type: ignore[union-attr]
        kinds = [s.event_type.rsplit(".", 1)[-1] for s in status.steps]
        assert kinds.count("PaymentCompleted") == 1 and kinds.count("OrderCompleted") == 1
        report = await shop.invariants()
        assert report.ok, report.problems
    finally:
        await shop.stop()


async def test_nats_restart_during_many_sagas_every_saga_finishes_and_invariants_hold(
    nats: Nats, tmp_path: Path
) -> None:
    shop = await Shop(nats, tmp_path).start()
    try:
        mix = [s for s in SCENARIOS if "vinyl" not in s.label and s.customer != "frank"]
        batch = [mix[i % len(mix)] for i in range(60)]
        placing = asyncio.create_task(shop.place(batch, "restart"))
        await asyncio.sleep(0.3)
        # File storage: the streams, consumers and KV survive (on a cluster, on the others).
        await nats.restart()
        ids = await placing
        more = await shop.place(batch[:20], "after")
        states = await shop.final_states(ids + more, within=90)
        expected: dict[str, Any] = {
            i: s.expect for i, s in zip(ids + more, batch + batch[:20], strict=True)
        }
        wrong = {i: (st, expected[i]) for i, st in states.items() if st != expected[i]}
        assert not wrong, wrong
        report = await shop.invariants(within=30)
        assert report.ok, report.problems
        assert report.completed == sum(1 for s in batch + batch[:20] if s.expect == "COMPLETED")
        codes = await shop.stop()
        assert all(c == 0 for c in codes.values()), codes
    finally:
        await shop.stop()


async def test_a_stalled_saga_times_out_and_is_compensated(nats: Nats, tmp_path: Path) -> None:
    shop = await Shop(nats, tmp_path, env={"order": {"SHOP_SAGA_TIMEOUT": "1.5"}}).start()
    try:
        await asyncio.to_thread(shop.cluster.stop_one, "shipping")  # the saga will stall there
        [order_id] = await shop.place([SCENARIOS[0]], "stall")
        states = await shop.final_states([order_id], within=30)
        assert states == {order_id: "TIMED_OUT"}
        # The order service cancelled on SagaTimedOut; payment and inventory compensated on
        # OrderCancelled, without waiting for shipping.
        for _ in range(200):
            if _ledger(shop, order_id) == ["charge", "refund"]:
                break
            await asyncio.sleep(0.05)
        assert _ledger(shop, order_id) == ["charge", "refund"]
        # Shipping comes back and works through its backlog (the late PaymentCompleted,
        # then OrderCancelled): the order stays cancelled and every invariant holds.
        await asyncio.to_thread(shop.cluster.restart, "shipping")
        report = await shop.invariants(within=20)
        assert report.ok, report.problems
        assert (report.completed, report.cancelled) == (0, 1)
        assert shop.tracker is not None and await shop.tracker.wait_caught_up(within=10)
        status = await shop.tracker.store.get(order_id)  # type: ignore[union-attr]
        kinds = [
            s.event_type.rsplit(".", 1)[-1]
            for s in sorted(status.steps, key=lambda s: s.at.ToMilliseconds())
        ]
        assert state_name(status.state) == "TIMED_OUT"
        assert kinds[:3] == ["OrderCreated", "StockReserved", "PaymentCompleted"]
        assert (
            "SagaTimedOut" in kinds and "OrderCancelled" in kinds and "OrderCompleted" not in kinds
        )
    finally:
        await shop.stop()
