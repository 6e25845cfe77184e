"""Token buckets: burst, refill, wait hints; keyed limiter bounded by LRU."""

from __future__ import annotations

import math

import pytest

from meshkit.resilience.clock import FakeClock
from meshkit.resilience.events import Event
from meshkit.resilience.ratelimit import KeyedRateLimiter, RateLimitConfig, TokenBucket

pytestmark = pytest.mark.unit


def test_bucket_starts_full_and_allows_a_burst() -> None:
    clock = FakeClock()
    b = TokenBucket(rate_per_second=10, burst=5, clock=clock)
    assert [b.try_acquire() for _ in range(5)] == [0.0] * 5
    wait = b.try_acquire()
    assert wait == pytest.approx(0.1)  # one token at 10/s


def test_refill_is_proportional_to_elapsed_time_and_capped() -> None:
    clock = FakeClock()
    b = TokenBucket(rate_per_second=10, burst=5, clock=clock)
    for _ in range(5):
        b.try_acquire()
    clock.advance(0.25)
    assert b.tokens == pytest.approx(2.5)
    assert b.try_acquire() == 0.0
    assert b.try_acquire() == 0.0
    assert b.try_acquire() == pytest.approx(0.05)  # 0.5 token left: half a token to go
    clock.advance(100)
    assert b.tokens == pytest.approx(5.0)


def test_wait_hint_is_exact_and_then_allowed() -> None:
    clock = FakeClock()
    b = TokenBucket(rate_per_second=2, burst=1, clock=clock)
    assert b.try_acquire() == 0.0
    wait = b.try_acquire()
    assert wait == pytest.approx(0.5)
    clock.advance(wait)
    assert b.try_acquire() == 0.0


def test_a_refused_call_takes_no_tokens() -> None:
    clock = FakeClock()
    b = TokenBucket(rate_per_second=1, burst=1, clock=clock)
    b.try_acquire()
    for _ in range(10):
        assert b.try_acquire() > 0
    clock.advance(1.0)
    assert b.try_acquire() == 0.0


def test_more_than_burst_can_never_be_served() -> None:
    b = TokenBucket(rate_per_second=100, burst=3, clock=FakeClock())
    assert b.try_acquire(4) == math.inf
    assert b.try_acquire(3) == 0.0


def test_config_rate_per_period() -> None:
    cfg = RateLimitConfig(rate=30, per=60.0, burst=1)
    assert cfg.tokens_per_second == pytest.approx(0.5)
    clock = FakeClock()
    lim = KeyedRateLimiter(cfg, clock=clock)
    assert lim.try_acquire("k") == 0.0
    assert lim.try_acquire("k") == pytest.approx(2.0)


def test_keys_have_separate_buckets() -> None:
    clock = FakeClock()
    lim = KeyedRateLimiter(RateLimitConfig(rate=1, burst=1), name="rl", clock=clock)
    events: list[Event] = []
    lim.add_listener(events.append)
    assert lim.try_acquire("alice") == 0.0
    assert lim.try_acquire("bob") == 0.0
    assert lim.try_acquire("alice") > 0
    assert lim.rejected == 1
    assert [(e.kind, e.source, e.name) for e in events] == [("rejected", "rate_limit", "rl")]
    assert events[0].value == pytest.approx(1.0)


def test_keyed_limiter_is_bounded_lru() -> None:
    clock = FakeClock()
    lim = KeyedRateLimiter(RateLimitConfig(rate=1, burst=1, max_keys=3), clock=clock)
    for key in ("a", "b", "c"):
        lim.try_acquire(key)
    lim.try_acquire("a")  # refused, but makes "a" recently used
    lim.try_acquire("d")  # evicts "b", the least recently used
    assert len(lim) == 3
    assert lim.try_acquire("a") > 0  # still remembered: still empty
    assert lim.try_acquire("b") == 0.0  # forgotten: comes back full


def test_metadata_key() -> None:
    assert RateLimitConfig(key="metadata:x-api-key").metadata_key == "x-api-key"
    assert RateLimitConfig(key="peer").metadata_key is None


def test_rate_limit_defaults_to_server_side() -> None:
    cfg = RateLimitConfig()
    assert cfg.applies_to("server")
    assert not cfg.applies_to("client")
