"""The orchestrated order saga (seed §8.4) on a real nats-server: every path, and a
crash at every point of every state followed by a resume, without a duplicate command."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from examples.es_orders.saga import ORDER_SAGA, Shop, order_request, participants
from meshkit._pb.meshkit.v1 import saga_pb2
from meshkit.saga.bus import EventBus
from meshkit.saga.eventstore import EventStore, EventStoreConfig
from meshkit.saga.orchestrator import Orchestrator, OrchestratorConfig, load_status
from meshkit.saga.streams import ConsumerSpec

pytestmark = pytest.mark.integration

_n = itertools.count()

PATHS: dict[str, dict[str, Any]] = {
    "success": {
        "request": order_request("alice", ("apple", 2, 1000)),
        "states": ["PENDING", "ORDER_CREATED", "STOCK_RESERVED", "PAYMENT_COMPLETED", "COMPLETED"],
        "commands": [
            ("order", "CreateOrderRequest"),
            ("inventory", "ReserveStockRequest"),
            ("payment", "ChargeRequest"),
            ("shipping", "ScheduleShipmentRequest"),
            ("notification", "SendNotificationRequest"),  # these two: the final state's
            ("order", "UpdateOrderRequest"),  # commands, in either order
        ],
    },
    "out_of_stock": {
        "request": order_request("bob", ("pear", 50, 1000)),
        "states": ["PENDING", "ORDER_CREATED", "CANCELLING_ORDER", "FAILED"],
        "commands": [
            ("order", "CreateOrderRequest"),
            ("inventory", "ReserveStockRequest"),
            ("order", "CancelOrderRequest"),
        ],
    },
    "declined": {
        "request": order_request("carol", ("apple", 1, 500_000)),
        "states": [
            "PENDING",
            "ORDER_CREATED",
            "STOCK_RESERVED",
            "RELEASING_STOCK",
            "CANCELLING_ORDER",
            "FAILED",
        ],
        "commands": [
            ("order", "CreateOrderRequest"),
            ("inventory", "ReserveStockRequest"),
            ("payment", "ChargeRequest"),
            ("inventory", "ReleaseStockRequest"),
            ("order", "CancelOrderRequest"),
        ],
    },
}


def same_commands(got: list[Any], want: list[Any]) -> bool:
    """Same commands, each once; in order except the final state's (sent together)."""
    return len(got) == len(want) and got[:-2] == want[:-2] and sorted(got) == sorted(want)


def points_for(state: str) -> list[str]:
    st = ORDER_SAGA.states[state]
    points = []
    if not st.final:
        points.append("before_write")
    points.append("after_write")
    if st.entry_commands():
        points += ["after_publish", "after_mark"]
    if state != ORDER_SAGA.initial:
        points.append("before_ack")
    return points


class Rig:
    """One isolated orchestration setup: its own stream, bucket, event store, participants."""

    def __init__(self, url: str) -> None:
        n = next(_n)
        self.url = url
        self.cfg = OrchestratorConfig(
            stream=f"ORCHT{n}",
            prefix=f"orcht{n}",
            bucket=f"orcht{n}",
            # A killed orchestrator's pull request lingers on the server until it
            # expires; a short expiry bounds how long its replies go astray.
            consumer=ConsumerSpec(
                ack_wait=0.7,
                idle_heartbeat=0.5,
                pull_expires=2.0,
                nak_backoff=(0.1,),
                max_deliver=10_000,
            ),
        )
        self.es_cfg = EventStoreConfig(stream=f"ORDERST{n}", prefix=f"orderst{n}")
        self.shop = Shop(stock={"apple": 10, "pear": 1})
        self.buses: list[EventBus] = []

    async def bus(self, name: str) -> EventBus:
        b = await EventBus.connect(self.url, name=name)
        self.buses.append(b)
        return b

    async def start_participants(self) -> None:
        bus = await self.bus("participants")
        store = EventStore(bus.nc, self.es_cfg)
        await store.ensure()
        for p in participants(self.shop, store):
            await p.start(bus, self.cfg, spec=ConsumerSpec(ack_wait=5.0))

    async def command_count(self, bus: EventBus) -> int:
        info = await bus.js.stream_info(self.cfg.stream, subjects_filter=f"{self.cfg.prefix}.cmd.>")
        return sum((info.state.subjects or {}).values())

    async def close(self) -> None:
        for b in self.buses:
            if not b.nc.is_closed:
                await b.close()


@pytest.fixture
async def rigs(nats_server_module: Any) -> AsyncIterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    await asyncio.gather(*(r.close() for r in made), return_exceptions=True)


