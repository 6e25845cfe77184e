"""The shop on a 3-node JetStream cluster across a SIGKILL of the saga stream's leader.

One run (:func:`leader_kill_run`): every saga participant runs as two processes,
every stream and bucket is R3, set only through ``MESHKIT_NATS_REPLICAS=3`` and a
server list as the NATS URL (nothing in the shop or meshkit is patched). Orders go
in at a steady rate; a moment after they start, the node leading the ``SHOP``
stream is SIGKILLed; orders keep coming; once every saga placed so far is final
the node is restarted and a last batch goes through. Then every saga must be
final in the state its scenario leads to, the shop's invariants must hold
(``examples/shop/invariants.py``), and no effect may have happened twice: one
event of each type per order in ``SHOP``, at most one charge per order, one
notification per finished order.

The stall is measured from when sagas finish (the tracker's writes of a final
state, seen on the bucket's subjects): the longest time after the kill during
which no saga finished, while orders kept coming in.

``tests/e2e/test_shop_cluster.py`` runs it once; ``bench/chaos_cluster.py`` runs it
many times and writes the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from examples.shop import invariants
from examples.shop.demo import EXPECT_COMPLETED, SCENARIOS, Scenario, order_request
from examples.shop.flow import INITIAL_STOCK, ORDER_SAGA, SHOP_STREAM
from examples.shop.runner import SERVICES, ShopCluster

log = logging.getLogger("examples.shop.chaos")

# Scenarios whose outcome does not depend on what else is in flight: the last vinyl
# (and the order for two of them) and the 700-book order (which holds most of the
# books while payment declines it) would make other orders' outcomes a race.
STEADY: tuple[Scenario, ...] = tuple(
    s for s in SCENARIOS if "vinyl" not in s.label and s.customer not in ("frank", "ivan")
)

# Every stream and bucket the shop and the tracker use (the order store is in SHOP).
SHOP_STREAMS = (SHOP_STREAM.name, "KV_meshkit_sagas", "MESHKIT_DLQ")


@dataclass
class RunResult:
    """What one leader-kill run saw."""

    started: int = 0
    completed: int = 0
    compensated: int = 0
    other: dict[str, int] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    wrong: dict[str, tuple[str, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    replicas: dict[str, int] = field(default_factory=dict)
    killed: str = ""
    meta_leader: str = ""  # the JetStream meta group's leader when the node was killed
    new_leader: str = ""
    stall: float = 0.0  # the longest time after the kill with no saga finishing
    first_final_after_kill: float = 0.0  # how long until the first saga finished after it
    drained: float = 0.0  # kill -> every saga placed before restarting the node final
    create_retries: int = 0
    tracker_caught_up: bool = False
    baseline_gap: float = 0.0  # the longest gap between finishes before the kill
    phases: dict[str, float] = field(default_factory=dict)  # seconds each part took
    elapsed: float = 0.0

    @property
    def lost(self) -> int:
        return len(self.pending)

    @property
    def ok(self) -> bool:
        return not (self.pending or self.wrong or self.problems or self.duplicates)

    def summary(self) -> str:
        return (
            f"{self.started} sagas: {self.completed} completed, {self.compensated} "
            f"compensated, {self.lost} lost/pending, {len(self.wrong)} wrong; killed "
            f"{self.killed} (SHOP leader"
            f"{', meta leader' if self.killed == self.meta_leader else ''}"
            f", then {self.new_leader or '?'}); stall "
            f"{self.stall:.2f} s (first final {self.first_final_after_kill:.2f} s after "
            f"the kill, drained in {self.drained:.2f} s); {len(self.problems)} invariant "
            f"problems, {len(self.duplicates)} duplicates; {self.elapsed:.1f} s"
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["lost"] = self.lost
        doc["ok"] = self.ok
        return doc


class _Finishes:
    """When each saga first reached a final state: the tracker's KV writes, seen on a
    plain subscription to the bucket's subjects (no polling, no consumer to elect)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.state: dict[str, str] = {}
        self._sub: Any = None

    async def start(self, nc: Any) -> None:
        from meshkit._pb.meshkit.v1 import saga_pb2
        from meshkit.saga import FINAL_STATES, state_name

        async def on_msg(msg: Any) -> None:
            if not msg.data:
                return
            status = saga_pb2.SagaStatus()
            try:
                status.ParseFromString(msg.data)
            except Exception:  # not a status (a purge marker): nothing to record
                return
            if status.state in FINAL_STATES and status.saga_id not in self.at:
                self.at[status.saga_id] = time.monotonic()
                self.state[status.saga_id] = state_name(status.state)

        self._sub = await nc.subscribe("$KV.meshkit_sagas.>", cb=on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def wait(self, ids: list[str], within: float) -> bool:
        end = time.monotonic() + within
        while not all(i in self.at for i in ids):
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.05)
        return True


