"""The circuit breaker state machine, at Resilience4j's level of detail, on a fake clock."""

from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkit.resilience.breaker import (
    BreakerState,
    CircuitBreaker,
    CircuitBreakerConfig,
    WindowType,
)
from meshkit.resilience.clock import FakeClock
from meshkit.resilience.events import Event

pytestmark = pytest.mark.unit

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make(clock: FakeClock | None = None, **kw: object) -> tuple[CircuitBreaker, FakeClock]:
    clock = clock or FakeClock()
    base: dict[str, object] = {
        "window_size": 10,
        "minimum_calls": 10,
        "failure_rate_threshold": 0.5,
        "open_duration": 30.0,
        "half_open_calls": 3,
        "slow_call_duration": 1.0,
    }
    base.update(kw)
    return CircuitBreaker(CircuitBreakerConfig(**base), name="b", clock=clock), clock  # type: ignore[arg-type]


def call(b: CircuitBreaker, code: str = "OK", duration: float = 0.01) -> bool:
    """One guarded call: returns whether it was permitted."""
    if not b.try_acquire():
        return False
    b.on_result(duration, code)
    return True


def fill(b: CircuitBreaker, ok: int, failed: int, code: str = "UNAVAILABLE") -> None:
    for _ in range(ok):
        assert call(b, "OK")
    for _ in range(failed):
        assert call(b, code)


# -- count window, thresholds, minimum calls -----------------------------------------------


def test_starts_closed_and_permits() -> None:
    b, _ = make()
    assert b.state is CLOSED
    assert b.try_acquire()
    m = b.metrics
    assert (m.calls, m.failure_rate) == (0, None)


def test_opens_exactly_at_the_failure_threshold() -> None:
    b, _ = make()
    fill(b, ok=5, failed=4)
    assert b.state is CLOSED  # 9 calls: below minimum_calls
    assert call(b, "UNAVAILABLE")  # 10th call: 5/10 = 0.5 >= 0.5
    assert b.state is OPEN


def test_stays_closed_just_below_the_threshold() -> None:
    b, _ = make()
    fill(b, ok=6, failed=4)
    assert b.state is CLOSED
    assert b.metrics.failure_rate == pytest.approx(0.4)


def test_minimum_calls_holds_the_decision() -> None:
    b, _ = make(minimum_calls=5, window_size=10)
    fill(b, ok=0, failed=4)
    assert b.state is CLOSED
    assert b.metrics.failure_rate is None
    call(b, "UNAVAILABLE")
    assert b.state is OPEN


def test_minimum_calls_is_capped_by_a_count_window() -> None:
    b, _ = make(minimum_calls=100, window_size=4)
    assert b.config.effective_minimum_calls == 4
    fill(b, ok=2, failed=2)
    assert b.state is OPEN


def test_count_window_slides_old_outcomes_out() -> None:
    b, _ = make(window_size=4, minimum_calls=4, failure_rate_threshold=0.75)
    fill(b, ok=0, failed=2)
    fill(b, ok=2, failed=0)  # [F F S S] = 0.5
    assert b.state is CLOSED
    fill(b, ok=2, failed=0)  # the failures slide out: [S S S S]
    assert b.metrics.failed_calls == 0
    fill(b, ok=0, failed=2)  # [S S F F]
    assert b.state is CLOSED
    call(b, "UNAVAILABLE")  # [S F F F] = 0.75
    assert b.state is OPEN


