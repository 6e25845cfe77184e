"""SourceWatch: a replicated stream's source left stalled after a leader election
(nats-server waiting 30 s for a consumer request lost in the election, then backing
off) is seen in stream info and nudged by a leader step-down; without NATS."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from meshkit.saga import EventBus, StreamSpec, cluster
from meshkit.saga.eventstore import EventStoreConfig
from meshkit.saga.streams import EventStoreSource

pytestmark = pytest.mark.unit


class Msg:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.data = json.dumps(doc).encode()


class FakeNC:
    """Answers stream info with ``leader`` and each source's ``active`` (ns; -1: never)."""

    def __init__(self) -> None:
        self.leader = "n1"
        self.active: dict[str, int] = {"ORDERS": -1}
        self.stepdowns: list[str] = []
        self.fail_info = False

    async def request(self, subject: str, payload: bytes, timeout: float) -> Msg:
        if subject.startswith("$JS.API.STREAM.LEADER.STEPDOWN."):
            self.stepdowns.append(subject.rsplit(".", 1)[-1])
            self.leader = {"n1": "n2", "n2": "n3", "n3": "n1"}[self.leader]
            self.active = dict.fromkeys(self.active, 10_000_000)
            return Msg({"success": True})
        assert subject == "$JS.API.STREAM.INFO.SHOP"
        if self.fail_info:
            raise TimeoutError
        return Msg(
            {
                "config": {"name": "SHOP"},
                "cluster": {"leader": self.leader},
                "sources": [{"name": n, "lag": 0, "active": a} for n, a in self.active.items()],
            }
        )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_source_inactive_under_one_leader_is_nudged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nc, clock = FakeNC(), Clock()
    watch = cluster.SourceWatch(nc, "SHOP", stalled_after=6, clock=clock)
    for _ in range(6):  # -1 for 5 s: a new leader setting its sources up, not stalled
        assert await watch.check() == []
        clock.now += 1
    assert nc.stepdowns == []
    with caplog.at_level(logging.WARNING, logger="meshkit.saga.cluster"):
        assert await watch.check() == ["ORDERS"]  # 6 s: stalled
    assert nc.stepdowns == ["SHOP"] and watch.nudges == 1
    (text,) = [r.getMessage() for r in caplog.records]
    assert "stream SHOP: source ORDERS has copied nothing for 6s under leader n1" in text
    # The next leader set its sources up: active again, nothing more to do.
    for _ in range(20):
        clock.now += 1
        assert await watch.check() == []
    assert nc.stepdowns == ["SHOP"]


async def test_a_healthy_or_changing_source_is_left_alone() -> None:
    nc, clock = FakeNC(), Clock()
    watch = cluster.SourceWatch(nc, "SHOP", stalled_after=6, clock=clock)
    nc.active = {"ORDERS": 5_000_000}  # heard 5 ms ago
    for _ in range(20):
        assert await watch.check() == []
        clock.now += 1
    # Inactive, but the leader changes every 4 s (elections going on): each new
    # leader gets its own 6 s.
    nc.active = {"ORDERS": -1}
    for step in range(20):
        if step % 4 == 0:
            nc.leader = {"n1": "n2", "n2": "n3", "n3": "n1"}[nc.leader]
        assert await watch.check() == []
        clock.now += 1
    # No answer (an election): no judgement either way.
    nc.fail_info = True
    clock.now += 60
    assert await watch.check() == []
    assert nc.stepdowns == []


async def test_active_but_silent_for_too_long_is_stalled_and_zero_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nc, clock = FakeNC(), Clock()
    nc.active = {"ORDERS": 30 * 10**9}  # last heard 30 s ago
    watch = cluster.SourceWatch(nc, "SHOP", stalled_after=6, clock=clock)
    await watch.check()
    clock.now += 6
    assert await watch.check() == ["ORDERS"]
    monkeypatch.setenv(cluster.SOURCE_STALL_ENV, "0")
    off = cluster.SourceWatch(nc, "SHOP", clock=clock)
    assert off.stalled_after == 0 and await off.check() == [] and off.checks == 0
    monkeypatch.setenv(cluster.SOURCE_STALL_ENV, "10s")
    assert cluster.source_stall() == 10.0


def test_the_bus_watches_only_replicated_streams_with_sources() -> None:
    class NC:
        def jetstream(self) -> None:
            return None

        def new_inbox(self) -> str:
            return "_INBOX.x"

    bus = EventBus(NC())  # type: ignore[arg-type]
    started: list[str] = []
    monkey = pytest.MonkeyPatch()
    monkey.setattr(cluster.SourceWatch, "start", lambda self: started.append(self.stream) or self)
    try:
        sourced = StreamSpec(
            name="SHOP", prefix="shop", sources=(EventStoreSource(EventStoreConfig("ORDERS")),)
        )
        bus._watch_sources(StreamSpec(name="PLAIN", prefix="plain"), 3)
        bus._watch_sources(sourced, 1)  # one server: no elections
        assert started == []
        bus._watch_sources(sourced, 3)
        bus._watch_sources(sourced, 3)  # once per stream
        assert started == ["SHOP"] and list(bus.source_watches) == ["SHOP"]
    finally:
        monkey.undo()
