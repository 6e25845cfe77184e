"""Adaptive concurrency limits: the limit falls under rising latency or drops and recovers."""

from __future__ import annotations

import pytest

from meshkit.resilience.adaptive import (
    AdaptiveAlgorithm,
    AdaptiveLimitConfig,
    AdaptiveLimiter,
    Token,
)
from meshkit.resilience.clock import FakeClock
from meshkit.resilience.events import Event

pytestmark = pytest.mark.unit


def make(algorithm: AdaptiveAlgorithm, **kw: object) -> tuple[AdaptiveLimiter, FakeClock]:
    clock = FakeClock()
    kw.setdefault("sample_window", 0.005)  # about one window per round trip below
    kw.setdefault("min_window_samples", 1)
    cfg = AdaptiveLimitConfig(algorithm=algorithm, **kw)  # type: ignore[arg-type]
    return AdaptiveLimiter(cfg, name="al", clock=clock), clock


def round_trip(lim: AdaptiveLimiter, clock: FakeClock, rtt: float, *, drop: bool = False) -> None:
    """Fill the limiter (so the algorithm is not app-limited), then complete every call."""
    tokens: list[Token] = []
    while (t := lim.try_acquire()) is not None:
        tokens.append(t)
    clock.advance(rtt)
    for t in tokens:
        if drop:
            t.dropped()
        else:
            t.success()


def test_try_acquire_refuses_past_the_limit() -> None:
    lim, _ = make(AdaptiveAlgorithm.AIMD, initial_limit=3, min_limit=1, max_limit=10)
    events: list[Event] = []
    lim.add_listener(events.append)
    tokens = [lim.try_acquire() for _ in range(4)]
    assert [t is not None for t in tokens] == [True, True, True, False]
    assert lim.in_flight == 3
    assert lim.rejected == 1
    assert [e.kind for e in events] == ["rejected"]


def test_token_reports_once() -> None:
    lim, _ = make(AdaptiveAlgorithm.AIMD, initial_limit=3, min_limit=1)
    t = lim.try_acquire()
    assert t is not None
    t.ignore()
    t.success(0.01)
    t.dropped()
    assert lim.in_flight == 0
    assert lim.limit == 3  # ignore() is no sample


def test_aimd_grows_when_healthy_and_backs_off_on_drops() -> None:
    lim, clock = make(AdaptiveAlgorithm.AIMD, initial_limit=10, min_limit=2, max_limit=50)
    for _ in range(5):
        round_trip(lim, clock, 0.01)
    grown = lim.limit
    assert grown > 10
    round_trip(lim, clock, 0.01, drop=True)
    assert lim.limit < grown * 0.9**3
    for _ in range(200):
        round_trip(lim, clock, 0.01, drop=True)
    assert lim.limit == 2  # clamped at min_limit
    for _ in range(40):
        round_trip(lim, clock, 0.01)
    assert lim.limit > 10  # recovers when healthy


def test_aimd_treats_slow_rtt_as_drop() -> None:
    lim, clock = make(AdaptiveAlgorithm.AIMD, initial_limit=20, min_limit=2, timeout=1.0)
    round_trip(lim, clock, 2.0)
    assert lim.limit < 20


def test_aimd_does_not_grow_when_app_limited() -> None:
    lim, _ = make(AdaptiveAlgorithm.AIMD, initial_limit=20)
    for _ in range(100):
        t = lim.try_acquire()
        assert t is not None
        t.success(0.01)  # one at a time: in flight 1 of 20
    assert lim.limit == 20


def test_gradient2_drops_when_latency_rises_and_recovers() -> None:
    lim, clock = make(AdaptiveAlgorithm.GRADIENT2, initial_limit=50, min_limit=5, max_limit=200)
    for _ in range(50):
        round_trip(lim, clock, 0.010)
    healthy = lim.limit
    assert healthy >= 50  # steady latency: the limit holds or grows (queue headroom)
    for _ in range(30):
        round_trip(lim, clock, 0.100)  # latency x10
    congested = lim.limit
    assert congested < healthy / 2
    for _ in range(200):
        round_trip(lim, clock, 0.010)
    assert lim.limit > congested * 2


def test_gradient2_drops_on_dropped_calls() -> None:
    lim, clock = make(AdaptiveAlgorithm.GRADIENT2, initial_limit=100, min_limit=5, max_limit=200)
    round_trip(lim, clock, 0.01)
    before = lim.limit
    for _ in range(15):
        round_trip(lim, clock, 0.01, drop=True)
    assert lim.limit < before / 2


def test_gradient2_respects_bounds() -> None:
    lim, clock = make(AdaptiveAlgorithm.GRADIENT2, initial_limit=10, min_limit=8, max_limit=12)
    for _ in range(200):
        round_trip(lim, clock, 0.01)
    assert lim.limit == 12
    for _ in range(200):
        round_trip(lim, clock, 1.0, drop=True)
    assert lim.limit == 8


def test_vegas_grows_without_queueing_and_shrinks_with_it() -> None:
    lim, clock = make(AdaptiveAlgorithm.VEGAS, initial_limit=20, min_limit=2, max_limit=500)
    for _ in range(30):
        round_trip(lim, clock, 0.010)
    grown = lim.limit
    assert grown > 20
    for _ in range(60):
        round_trip(lim, clock, 0.050)  # 5x the no-load RTT: a long queue
    assert lim.limit < grown
    shrunk = lim.limit
    for _ in range(30):
        round_trip(lim, clock, 0.010, drop=True)
    assert lim.limit <= shrunk


def test_windowed_algorithms_update_once_per_window() -> None:
    clock = FakeClock()
    cfg = AdaptiveLimitConfig(
        algorithm=AdaptiveAlgorithm.GRADIENT2,
        initial_limit=100,
        min_limit=5,
        sample_window=1.0,
        min_window_samples=10,
    )
    lim = AdaptiveLimiter(cfg, clock=clock)
    for _ in range(9):
        t = lim.try_acquire()
        assert t is not None
        t.dropped()
    clock.advance(2.0)
    assert lim.limit == 100  # 9 samples: the window is not complete
    t = lim.try_acquire()
    assert t is not None
    t.dropped()
    assert lim.limit < 100  # the 10th closes it: one decrease for the whole window
    assert lim.limit > 100 * 0.5


def test_limit_changes_are_events() -> None:
    lim, clock = make(AdaptiveAlgorithm.AIMD, initial_limit=10, min_limit=2)
    events: list[Event] = []
    lim.add_listener(events.append)
    round_trip(lim, clock, 0.01, drop=True)
    changes = [e for e in events if e.kind == "limit_changed"]
    assert changes
    assert changes[-1].value == lim.limit
