"""The client's attempt engine, driven step by step with a fake clock (no I/O, no sleeps)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from meshkit import Policy
from meshkit.grpc._engine import (
    FINISHED,
    Acquire,
    Attempts,
    Await,
    Fail,
    Finish,
    Send,
    Serve,
    Sleep,
)
from meshkit.grpc._plan import ClientPlan, compile_client
from meshkit.grpc._status import MESHKIT_ATTEMPTS_KEY, PREVIOUS_ATTEMPTS_KEY, PUSHBACK_KEY
from meshkit.resilience.clock import FakeClock
from meshkit.resilience.registry import ResilienceRegistry

pytestmark = pytest.mark.unit

M = "/pkg.Svc/M"
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
RETRY = {
    "max_attempts": 3,
    "initial_backoff": "100ms",
    "max_backoff": "100ms",
    "jitter": "none",
    "budget": None,
}


class SpyBreaker:
    """A breaker that permits what it is told to and records what it hears."""

    def __init__(self, permit: bool = True) -> None:
        self.permit = permit
        self.held = 0
        self.results: list[tuple[float, str]] = []

    def try_acquire(self) -> bool:
        if self.permit:
            self.held += 1
        return self.permit

    def release(self) -> None:
        self.held -= 1

    def on_result(self, duration: float, code: str) -> None:
        self.held -= 1
        self.results.append((round(duration, 6), code))

    def remaining_open_time(self) -> float:
        return 1.5


def make(
    rule: dict[str, Any],
    clock: FakeClock,
    *,
    timeout: float | None = 10.0,
    breaker: SpyBreaker | None = None,
    request_stream: bool = False,
    response_stream: bool = False,
    **options: Any,
) -> tuple[ClientPlan, Attempts]:
    policy = Policy.from_dict(
        {"defaults": {}, "rules": [{"match": "pkg.Svc", **rule}]},
        registry=ResilienceRegistry(clock=clock),
    )
    plan = compile_client(policy, M, "t", client_faults=False, client_rate_limits=False, **options)
    if breaker is not None:
        plan.breaker = breaker
        plan.breaker_name = "t"
    eng = Attempts(
        plan,
        timeout,
        (("k", "v"),),
        request_stream=request_stream,
        response_stream=response_stream,
        clock=clock.now,
    )
    return plan, eng


def trailers(ms: str) -> tuple[tuple[str, str], ...]:
    return ((PUSHBACK_KEY, ms),)


# -- retries -----------------------------------------------------------------------------


def test_a_healthy_call_is_one_attempt(fake_clock: FakeClock) -> None:
    spy = SpyBreaker()
    plan, eng = make({"retry": RETRY, "bulkhead": {"max_concurrent": 1}}, fake_clock, breaker=spy)
    assert eng.start() == Send(1, 10.0, None)
    assert plan.bulkhead.in_flight == 1
    fake_clock.advance(0.25)
    assert eng.outcome(OK) == Finish(1)
    assert spy.results == [(0.25, "OK")]
    assert spy.held == 0
    assert plan.bulkhead.in_flight == 0 and eng.closed


def test_retries_with_backoff_and_attempt_headers(fake_clock: FakeClock) -> None:
    spy = SpyBreaker()
    _, eng = make({"retry": RETRY}, fake_clock, breaker=spy)
    assert isinstance(eng.start(), Send)
    assert eng.outcome(UNAVAILABLE) == Sleep(0.1)
    fake_clock.advance(0.1)
    second = eng.resume()
    assert isinstance(second, Send) and second.attempt == 2
    assert second.timeout == pytest.approx(9.9)
    assert second.metadata == (
        ("k", "v"),
        (PREVIOUS_ATTEMPTS_KEY, "1"),
        (MESHKIT_ATTEMPTS_KEY, "1"),
    )
    assert eng.outcome(OK) == Finish(2)
    assert [code for _, code in spy.results] == ["UNAVAILABLE", "OK"]


def test_gives_up_after_max_attempts_and_on_a_fatal_code(fake_clock: FakeClock) -> None:
    _, eng = make({"retry": RETRY}, fake_clock)
    step = eng.start()
    for attempt in (1, 2):
        assert isinstance(step, Send) and step.attempt == attempt
        assert isinstance(eng.outcome(UNAVAILABLE), Sleep)
        step = eng.resume()
    assert eng.outcome(UNAVAILABLE) == Finish(3)
    _, eng = make({"retry": RETRY}, fake_clock)
    eng.start()
    assert eng.outcome(grpc.StatusCode.INVALID_ARGUMENT) == Finish(1)


def test_pushback_replaces_the_backoff_or_stops(fake_clock: FakeClock) -> None:
    _, eng = make({"retry": RETRY}, fake_clock)
    eng.start()
    assert eng.outcome(UNAVAILABLE, trailers("300")) == Sleep(0.3)
    _, eng = make({"retry": RETRY}, fake_clock)
    eng.start()
    assert eng.outcome(UNAVAILABLE, trailers("-1")) == Finish(1)


def test_no_backoff_past_the_deadline_and_no_attempt_after_it(fake_clock: FakeClock) -> None:
    _, eng = make({"retry": RETRY}, fake_clock, timeout=0.05)
    eng.start()
    assert eng.outcome(UNAVAILABLE) == Finish(1)  # the 100 ms backoff would end past it
    _, eng = make({"retry": RETRY}, fake_clock, timeout=0.5)
    eng.start()
    assert eng.outcome(UNAVAILABLE) == Sleep(0.1)
    fake_clock.advance(1.0)  # (a sleep that overran)
    assert eng.resume() == Finish(1)


def test_per_attempt_timeout_cuts_and_is_retried(fake_clock: FakeClock) -> None:
    _, eng = make({"retry": {**RETRY, "per_attempt_timeout": "1s"}}, fake_clock)
    assert eng.start() == Send(1, 1.0, None)
    fake_clock.advance(1.0)
    assert eng.outcome(grpc.StatusCode.DEADLINE_EXCEEDED) == Sleep(0.1)


def test_the_retry_budget_stops_retries(fake_clock: FakeClock) -> None:
    budget = {"ratio": 0.0, "min_per_second": 0.1, "ttl": "10s"}  # one reserve retry
    rule = {"retry": {**RETRY, "max_attempts": 5, "budget": budget}}
    _, eng = make(rule, fake_clock)
    eng.start()
    assert isinstance(eng.outcome(UNAVAILABLE), Sleep)
    eng.resume()
    assert eng.outcome(UNAVAILABLE) == Finish(2)


def test_the_breaker_refuses_the_first_attempt_or_a_retry(fake_clock: FakeClock) -> None:
    spy = SpyBreaker(permit=False)
    _, eng = make({"retry": RETRY}, fake_clock, breaker=spy)
    step = eng.start()
    assert isinstance(step, Fail) and step.code is UNAVAILABLE
    assert "circuit breaker 't' is open" in step.message and step.pushback == 1.5
    spy = SpyBreaker()
    _, eng = make({"retry": RETRY}, fake_clock, breaker=spy)
    eng.start()
    eng.outcome(UNAVAILABLE)
    spy.permit = False
    assert eng.resume() == Finish(1)  # the last failure stands
    assert spy.held == 0


def test_unsent_and_cancelled_attempts_give_their_permits_back(fake_clock: FakeClock) -> None:
    for end in ("unsent", "cancel"):
        spy = SpyBreaker()
        plan, eng = make(
            {"retry": RETRY, "bulkhead": {"max_concurrent": 1}}, fake_clock, breaker=spy
        )
        eng.start()
        getattr(eng, end)()
        assert spy.held == 0 and spy.results == []  # no verdict
        assert plan.bulkhead.in_flight == 0


# -- admission ---------------------------------------------------------------------------


def test_a_full_bulkhead_refuses_or_waits(fake_clock: FakeClock) -> None:
    plan, eng = make({"bulkhead": {"max_concurrent": 1}}, fake_clock)
    assert isinstance(eng.start(), Send)
    _, other = make({"bulkhead": {"max_concurrent": 1}}, fake_clock)
    other.plan = plan  # the same bulkhead
    step = other.start()
    assert isinstance(step, Fail) and step.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert step.pushback == 0.05
    other.close()  # no permit was taken: the first call's stays
    assert plan.bulkhead.in_flight == 1
    plan2, waiting = make({"bulkhead": {"max_concurrent": 1, "max_wait": "1s"}}, fake_clock)
    assert isinstance(waiting.start(), Send)
    _, second = make({"bulkhead": {"max_concurrent": 1, "max_wait": "1s"}}, fake_clock)
    second.plan = plan2
    assert second.start() == Acquire(10.0)
    assert isinstance(second.acquired(False), Fail)
    waiting.outcome(OK)
    _, third = make({"bulkhead": {"max_concurrent": 1, "max_wait": "1s"}}, fake_clock)
    third.plan = plan2
    assert plan2.bulkhead.acquire(0)  # what the adapter does for an Acquire
    assert isinstance(third.acquired(True), Send)
    third.outcome(OK)
    assert plan2.bulkhead.in_flight == 0  # the permit the adapter got went back


def test_rate_limit_refuses_with_pushback(fake_clock: FakeClock) -> None:
    rule = {"rate_limit": {"rate": 1, "per": "1s", "burst": 1, "side": "client"}}
    plan, eng = make(rule, fake_clock)
    assert isinstance(eng.start(), Send)
    _, second = make(rule, fake_clock)
    second.plan = plan
    step = second.start()
    assert isinstance(step, Fail) and step.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert step.pushback == pytest.approx(1.0)


def test_faults_delay_then_abort(fake_clock: FakeClock) -> None:
    rule = {
        "fault": {
            "delay": {"percent": 100, "duration": "200ms"},
            "abort": {"percent": 100, "code": "UNAVAILABLE"},
            "side": "client",
        }
    }
    _, eng = make(rule, fake_clock)
    assert eng.start() == Sleep(0.2)
    fake_clock.advance(0.2)
    assert eng.resume() == Fail(UNAVAILABLE, "fault injected: abort UNAVAILABLE")
    _, eng = make(rule, fake_clock, timeout=0.1)
    step = eng.start()
    assert isinstance(step, Sleep) and step.seconds == pytest.approx(0.1)  # never past it
    fake_clock.advance(0.1)
    step = eng.resume()
    assert isinstance(step, Fail) and step.code is grpc.StatusCode.DEADLINE_EXCEEDED


# -- fallbacks ---------------------------------------------------------------------------


def test_fallbacks_on_refusal_and_exhaustion_not_on_business_errors(fake_clock: FakeClock) -> None:
    fb = {"on": ["circuit_open", "retries_exhausted"], "kind": "cached"}
    _, eng = make({"fallback": fb}, fake_clock, breaker=SpyBreaker(permit=False))
    step = eng.start()
    assert isinstance(step, Serve) and (step.kind, step.trigger) == ("cached", "circuit_open")
    assert isinstance(step.otherwise, Fail)
    _, eng = make({"retry": RETRY, "fallback": fb}, fake_clock, timeout=0.05)
    eng.start()
    assert eng.outcome(UNAVAILABLE) == Serve("cached", "retries_exhausted", Finish(1))
    _, eng = make({"retry": RETRY, "fallback": fb}, fake_clock)
    eng.start()
    assert eng.outcome(grpc.StatusCode.NOT_FOUND) == Finish(1)
    # A client stream has no single request to key a cache on.
    _, eng = make({"fallback": fb}, fake_clock, breaker=SpyBreaker(False), request_stream=True)
    assert isinstance(eng.start(), Fail)


def test_a_spent_deadline_is_refused(fake_clock: FakeClock) -> None:
    from meshkit.errors import DeadlineExceededError

    _, eng = make({"fallback": {"on": ["deadline_exceeded"], "kind": "error"}}, fake_clock)
    step = eng.refuse(DeadlineExceededError("spent"))
    assert isinstance(step, Serve) and step.trigger == "deadline_exceeded"
    _, eng = make({}, fake_clock, timeout=0.0)
    step = eng.start()
    assert isinstance(step, Fail) and step.code is grpc.StatusCode.DEADLINE_EXCEEDED


# -- hedging -----------------------------------------------------------------------------

HEDGE = {"hedging": {"max_attempts": 3, "delay": "100ms"}, "retry": None}


def test_hedges_go_at_their_delay_and_the_first_ok_wins(fake_clock: FakeClock) -> None:
    spy = SpyBreaker()
    _, eng = make(HEDGE, fake_clock, breaker=spy)
    assert eng.hedging
    assert eng.start() == Send(1, 10.0, None)
    assert eng.tick() == Await(fake_clock.now() + 0.1)
    fake_clock.advance(0.1)
    second = eng.tick()
    assert isinstance(second, Send) and second.attempt == 2
    assert second.metadata is not None and (PREVIOUS_ATTEMPTS_KEY, "1") in second.metadata
    assert isinstance(eng.tick(), Await)
    assert eng.outcome(OK, attempt=2) == Finish(2)
    # The loser gets no verdict; its permit goes back.
    assert spy.held == 0 and [c for _, c in spy.results] == ["OK"]


def test_a_non_fatal_failure_hedges_at_once_and_all_failing_ends(fake_clock: FakeClock) -> None:
    _, eng = make(HEDGE, fake_clock)
    eng.start()
    second = eng.outcome(UNAVAILABLE, attempt=1)
    assert isinstance(second, Send) and second.attempt == 2
    third = eng.outcome(UNAVAILABLE, attempt=2)
    assert isinstance(third, Send) and third.attempt == 3
    assert eng.tick() == Await(fake_clock.now() + 10.0)  # no more hedges: the deadline
    assert eng.outcome(UNAVAILABLE, attempt=3) == Finish(3)
    _, eng = make(HEDGE, fake_clock)
    eng.start()
    assert eng.outcome(grpc.StatusCode.INTERNAL, attempt=1) == Finish(1)  # fatal: it wins


def test_hedging_ends_at_the_deadline(fake_clock: FakeClock) -> None:
    _, eng = make(HEDGE, fake_clock, timeout=0.05)
    eng.start()
    assert eng.tick() == Await(fake_clock.now() + 0.05)
    fake_clock.advance(0.05)
    step = eng.tick()
    assert isinstance(step, Fail) and step.message == "deadline exceeded while hedging"


def test_streams_are_never_hedged(fake_clock: FakeClock) -> None:
    _, eng = make(HEDGE, fake_clock, response_stream=True)
    assert not eng.hedging


# -- response streams --------------------------------------------------------------------


def test_a_stream_is_retried_until_committed(fake_clock: FakeClock) -> None:
    spy = SpyBreaker()
    plan, eng = make(
        {"retry": RETRY, "bulkhead": {"max_concurrent": 1}},
        fake_clock,
        breaker=spy,
        response_stream=True,
    )
    eng.start()
    assert eng.stream_outcome(UNAVAILABLE) == Sleep(0.1)
    second = eng.resume()
    assert isinstance(second, Send) and second.attempt == 2
    fake_clock.advance(0.02)
    eng.commit()  # the first message: the breaker hears OK, and no more retries
    assert spy.results[-1] == (0.02, "OK")
    assert eng.stream_outcome(UNAVAILABLE) == FINISHED
    assert plan.bulkhead.in_flight == 1  # a stream is closed by its adapter, when it ends
    eng.close()
    assert plan.bulkhead.in_flight == 0 and spy.held == 0


def test_a_stream_past_its_replay_buffer_is_not_retried(fake_clock: FakeClock) -> None:
    _, eng = make({"retry": RETRY}, fake_clock, response_stream=True, request_stream=True)
    eng.start()
    assert eng.stream_outcome(UNAVAILABLE, replayable=False) == FINISHED


def test_a_stream_attempt_never_gets_a_zero_timeout(fake_clock: FakeClock) -> None:
    _, eng = make(
        {"retry": {**RETRY, "per_attempt_timeout": "1s"}}, fake_clock, response_stream=True
    )
    step = eng.start()
    assert isinstance(step, Send) and step.timeout == 10.0  # no per-attempt cut on streams


def test_hedging_stops_when_the_budget_or_the_breaker_says_no(fake_clock: FakeClock) -> None:
    budget = {"ratio": 0.0, "min_per_second": 0.1, "ttl": "10s"}  # one reserve hedge
    rule = {"hedging": {"max_attempts": 3, "delay": "100ms"}, "retry": {**RETRY, "budget": budget}}
    _, eng = make(rule, fake_clock)
    eng.start()
    fake_clock.advance(0.1)
    assert isinstance(eng.tick(), Send)  # the reserve
    fake_clock.advance(0.1)
    assert eng.tick() == Await(fake_clock.now() + 9.8)  # spent: wait for those in flight
    assert isinstance(eng.outcome(UNAVAILABLE, attempt=1), Await)
    assert eng.outcome(UNAVAILABLE, attempt=2) == Finish(2)
    spy = SpyBreaker()
    _, eng = make(HEDGE, fake_clock, breaker=spy)
    eng.start()
    spy.permit = False
    fake_clock.advance(0.1)
    assert isinstance(eng.tick(), Await)  # no hedge while the breaker is open
    assert eng.outcome(OK, attempt=1) == Finish(1)
    assert spy.held == 0


def test_a_stream_retry_the_breaker_refuses_ends_with_the_last_error(fake_clock: FakeClock) -> None:
    spy = SpyBreaker()
    _, eng = make({"retry": RETRY}, fake_clock, breaker=spy, response_stream=True)
    eng.start()
    assert isinstance(eng.stream_outcome(UNAVAILABLE), Sleep)
    spy.permit = False
    assert eng.resume() == Finish(1)
    eng.close()
    assert spy.held == 0


def test_a_bulkhead_wait_without_a_deadline_is_unbounded(fake_clock: FakeClock) -> None:
    rule = {"bulkhead": {"max_concurrent": 1, "max_wait": "1s"}}
    plan, first = make(rule, fake_clock, timeout=None)
    assert first.start() == Send(1, None, None)
    _, second = make(rule, fake_clock, timeout=None)
    second.plan = plan
    assert second.start() == Acquire(None)
