"""Retry policy: backoff bounds for every jitter (property tests) and retryable codes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkit.resilience.retry import Jitter, RetryPolicy

pytestmark = pytest.mark.unit

backoffs = st.floats(min_value=0.001, max_value=5.0)
multipliers = st.floats(min_value=1.0, max_value=5.0)
indexes = st.integers(min_value=1, max_value=60)
seeds = st.integers(min_value=0, max_value=2**32)


def policy(jitter: Jitter, initial: float, cap_factor: float, mult: float) -> RetryPolicy:
    return RetryPolicy(
        initial_backoff=initial,
        max_backoff=initial * cap_factor,
        multiplier=mult,
        jitter=jitter,
    )


@settings(max_examples=200, deadline=None)
@given(backoffs, st.floats(1.0, 100.0), multipliers, indexes)
def test_none_is_the_capped_exponential(initial: float, cap: float, mult: float, n: int) -> None:
    p = policy(Jitter.NONE, initial, cap, mult)
    expected = min(p.max_backoff, initial * mult ** (n - 1))
    assert p.backoff(n) == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(backoffs, st.floats(1.0, 100.0), multipliers, indexes, seeds)
def test_full_jitter_within_zero_and_b(
    initial: float, cap: float, mult: float, n: int, seed: int
) -> None:
    p = policy(Jitter.FULL, initial, cap, mult)
    d = p.backoff(n, rng=random.Random(seed))
    assert 0.0 <= d <= p.base_backoff(n) <= p.max_backoff


@settings(max_examples=200, deadline=None)
@given(backoffs, st.floats(1.0, 100.0), multipliers, indexes, seeds)
def test_equal_jitter_within_half_b_and_b(
    initial: float, cap: float, mult: float, n: int, seed: int
) -> None:
    p = policy(Jitter.EQUAL, initial, cap, mult)
    b = p.base_backoff(n)
    d = p.backoff(n, rng=random.Random(seed))
    assert b / 2 - 1e-12 <= d <= b + 1e-12


@settings(max_examples=200, deadline=None)
@given(backoffs, st.floats(1.0, 100.0), st.lists(seeds, min_size=1, max_size=20))
def test_decorrelated_jitter_chain_stays_in_bounds(
    initial: float, cap: float, seed_list: list[int]
) -> None:
    p = policy(Jitter.DECORRELATED, initial, cap, 2.0)
    prev: float | None = None
    for n, seed in enumerate(seed_list, start=1):
        d = p.backoff(n, prev, random.Random(seed))
        upper = min(p.max_backoff, 3 * (prev if prev else initial))
        assert initial - 1e-12 <= d <= max(initial, upper) + 1e-12
        assert d <= p.max_backoff_for(n) + 1e-12
        prev = d


def test_full_jitter_spreads_over_the_range() -> None:
    p = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, jitter=Jitter.FULL)
    rng = random.Random(7)
    samples = [p.backoff(1, rng=rng) for _ in range(2000)]
    assert min(samples) < 0.05
    assert max(samples) > 0.95


def test_exponential_growth_with_cap() -> None:
    p = RetryPolicy(initial_backoff=0.05, max_backoff=2.0, multiplier=2.0, jitter=Jitter.NONE)
    assert [p.backoff(n) for n in range(1, 8)] == pytest.approx(
        [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    )


def test_huge_retry_index_does_not_overflow() -> None:
    p = RetryPolicy(initial_backoff=0.05, max_backoff=2.0, multiplier=10.0, jitter=Jitter.NONE)
    assert p.backoff(10_000) == 2.0
    assert RetryPolicy(jitter=Jitter.DECORRELATED).max_backoff_for(10_000) == 1.0


def test_retryable_codes() -> None:
    p = RetryPolicy(retryable_codes=frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"}))
    assert p.is_retryable("UNAVAILABLE")
    assert p.is_retryable("RESOURCE_EXHAUSTED")
    assert not p.is_retryable("INVALID_ARGUMENT")
    assert not p.is_retryable("DEADLINE_EXCEEDED")


def test_per_attempt_timeout_makes_its_deadline_retryable() -> None:
    without = RetryPolicy()
    with_timeout = RetryPolicy(per_attempt_timeout=0.3)
    assert not without.is_retryable("DEADLINE_EXCEEDED", per_attempt_timeout_hit=True)
    assert with_timeout.is_retryable("DEADLINE_EXCEEDED", per_attempt_timeout_hit=True)
    assert not with_timeout.is_retryable("DEADLINE_EXCEEDED")


def test_worst_case() -> None:
    p = RetryPolicy(
        max_attempts=4,
        initial_backoff=0.05,
        max_backoff=2.0,
        multiplier=2.0,
        per_attempt_timeout=0.3,
    )
    # 4 x 300ms + (50 + 100 + 200)ms of backoff.
    assert p.worst_case() == pytest.approx(1.55)
    assert RetryPolicy().worst_case() is None


def test_hedging_fatal_codes() -> None:
    from meshkit.resilience.hedging import HedgingPolicy

    h = HedgingPolicy(max_attempts=3, delay=0.1, non_fatal_codes=frozenset({"UNAVAILABLE"}))
    assert h.is_fatal("OK")
    assert h.is_fatal("INVALID_ARGUMENT")
    assert not h.is_fatal("UNAVAILABLE")
