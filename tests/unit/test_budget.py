"""Retry budget (Finagle-style): ratio per call plus a reserve, expiring after ttl."""

from __future__ import annotations

import pytest

from meshkit.resilience.budget import RetryBudget, RetryBudgetConfig
from meshkit.resilience.clock import FakeClock
from meshkit.resilience.events import Event
from meshkit.resilience.retry import RetryPolicy

pytestmark = pytest.mark.unit


def outage(budget: RetryBudget, clock: FakeClock, calls: int, max_attempts: int, gap: float) -> int:
    """Run ``calls`` calls against a dead target; return the attempts sent."""
    attempts = 0
    for _ in range(calls):
        budget.record_call()
        attempts += 1
        for _ in range(max_attempts - 1):
            if not budget.try_withdraw():
                break
            attempts += 1
        clock.advance(gap)
    return attempts


def test_total_outage_stays_within_ratio_plus_reserve() -> None:
    clock = FakeClock()
    cfg = RetryBudgetConfig(ratio=0.2, min_per_second=10, ttl=10)
    budget = RetryBudget(cfg, clock=clock)
    calls = 1000
    # 1000 calls within one ttl: every deposit still counts.
    attempts = outage(budget, clock, calls, max_attempts=4, gap=0.005)
    reserve = cfg.min_per_second * cfg.ttl
    assert attempts <= 1.2 * calls + reserve
    assert attempts >= 1.2 * calls  # the budget is actually spent, not starved


def test_long_outage_keeps_about_ratio_of_extra_load() -> None:
    clock = FakeClock()
    cfg = RetryBudgetConfig(ratio=0.2, min_per_second=1, ttl=10)
    budget = RetryBudget(cfg, clock=clock)
    calls = 10_000  # 100 s at 100 calls/s: ten ttl windows
    attempts = outage(budget, clock, calls, max_attempts=5, gap=0.01)
    assert attempts <= calls * 1.2 + cfg.min_per_second * 100
    assert attempts / calls == pytest.approx(1.2, abs=0.03)


def test_reserve_lets_a_quiet_client_retry() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetConfig(ratio=0.0, min_per_second=0.5, ttl=10), clock=clock)
    assert [budget.try_withdraw() for _ in range(6)] == [True] * 5 + [False]


def test_withdrawals_expire_after_ttl() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetConfig(ratio=0.0, min_per_second=0.2, ttl=10), clock=clock)
    assert budget.try_withdraw() and budget.try_withdraw()
    assert not budget.try_withdraw()
    clock.advance(10.5)
    assert budget.try_withdraw()


def test_deposits_expire_after_ttl() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetConfig(ratio=0.5, min_per_second=0, ttl=10), clock=clock)
    for _ in range(10):
        budget.record_call()
    assert budget.balance() == pytest.approx(5.0)
    clock.advance(11)
    assert budget.balance() == pytest.approx(0.0)
    assert not budget.try_withdraw()


def test_exhaustion_emits_an_event() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetConfig(ratio=0, min_per_second=0), name="t:1", clock=clock)
    events: list[Event] = []
    budget.add_listener(events.append)
    assert not budget.try_withdraw()
    assert [(e.kind, e.source, e.name) for e in events] == [
        ("budget_exhausted", "retry_budget", "t:1")
    ]


def test_default_retry_policy_has_the_finagle_budget() -> None:
    assert RetryPolicy().budget == RetryBudgetConfig(ratio=0.2, min_per_second=10.0, ttl=10.0)
