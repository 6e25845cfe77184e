"""Fault injection: percentages, and Envoy's x-envoy-fault-* headers when allowed."""

from __future__ import annotations

import random

import pytest

from meshkit.resilience.fault import FaultDecision, FaultPolicy

pytestmark = pytest.mark.unit


def rate(policy: FaultPolicy, n: int = 20_000) -> tuple[float, float]:
    rng = random.Random(42)
    decisions = [policy.decide(rng) for _ in range(n)]
    delayed = sum(d.delay > 0 for d in decisions) / n
    aborted = sum(d.abort_code is not None for d in decisions) / n
    return delayed, aborted


def test_no_fault_by_default() -> None:
    d = FaultPolicy().decide(random.Random(1))
    assert d.is_noop
    assert d == FaultDecision()


def test_percentages_are_honoured() -> None:
    p = FaultPolicy(delay_percent=10, delay=0.2, abort_percent=5, abort_code="UNAVAILABLE")
    delayed, aborted = rate(p)
    assert delayed == pytest.approx(0.10, abs=0.01)
    assert aborted == pytest.approx(0.05, abs=0.01)


def test_hundred_and_zero_percent() -> None:
    always = FaultPolicy(delay_percent=100, delay=0.2, abort_percent=100, abort_code="INTERNAL")
    d = always.decide(random.Random(3))
    assert (d.delay, d.abort_code) == (0.2, "INTERNAL")
    assert rate(FaultPolicy(delay_percent=0, delay=1, abort_percent=0)) == (0.0, 0.0)


def test_headers_are_ignored_unless_allowed() -> None:
    p = FaultPolicy()
    assert p.from_headers({"x-envoy-fault-abort-grpc-request": "14"}) is p


def test_headers_set_an_abort_with_a_grpc_code() -> None:
    p = FaultPolicy(allow_headers=True)
    q = p.from_headers([("x-envoy-fault-abort-grpc-request", "14")])
    assert (q.abort_code, q.abort_percent) == ("UNAVAILABLE", 100.0)
    assert q.decide(random.Random(0)).abort_code == "UNAVAILABLE"


def test_headers_set_a_delay_in_milliseconds_with_percentage() -> None:
    p = FaultPolicy(allow_headers=True)
    q = p.from_headers(
        {
            "x-envoy-fault-delay-request": "250",
            "x-envoy-fault-delay-request-percentage": "30",
        }
    )
    assert (q.delay, q.delay_percent) == (0.25, 30.0)
    delayed, aborted = rate(q)
    assert delayed == pytest.approx(0.30, abs=0.015)
    assert aborted == 0.0


def test_http_abort_header_wins_over_grpc_as_in_envoy() -> None:
    p = FaultPolicy(allow_headers=True)
    q = p.from_headers(
        {
            "x-envoy-fault-abort-request": "503",
            "x-envoy-fault-abort-grpc-request": "13",
            "x-envoy-fault-abort-request-percentage": "50",
        }
    )
    assert (q.abort_code, q.abort_percent) == ("UNAVAILABLE", 50.0)


def test_percentage_without_its_fault_header_does_nothing() -> None:
    p = FaultPolicy(allow_headers=True)
    q = p.from_headers({"x-envoy-fault-abort-request-percentage": "50"})
    assert q.abort_percent == 0.0
    assert q.decide(random.Random(0)).is_noop


@pytest.mark.parametrize(
    "headers",
    [
        {"x-envoy-fault-delay-request": "soon"},
        {"x-envoy-fault-delay-request": "-5"},
        {"x-envoy-fault-abort-grpc-request": "nan"},
        {"x-envoy-fault-abort-grpc-request": "0"},  # OK is no abort
        {"x-envoy-fault-abort-request": "99"},  # outside [200, 600)
    ],
)
def test_malformed_headers_inject_nothing(headers: dict[str, str]) -> None:
    p = FaultPolicy(allow_headers=True)
    assert p.from_headers(headers).decide(random.Random(0)).is_noop


def test_unknown_grpc_numbers_become_unknown_and_bytes_values_work() -> None:
    p = FaultPolicy(allow_headers=True)
    q = p.from_headers([("X-Envoy-Fault-Abort-Grpc-Request", b"99")])
    assert q.abort_code == "UNKNOWN"


def test_header_percentage_is_clamped() -> None:
    p = FaultPolicy(allow_headers=True)
    q = p.from_headers(
        {"x-envoy-fault-delay-request": "10", "x-envoy-fault-delay-request-percentage": "250"}
    )
    assert q.delay_percent == 100.0


def test_headers_override_only_their_fault() -> None:
    p = FaultPolicy(delay_percent=10, delay=1.0, allow_headers=True)
    q = p.from_headers({"x-envoy-fault-abort-grpc-request": "8"})
    assert (q.delay, q.delay_percent) == (1.0, 10)
    assert q.abort_code == "RESOURCE_EXHAUSTED"
