"""The ResilienceRegistry: instances by (name, config), bounded, listened to; and how a
Policy built over it keeps state across a reload that changed the document (#16)."""

from __future__ import annotations

from typing import Any

import pytest

from meshkit.config import Policy, carry_policy
from meshkit.resilience import ResilienceRegistry
from meshkit.resilience.adaptive import AdaptiveLimitConfig
from meshkit.resilience.breaker import CircuitBreakerConfig
from meshkit.resilience.budget import RetryBudgetConfig
from meshkit.resilience.bulkhead import BulkheadConfig
from meshkit.resilience.clock import FakeClock
from meshkit.resilience.events import Event
from meshkit.resilience.ratelimit import RateLimitConfig
from meshkit.resilience.registry import MAX_INSTANCES

pytestmark = pytest.mark.unit

TRIP = CircuitBreakerConfig(minimum_calls=1, window_size=1)


def trip(breaker: Any) -> None:
    assert breaker.try_acquire()
    breaker.on_result(0.0, "UNAVAILABLE")
    assert str(breaker.state) == "OPEN"


def test_same_name_and_config_is_the_same_instance_for_every_kind() -> None:
    r = ResilienceRegistry()
    assert r.breaker("h:1", TRIP) is r.breaker(
        "h:1", CircuitBreakerConfig(minimum_calls=1, window_size=1)
    )
    assert r.retry_budget("h:1", RetryBudgetConfig()) is r.retry_budget("h:1", RetryBudgetConfig())
    bh = BulkheadConfig(max_concurrent=3)
    assert r.bulkhead("k", bh) is r.bulkhead("k", BulkheadConfig(max_concurrent=3))
    rl = RateLimitConfig(rate=5)
    assert r.rate_limiter("k", rl) is r.rate_limiter("k", RateLimitConfig(rate=5))
    al = AdaptiveLimitConfig()
    assert r.adaptive_limiter("k", al) is r.adaptive_limiter("k", AdaptiveLimitConfig())
    assert r.last_good_cache() is r.last_good_cache()


def test_a_different_config_is_a_different_instance_and_the_snapshot_shows_the_newest() -> None:
    r = ResilienceRegistry()
    old = r.breaker("h:1", TRIP)
    new = r.breaker("h:1", CircuitBreakerConfig(minimum_calls=2, window_size=2))
    assert new is not old
    assert r.breaker("h:1", TRIP) is old  # the old one is still there for its config
    assert r.breakers() == {"h:1": new}
    b1 = r.retry_budget("t", RetryBudgetConfig(ratio=0.1))
    b2 = r.retry_budget("t", RetryBudgetConfig(ratio=0.2))
    assert b1 is not b2 and r.retry_budgets() == {"t": b2}
    assert r.bulkhead("k", BulkheadConfig(max_concurrent=1)) is not r.bulkhead(
        "k", BulkheadConfig(max_concurrent=2)
    )


def test_each_kind_is_bounded_oldest_first() -> None:
    r = ResilienceRegistry(limit=3)
    cfg = BulkheadConfig(max_concurrent=1)
    first = r.bulkhead("k0", cfg)
    for i in range(1, 10):
        r.bulkhead(f"k{i}", cfg)
    assert list(r.bulkheads()) == ["k7", "k8", "k9"]
    assert r.bulkhead("k0", cfg) is not first  # dropped, so made again
    assert r.breakers() == {}  # the bound is per kind
    assert MAX_INSTANCES >= 1000


def test_listeners_reach_instances_made_before_and_after() -> None:
    r = ResilienceRegistry()
    events: list[Event] = []
    before = r.breaker("before", TRIP)
    r.add_listener(events.append)
    after = r.breaker("after", TRIP)
    limiter = r.bulkhead("b", BulkheadConfig(max_concurrent=1))
    trip(before)
    trip(after)
    assert limiter.try_acquire() and not limiter.try_acquire()
    assert [(e.source, e.name, e.kind) for e in events] == [
        ("circuit_breaker", "before", "state_transition"),
        ("circuit_breaker", "after", "state_transition"),
        ("bulkhead", "b", "rejected"),
    ]