def test_caller_errors_count_as_successes() -> None:
    b, _ = make()
    for code in ["INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "ALREADY_EXISTS"] * 5:
        assert call(b, code)
    assert b.state is CLOSED
    assert b.metrics.failed_calls == 0
    assert b.metrics.failure_rate == 0.0


@pytest.mark.parametrize("code", ["UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"])
def test_default_failure_codes_count(code: str) -> None:
    b, _ = make(minimum_calls=2, window_size=2)
    fill(b, ok=0, failed=2, code=code)
    assert b.state is OPEN


def test_custom_failure_codes() -> None:
    b, _ = make(
        minimum_calls=2,
        window_size=2,
        failure_rate_threshold=1.0,
        failure_codes=frozenset({"RESOURCE_EXHAUSTED"}),
    )
    fill(b, ok=0, failed=2, code="UNAVAILABLE")
    assert b.state is CLOSED
    fill(b, ok=0, failed=2, code="RESOURCE_EXHAUSTED")
    assert b.state is OPEN


# -- slow calls ----------------------------------------------------------------------------


def test_slow_calls_open_at_their_threshold() -> None:
    b, _ = make(slow_call_rate_threshold=0.5, failure_rate_threshold=1.0)
    for _ in range(5):
        call(b, "OK", duration=0.5)
    for _ in range(4):
        call(b, "OK", duration=1.0)  # exactly slow_call_duration: slow
    assert b.state is CLOSED
    assert b.metrics.slow_calls == 4
    call(b, "OK", duration=2.0)
    assert b.state is OPEN
    assert b.metrics.state is OPEN


def test_slow_calls_below_threshold_do_not_open() -> None:
    b, _ = make(slow_call_rate_threshold=0.8)
    for _ in range(7):
        call(b, "OK", duration=5.0)
    for _ in range(3):
        call(b, "OK", duration=0.1)
    assert b.state is CLOSED
    assert b.metrics.slow_call_rate == pytest.approx(0.7)


# -- open, half-open ---------------------------------------------------------------------


def open_breaker(b: CircuitBreaker) -> None:
    fill(b, ok=0, failed=10)
    assert b.state is OPEN


def test_open_rejects_and_reports_remaining_time() -> None:
    b, clock = make()
    open_breaker(b)
    assert not b.try_acquire()
    assert b.remaining_open_time() == pytest.approx(30.0)
    clock.advance(10)
    assert not b.try_acquire()
    assert b.remaining_open_time() == pytest.approx(20.0)
    assert b.metrics.not_permitted_calls == 2


def test_open_turns_half_open_after_open_duration() -> None:
    b, clock = make()
    open_breaker(b)
    clock.advance(29.999)
    assert b.state is OPEN
    clock.advance(0.001)
    assert b.state is HALF_OPEN
    assert b.remaining_open_time() == 0.0


def test_without_automatic_transition_only_a_call_moves_to_half_open() -> None:
    b, clock = make(automatic_transition=False)
    open_breaker(b)
    clock.advance(31)
    assert b.state is OPEN
    assert b.try_acquire()
    assert b.state is HALF_OPEN


def test_half_open_permits_exactly_half_open_calls() -> None:
    b, clock = make(half_open_calls=3)
    open_breaker(b)
    clock.advance(30)
    assert [b.try_acquire() for _ in range(5)] == [True, True, True, False, False]


def test_half_open_closes_when_all_probes_succeed() -> None:
    b, clock = make(half_open_calls=3)
    open_breaker(b)
    clock.advance(30)
    for _ in range(3):
        assert b.try_acquire()
    b.on_result(0.01, "OK")
    b.on_result(0.01, "OK")
    assert b.state is HALF_OPEN  # decides only when all have reported
    b.on_result(0.01, "OK")
    assert b.state is CLOSED
    assert b.metrics.calls == 0  # a fresh window


def test_half_open_reopens_on_a_failing_probe() -> None:
    b, clock = make(half_open_calls=3)
    open_breaker(b)
    clock.advance(30)
    assert b.try_acquire()
    assert b.try_acquire()
    b.on_result(0.01, "OK")
    b.on_result(0.01, "UNAVAILABLE")
    assert b.state is OPEN
    assert not b.try_acquire()


def test_half_open_reopens_when_probes_are_slow() -> None:
    b, clock = make(half_open_calls=2, slow_call_rate_threshold=1.0)
    open_breaker(b)
    clock.advance(30)
    assert b.try_acquire() and b.try_acquire()
    b.on_result(5.0, "OK")
    b.on_result(5.0, "OK")
    assert b.state is OPEN


def test_half_open_caller_error_probe_counts_as_success() -> None:
    b, clock = make(half_open_calls=1)
    open_breaker(b)
    clock.advance(30)
    assert b.try_acquire()
    b.on_result(0.01, "INVALID_ARGUMENT")
    assert b.state is CLOSED


def test_release_frees_a_probe_slot() -> None:
    b, clock = make(half_open_calls=1)
    open_breaker(b)
    clock.advance(30)
    assert b.try_acquire()
    assert not b.try_acquire()
    b.release()  # the probe was cancelled: no verdict
    assert b.state is HALF_OPEN
    assert b.try_acquire()
    b.on_result(0.01, "OK")
    assert b.state is CLOSED


def test_release_in_closed_is_harmless() -> None:
    b, _ = make()
    assert b.try_acquire()
    b.release()
    assert b.state is CLOSED
    assert b.metrics.calls == 0


def test_late_results_while_open_are_ignored() -> None:
    b, clock = make()
    permits = [b.try_acquire() for _ in range(3)]
    assert all(permits)
    open_breaker(b)
    for _ in range(3):
        b.on_result(0.01, "OK")  # calls admitted while CLOSED end while OPEN
    assert b.state is OPEN
    clock.advance(30)
    assert b.state is HALF_OPEN
    assert b.metrics.calls == 0  # nothing leaked into the half-open probe count


# -- growing open duration --------------------------------------------------------------------


def test_open_duration_grows_per_consecutive_open_and_is_capped() -> None:
    b, clock = make(
        half_open_calls=1, open_duration=10.0, open_duration_multiplier=2.0, max_open_duration=35.0
    )
    open_breaker(b)
    assert b.remaining_open_time() == pytest.approx(10.0)
    expected = [20.0, 35.0, 35.0]
    for want in expected:
        clock.advance(b.remaining_open_time())
        assert b.try_acquire()
        b.on_result(0.01, "UNAVAILABLE")
        assert b.state is OPEN
        assert b.remaining_open_time() == pytest.approx(want)
    assert b.metrics.consecutive_opens == 4
    # Recovery resets the growth.
    clock.advance(35)
    assert b.try_acquire()
    b.on_result(0.01, "OK")
    assert b.state is CLOSED
    open_breaker(b)
    assert b.remaining_open_time() == pytest.approx(10.0)


def test_constant_open_duration_by_default() -> None:
    b, clock = make(half_open_calls=1)
    open_breaker(b)
    clock.advance(30)
    assert b.try_acquire()
    b.on_result(0.01, "UNAVAILABLE")
    assert b.remaining_open_time() == pytest.approx(30.0)


# -- time window --------------------------------------------------------------------------


def test_time_window_counts_the_last_seconds_only() -> None:
    clock = FakeClock(start=100.0)
    b, _ = make(clock, window_type=WindowType.TIME, window_size=10, minimum_calls=4)
    fill(b, ok=0, failed=3)
    clock.advance(10)  # those failures age out entirely
    assert b.metrics.calls == 0
    fill(b, ok=3, failed=0)
    call(b, "UNAVAILABLE")
    assert b.state is CLOSED  # 1/4 failed
    assert b.metrics.failure_rate == pytest.approx(0.25)


def test_time_window_rolls_bucket_by_bucket() -> None:
    clock = FakeClock(start=100.0)
    b, _ = make(clock, window_type=WindowType.TIME, window_size=3, minimum_calls=100)
    fill(b, ok=1, failed=1)  # second 100
    clock.advance(1)
    fill(b, ok=1, failed=0)  # second 101
    clock.advance(1)
    fill(b, ok=0, failed=1)  # second 102
    assert (b.metrics.calls, b.metrics.failed_calls) == (4, 2)
    clock.advance(1)  # second 103: second 100's bucket is gone
    assert (b.metrics.calls, b.metrics.failed_calls) == (2, 1)
    clock.advance(1)
    assert (b.metrics.calls, b.metrics.failed_calls) == (1, 1)
    clock.advance(100)  # a long gap clears everything, without walking 100 buckets
    assert b.metrics.calls == 0


def test_time_window_opens_on_rate_over_the_window() -> None:
    clock = FakeClock(start=0.0)
    b, _ = make(clock, window_type=WindowType.TIME, window_size=5, minimum_calls=6)
    for _ in range(3):
        fill(b, ok=1, failed=1)
        clock.advance(1)
    assert b.state is OPEN


# -- forced states and administration ------------------------------------------------------


def test_forced_open_rejects_until_reset() -> None:
    b, clock = make()
    b.transition_to_forced_open()
    assert b.state is BreakerState.FORCED_OPEN
    clock.advance(3600)
    assert not b.try_acquire()
    assert b.state is BreakerState.FORCED_OPEN
    assert b.remaining_open_time() == 0.0
    b.reset()
    assert b.state is CLOSED
    assert b.try_acquire()


def test_disabled_permits_everything_and_records_nothing() -> None:
    b, _ = make()
    b.disable()
    fill(b, ok=0, failed=50)
    assert b.state is BreakerState.DISABLED
    assert b.metrics.calls == 0
    b.reset()
    assert b.state is CLOSED


def test_reset_clears_metrics() -> None:
    b, _ = make()
    fill(b, ok=3, failed=3)
    b.reset()
    assert b.metrics.calls == 0
    assert b.state is CLOSED


def test_explicit_transitions() -> None:
    b, _ = make()
    b.transition_to_open()
    assert b.state is OPEN
    b.transition_to_half_open()
    assert b.state is HALF_OPEN
    b.transition_to_closed()
    assert b.state is CLOSED


# -- events -------------------------------------------------------------------------------------


def test_listeners_see_every_transition_in_order() -> None:
    b, clock = make(half_open_calls=1)
    events: list[Event] = []
    b.add_listener(events.append)
    open_breaker(b)
    assert not b.try_acquire()
    clock.advance(30)
    assert b.try_acquire()
    b.on_result(0.01, "OK")
    transitions = [(e.from_state, e.to_state) for e in events if e.kind == "state_transition"]
    assert transitions == [("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "CLOSED")]
    first = events[0]
    assert (first.name, first.source, first.at) == ("b", "circuit_breaker", 1000.0)
    rejected = [e for e in events if e.kind == "not_permitted"]
    assert len(rejected) == 1


def test_a_failing_listener_does_not_break_the_breaker() -> None:
    b, _ = make()
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    b.add_listener(broken)
    b.add_listener(seen.append)
    open_breaker(b)
    assert [e.to_state for e in seen] == ["OPEN"]
    b.remove_listener(seen.append)


def test_remove_listener() -> None:
    b, _ = make()
    seen: list[Event] = []
    b.add_listener(seen.append)
    b.remove_listener(seen.append)
    open_breaker(b)
    assert seen == []


# -- concurrency ---------------------------------------------------------------------------------


def test_half_open_admits_no_herd_under_threads() -> None:
    b, clock = make(half_open_calls=5)
    open_breaker(b)
    clock.advance(30)
    admitted = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def worker() -> None:
        start.wait()
        for _ in range(50):
            if b.try_acquire():
                with lock:
                    admitted.append(1)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 5


def test_concurrent_outcomes_keep_counts_consistent() -> None:
    b, _ = make(window_size=100_000, minimum_calls=100_000)

    def worker() -> None:
        for i in range(500):
            assert b.try_acquire()
            b.on_result(0.01, "UNAVAILABLE" if i % 2 else "OK")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m = b.metrics
    assert (m.calls, m.failed_calls) == (4000, 2000)


# -- windows against a naive model (property tests) ----------------------------------------------

outcomes = st.tuples(st.booleans(), st.booleans())  # (failed, slow)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.lists(outcomes, max_size=60))
def test_count_window_matches_a_naive_model(size: int, seq: list[tuple[bool, bool]]) -> None:
    # Thresholds of 1.0 open only on an all-failed (or all-slow) window; the model is
    # compared while the breaker stays CLOSED.
    b, _ = make(
        window_size=size,
        minimum_calls=size,
        failure_rate_threshold=1.0,
        slow_call_rate_threshold=1.0,
    )
    history: list[tuple[bool, bool]] = []
    for failed, slow in seq:
        if b.state is not CLOSED:
            break
        assert b.try_acquire()
        b.on_result(5.0 if slow else 0.0, "UNAVAILABLE" if failed else "OK")
        history.append((failed, slow))
        if b.state is CLOSED:
            last = history[-size:]
            m = b.metrics
            assert m.calls == len(last)
            assert m.failed_calls == sum(f for f, _ in last)
            assert m.slow_calls == sum(s for _, s in last)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 8),
    st.lists(st.tuples(st.floats(0, 3.0), st.booleans()), max_size=60),
)
def test_time_window_matches_a_naive_model(size: int, seq: list[tuple[float, bool]]) -> None:
    clock = FakeClock(start=0.0)
    b, _ = make(
        clock,
        window_type=WindowType.TIME,
        window_size=size,
        minimum_calls=10_000,  # never decide: only the window is under test
    )
    history: list[tuple[float, bool]] = []
    for gap, failed in seq:
        clock.advance(gap)
        assert b.try_acquire()
        b.on_result(0.0, "UNAVAILABLE" if failed else "OK")
        history.append((clock.now(), failed))
        now_second = math.floor(clock.now())
        live = [f for t, f in history if now_second - math.floor(t) < size]
        m = b.metrics
        assert (m.calls, m.failed_calls) == (len(live), sum(live))


def test_threshold_boundary_is_exact_for_inexact_floats() -> None:
    # 0.3 * 10 is 3.0000000000000004 in floating point; 3 failures of 10 still open.
    b, _ = make(failure_rate_threshold=0.3)
    fill(b, ok=7, failed=3)
    assert b.state is OPEN