async def test_every_path_runs_to_its_final_state(nats_server_module: Any, rigs: list[Rig]) -> None:
    rig = Rig(nats_server_module.url)
    rigs.append(rig)
    await rig.start_participants()
    orch = await Orchestrator(await rig.bus("orch"), ORDER_SAGA, config=rig.cfg).start()
    for name, path in PATHS.items():
        await orch.begin(name, path["request"])
    for name, path in PATHS.items():
        inst = await orch.wait(name, within=20)
        assert [s.to_state for s in inst.history] == path["states"], name
        got = [(p, c) for p, c, s in rig.shop.received if s == name]
        if name == "success":
            await _until(lambda: len([r for r in rig.shop.received if r[2] == "success"]) == 6)
            got = [(p, c) for p, c, s in rig.shop.received if s == name]
        assert same_commands(got, path["commands"]), (name, got)
    assert rig.shop.stock == {"apple": 8, "pear": 1}  # declined order's stock came back
    assert rig.shop.reservations.keys() == {"r-o-success"}
    # The saga as meshkit saga show would print it.
    status = await load_status(orch.bus, "declined", config=rig.cfg)
    assert status.state == saga_pb2.SAGA_STATE_COMPENSATED and status.reason == "FAILED"
    assert [s.compensation for s in status.steps] == [False, False, False, True, True, False]
    ok = await load_status(orch.bus, "success", saga_type="order", config=rig.cfg)
    assert ok.state == saga_pb2.SAGA_STATE_COMPLETED and len(ok.steps) == 5
    evs_ok = await EventStore(orch.bus.nc, rig.es_cfg).read("order", "o-success")
    assert [e.event_type for e in evs_ok] == ["shop.v1.OrderCreated", "shop.v1.OrderCompleted"]
    # Starting a saga twice is a no-op.
    again = await orch.begin("success", PATHS["success"]["request"])
    assert again.state == "COMPLETED"
    assert await rig.command_count(orch.bus) == 6 + 3 + 5
    # The order aggregate was event-sourced along the way.
    store = EventStore(orch.bus.nc, rig.es_cfg)
    evs = await store.read("order", "o-declined")
    assert [e.event_type for e in evs] == ["shop.v1.OrderCreated", "shop.v1.OrderCancelled"]
    assert evs[0].envelope.saga_id == "declined"


async def _until(cond: Any, timeout: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > end:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


async def _crash_case(
    url: str, path_name: str, crash_state: str, point: str, rigs: list[Rig]
) -> str:
    """Freeze orchestrator 1 at (state, point), kill it, resume with orchestrator 2."""
    path = PATHS[path_name]
    rig = Rig(url)
    rigs.append(rig)
    await rig.start_participants()
    saga_id = f"{path_name}-{crash_state}-{point}".replace("_", "-").lower()
    crashed = asyncio.Event()

    async def hook(p: str, inst: Any) -> None:
        if p == point and inst.state == crash_state and not crashed.is_set():
            crashed.set()
            await asyncio.Event().wait()  # frozen: nothing after this point runs

    bus1 = await rig.bus("orch1")
    orch1 = await Orchestrator(bus1, ORDER_SAGA, config=rig.cfg, hook=hook, name="orch1").start()
    begin = asyncio.create_task(orch1.begin(saga_id, path["request"]))
    try:
        await asyncio.wait_for(crashed.wait(), 20)
    except TimeoutError:
        return f"{saga_id}: the crash point was never reached"
    # Kill -9: cancel the frozen work, drop the connection without acking anything.
    begin.cancel()
    await orch1.stop(grace=0.01)
    await bus1.nc.close()
    bus2 = await rig.bus("orch2")
    orch2 = await Orchestrator(bus2, ORDER_SAGA, config=rig.cfg, name="orch2").start()
    try:
        inst = await orch2.wait(saga_id, within=25)
    except TimeoutError as exc:
        return f"{saga_id}: {exc}"
    if [s.to_state for s in inst.history] != path["states"]:
        return f"{saga_id}: path {[s.to_state for s in inst.history]}"
    want = len(path["commands"])
    try:
        await _until(lambda: len(rig.shop.received) >= want, 10)
    except TimeoutError:
        pass
    got = [(p, c) for p, c, _ in rig.shop.received]
    if not same_commands(got, path["commands"]):
        return f"{saga_id}: participants received {got}"
    stored = await rig.command_count(bus2)
    if stored != want:
        return f"{saga_id}: {stored} commands stored, expected {want}"
    await orch2.stop()
    return ""


CASES = [
    (name, state, point)
    for name, path in PATHS.items()
    for state in path["states"]
    for point in points_for(state)
]


@pytest.mark.timeout(150)
async def test_crash_and_resume_at_every_state_sends_no_command_twice(
    nats_server_module: Any, rigs: list[Rig]
) -> None:
    assert len(CASES) > 50
    gate = asyncio.Semaphore(12)

    async def one(case: tuple[str, str, str]) -> str:
        async with gate:
            return await _crash_case(nats_server_module.url, *case, rigs)

    failures = [f for f in await asyncio.gather(*(one(c) for c in CASES)) if f]
    assert not failures, "\n".join(failures)


async def test_kv_state_is_readable_json(nats_server_module: Any, rigs: list[Rig]) -> None:
    rig = Rig(nats_server_module.url)
    rigs.append(rig)
    await rig.start_participants()
    orch = await Orchestrator(await rig.bus("orch"), ORDER_SAGA, config=rig.cfg).start()
    await orch.begin("s1", PATHS["out_of_stock"]["request"])
    await orch.wait("s1")
    kv = await orch.kv()
    doc = json.loads((await kv.get("order.s1")).value)
    assert doc["state"] == "FAILED" and doc["final"] is True
    assert [h["to"] for h in doc["history"]] == PATHS["out_of_stock"]["states"]
    assert "stateDiagram-v2" in ORDER_SAGA.to_mermaid()