def test_the_clock_drives_every_instance() -> None:
    clock = FakeClock()
    r = ResilienceRegistry(clock=clock)
    breaker = r.breaker("h", CircuitBreakerConfig(minimum_calls=1, window_size=1, open_duration=5))
    trip(breaker)
    assert not breaker.try_acquire()
    clock.advance(5)
    assert breaker.try_acquire()  # HALF_OPEN: a probe


# -- Policy over a registry ----------------------------------------------------------------

DOC: dict[str, Any] = {
    "rules": [
        {
            "match": "shop.v1.PaymentService",
            "circuit_breaker": {"window": {"type": "count", "size": 1}, "minimum_calls": 1},
        },
        {"match": "shop.v1.OrderService", "timeout": "2s"},
    ]
}


def _breaker_of(p: Policy) -> Any:
    cb = p.for_method("/shop.v1.PaymentService/Charge").circuit_breaker
    assert cb is not None
    return p.registry.breaker("h:1", cb)


def test_a_policy_makes_its_own_registry_unless_given_one() -> None:
    assert Policy.from_dict(DOC).registry is not Policy.from_dict(DOC).registry
    shared = ResilienceRegistry()
    assert Policy.from_dict(DOC, registry=shared).registry is shared
    assert Policy.from_text("{}", registry=shared).registry is shared
    assert Policy(registry=shared).registry is shared


def test_reload_with_another_rule_changed_keeps_an_open_breaker() -> None:
    old = Policy.from_dict(DOC)
    breaker = _breaker_of(old)
    trip(breaker)
    changed = {"rules": [DOC["rules"][0], {"match": "shop.v1.OrderService", "timeout": "3s"}]}
    new = carry_policy(old, Policy.from_dict(changed))
    assert new is not None and new is not old
    assert new.registry is old.registry
    assert new.for_method("/shop.v1.OrderService/Get").timeout == 3.0
    assert _breaker_of(new) is breaker
    assert str(breaker.state) == "OPEN"


def test_reload_with_the_breaker_config_changed_starts_a_fresh_breaker() -> None:
    old = Policy.from_dict(DOC)
    trip(_breaker_of(old))
    rule = {**DOC["rules"][0], "circuit_breaker": {"minimum_calls": 5}}
    new = carry_policy(old, Policy.from_dict({"rules": [rule, DOC["rules"][1]]}))
    assert new is not None and new.registry is old.registry
    assert str(_breaker_of(new).state) == "CLOSED"
    # An unchanged document keeps the very Policy object.
    assert carry_policy(old, Policy.from_dict(DOC)) is old


def test_a_retry_budget_survives_a_reload_when_its_config_does() -> None:
    doc: dict[str, Any] = {"defaults": {"retry": {"budget": {"ratio": 0.5}}}}
    old = Policy.from_dict(doc)
    budget = old.retry_budget("h:1")
    assert budget is not None
    new = Policy.from_dict({**doc, "rules": [{"match": "a.S", "timeout": "1s"}]})
    assert new.with_registry(old.registry).retry_budget("h:1") is budget
    other = Policy.from_dict({"defaults": {"retry": {"budget": {"ratio": 0.1}}}})
    fresh = other.with_registry(old.registry).retry_budget("h:1")
    assert fresh is not None and fresh is not budget and fresh.config.ratio == 0.1


def test_with_registry_shares_the_compiled_document_and_logs_nothing_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = Policy.from_dict({"defaults": {"fallback": {"on": ["circuit_open"]}}}, "mesh.yaml")
    assert len(p.warnings) == 1
    r = ResilienceRegistry()
    caplog.clear()
    q = p.with_registry(r)
    assert caplog.records == []
    assert q.registry is r and p.registry is not r
    assert q.rules == p.rules and q.warnings == p.warnings and q.document is p.document
    assert q.source == "mesh.yaml"
    assert p.with_registry(p.registry) is p