class _Placer:
    """Places orders on the order service's instances in turn; a create that fails
    (a node gone, an election) is retried with the same request id, which the order
    service makes idempotent, until ``within`` runs out."""

    def __init__(self, addresses: list[str], within: float = 60.0) -> None:
        from examples.shop import wiring
        from examples.shop.gen.shop.v1 import orders_pb2_grpc

        self.channels = [wiring.channel(a) for a in addresses]
        self.stubs = [orders_pb2_grpc.OrderServiceStub(c) for c in self.channels]
        self.within = within
        self.retries = 0
        self.expect: dict[str, str] = {}
        self._n = 0

    async def create(self, s: Scenario, request_id: str) -> str:
        import grpc

        req = order_request(s, request_id)
        self._n += 1
        turn = self._n
        end = time.monotonic() + self.within
        delay = 0.1
        while True:
            stub = self.stubs[turn % len(self.stubs)]
            try:
                order = await stub.CreateOrder(req, timeout=10)
                self.expect[str(order.order_id)] = s.expect
                return str(order.order_id)
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() + delay > end:
                    raise
                log.info("create %s: %s; retrying", request_id, exc.code().name)
                self.retries += 1
                turn += 1
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def place(
        self, count: int, rate: float, tag: str, on_placed: Callable[[int], None] | None = None
    ) -> list[str]:
        """``count`` orders, one every ``1/rate`` s, each in its own task (a slow create
        does not hold up the next)."""
        start = time.monotonic()
        tasks: list[asyncio.Task[str]] = []
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            s = STEADY[i % len(STEADY)]
            tasks.append(asyncio.create_task(self.create(s, f"{tag}-{i}")))
            if on_placed is not None:
                on_placed(i + 1)
        return list(await asyncio.gather(*tasks))

    async def close(self) -> None:
        for c in self.channels:
            await c.close()


def _longest_gap(start: float, times: list[float]) -> float:
    last, gap = start, 0.0
    for t in sorted(x for x in times if x >= start):
        gap = max(gap, t - last)
        last = t
    return gap


async def _stream_leader(js: Any, stream: str, within: float = 20.0) -> str:
    from meshkit.saga import cluster

    info = await cluster.retrying(
        f"stream info {stream}", lambda: js.stream_info(stream), window=within
    )
    return str(info.cluster.leader or "") if info.cluster is not None else ""


async def _duplicates(nc: Any) -> list[str]:
    """Events of one type that happened twice for one order in ``SHOP``."""
    from meshkit.saga import envelope
    from meshkit.saga.eventstore import read_batches

    seen: Counter[tuple[str, str]] = Counter()
    ids: Counter[str] = Counter()
    for subjects in SHOP_STREAM.event_subjects:
        async for batch in read_batches(nc, SHOP_STREAM.name, subjects, 1, 256, 5.0):
            for msg in batch:
                saga = envelope.saga_id_of(msg.headers)
                etype = envelope.event_type_of(msg.headers) or msg.subject
                seen[(saga, etype)] += 1
                ids[envelope.event_id_of(msg.headers)] += 1
    out = [f"{etype} {n} times for {saga}" for (saga, etype), n in seen.items() if n > 1]
    out += [f"event id {i} stored {n} times" for i, n in ids.items() if i and n > 1]
    return out


def _notifications(data_dir: Path) -> Counter[str]:
    import sqlite3

    path = data_dir / "notification.sqlite"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as c:
        return Counter(str(r[0]) for r in c.execute("SELECT order_id FROM notifications"))


async def leader_kill_run(
    nats: Any,
    data_dir: Path,
    *,
    before: int = 30,
    during: int = 150,
    after: int = 20,
    rate: float = 25.0,
    kill_after: float = 1.0,
    instances: int = 2,
    replicas: int = 3,
    env: dict[str, str] | None = None,
    within: float = 90.0,
) -> RunResult:
    """One run on ``nats`` (a :class:`meshkit.nats.NatsCluster`, fresh: the shop's
    streams must not exist yet). The calling process must have
    ``MESHKIT_NATS_REPLICAS`` set as the services get it (the tracker's bucket).

    ``before`` orders go through first; then ``during`` orders at ``rate`` per second,
    the SHOP leader killed ``kill_after`` s into them; once those are final (or
    ``within`` s have passed) the node is restarted and ``after`` orders go through.
    """
    from meshkit.saga import EventBus, SagaTracker, state_name

    began = time.monotonic()
    res = RunResult()
    per = {"MESHKIT_NATS_REPLICAS": str(replicas), **(env or {})}
    shop = ShopCluster(
        nats.url, data_dir, env={n: dict(per) for n in SERVICES}, instances=instances
    )
    mark = began

    def phase(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        res.phases[name] = round(now - mark, 2)
        mark = now

    await asyncio.to_thread(shop.start)
    phase("start")
    bus: EventBus | None = None
    tracker: SagaTracker | None = None
    placer: _Placer | None = None
    finishes = _Finishes()
    killed = -1
    try:
        bus = await EventBus.connect(nats.url, name="chaos-tracker", publish_retry=30)
        tracker = await SagaTracker(bus, SHOP_STREAM, ORDER_SAGA).start()
        await finishes.start(bus.nc)
        placer = _Placer(shop.addresses("order"))
        for name in SHOP_STREAMS:
            with contextlib.suppress(Exception):
                info = await bus.js.stream_info(name)
                res.replicas[name] = int(info.config.num_replicas or 1)

        ids = await placer.place(before, rate, "before")
        if not await finishes.wait(ids, within):
            log.warning("warm-up: %d sagas not final", sum(i not in finishes.at for i in ids))
        res.baseline_gap = _longest_gap(
            min(finishes.at.get(i, began) for i in ids),
            [finishes.at[i] for i in ids if i in finishes.at],
        )

        phase("warm-up")
        leader = await _stream_leader(bus.js, SHOP_STREAM.name)
        killed = nats.index_of(leader)
        res.killed = leader
        with contextlib.suppress(Exception):
            jsz = await asyncio.to_thread(nats.jsz, killed)
            res.meta_leader = str((jsz.get("meta_cluster") or {}).get("leader") or "")
        kill_at: list[float] = []
        kill_trigger = max(1, int(kill_after * rate))

        def on_placed(n: int) -> None:
            if n == kill_trigger and not kill_at:
                nats.kill(killed)  # SIGKILL: returns at once
                kill_at.append(time.monotonic())

        during_ids = await placer.place(during, rate, "during", on_placed)
        ok = await finishes.wait(during_ids, within)
        t_kill = kill_at[0]
        done = [finishes.at[i] for i in during_ids if i in finishes.at]
        res.stall = _longest_gap(t_kill, done)
        res.first_final_after_kill = min((t - t_kill for t in done if t > t_kill), default=0.0)
        res.drained = max(done) - t_kill if ok and done else -1.0
        res.new_leader = await _stream_leader(bus.js, SHOP_STREAM.name)
        phase("kill")

        await asyncio.to_thread(nats.restart, killed)
        killed = -1
        phase("restart")
        after_ids = await placer.place(after, rate, "after")
        await finishes.wait(after_ids, within)
        phase("after")

        every = ids + during_ids + after_ids
        res.started = len(every)
        res.create_retries = placer.retries
        assert tracker.store is not None
        # Informational: every saga is final already; the tracker may still be
        # re-applying events whose KV writes failed in the election (redelivered).
        res.tracker_caught_up = await tracker.wait_caught_up(within=5)
        phase("tracker caught up")
        for i in every:
            status = await tracker.store.get(i)
            state = state_name(status.state) if status is not None else "MISSING"
            if state == "COMPLETED":
                res.completed += 1
            elif state == "COMPENSATED":
                res.compensated += 1
            elif state in ("RUNNING", "COMPENSATING", "MISSING"):
                res.pending.append(f"{i} {state}")
                continue
            else:
                res.other[state] = res.other.get(state, 0) + 1
            want = "COMPLETED" if placer.expect[i] == EXPECT_COMPLETED else "COMPENSATED"
            if state != want:
                res.wrong[i] = (state, want)
        # The query side's view lags; wait (bounded) for the invariants to hold.
        end = time.monotonic() + 30
        while True:
            report = invariants.check(shop.data_dir, INITIAL_STOCK)
            if report.ok or time.monotonic() > end:
                break
            await asyncio.sleep(0.2)
        res.problems = list(report.problems)
        phase("invariants")
        if report.completed + report.cancelled != len(every):
            res.problems.append(
                f"the order view has {report.completed + report.cancelled} final orders "
                f"of {len(every)}"
            )
        res.duplicates = await _duplicates(bus.nc)
        notes = _notifications(shop.data_dir)
        res.duplicates += [f"{n} notifications for {o}" for o, n in notes.items() if n > 1]
        res.duplicates += [f"no notification for {o}" for o in every if notes.get(o, 0) == 0]
        phase("checks")
    finally:
        if killed >= 0:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(nats.restart, killed)
        await finishes.stop()
        if placer is not None:
            await placer.close()
        if tracker is not None:
            await tracker.stop()
        if bus is not None:
            await bus.close()
        await asyncio.to_thread(shop.stop)
        phase("stop")
        res.elapsed = time.monotonic() - began
    return res


def require_replicas_env(replicas: int = 3) -> None:
    """The calling process's own streams and buckets (the tracker's) follow the setting."""
    os.environ["MESHKIT_NATS_REPLICAS"] = str(replicas)
