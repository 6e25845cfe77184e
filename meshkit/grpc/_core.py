"""Decisions shared by the sync and asyncio adapters (the adapters own the waiting)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import grpc

from meshkit.errors import (
    BulkheadFullError,
    CallRejectedError,
    CircuitOpenError,
    MeshkitError,
    RateLimitedError,
)
from meshkit.grpc._plan import ClientPlan
from meshkit.grpc._status import MESHKIT_ATTEMPTS_KEY, PREVIOUS_ATTEMPTS_KEY, STOP, parse_pushback
from meshkit.telemetry import Metrics, span_event

__all__ = [
    "add_attempt_header",
    "breaker_rejection",
    "bulkhead_rejection",
    "rate_rejection",
    "retry_delay",
]

_rng = random.Random()
_monotonic = time.monotonic


def add_attempt_header(
    metadata: Sequence[tuple[str, Any]] | None, previous: int
) -> tuple[tuple[str, Any], ...]:
    """Metadata for a retry: the caller's, plus ``grpc-previous-rpc-attempts``.

    gRPC's C core consumes ``grpc-previous-rpc-attempts`` on the server side (it is a
    reserved header and never reaches a grpcio handler), so the same count also goes
    as ``x-meshkit-previous-attempts``, which handlers and logs can read.
    """
    base = tuple(
        item
        for item in (metadata or ())
        if item[0] not in (PREVIOUS_ATTEMPTS_KEY, MESHKIT_ATTEMPTS_KEY)
    )
    count = str(previous)
    return (*base, (PREVIOUS_ATTEMPTS_KEY, count), (MESHKIT_ATTEMPTS_KEY, count))


def retry_delay(
    plan: ClientPlan,
    attempt: int,
    code: grpc.StatusCode,
    trailers: Any,
    prev_delay: float | None,
    deadline: float | None,
    per_attempt_hit: bool,
    m: Metrics,
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``, or None to stop with this outcome.

    Stops when attempts are used up, the code is not retryable, the server pushed back
    with a negative or unparsable value, the wait would pass the deadline, or the
    target's retry budget is spent.
    """
    retry = plan.retry
    if retry is None or attempt >= retry.max_attempts:
        return None
    if not retry.is_retryable(code.name, per_attempt_timeout_hit=per_attempt_hit):
        return None
    pushback = parse_pushback(trailers)
    if pushback == STOP:
        span_event("meshkit.retry.stopped", {"reason": "pushback"})
        return None
    delay = pushback if pushback is not None else retry.backoff(attempt, prev_delay, _rng)
    if deadline is not None and _monotonic() + delay >= deadline:
        return None
    budget = plan.budget
    if budget is not None and not budget.try_withdraw():
        m.budget_exhausted.add(1, plan.attrs)
        span_event("meshkit.retry.budget_exhausted", {"attempt": attempt})
        return None
    m.retries.add(1, plan.attrs)
    span_event(
        "meshkit.retry",
        {"attempt": attempt + 1, "code": code.name, "delay_ms": round(delay * 1000.0, 3)},
    )
    return delay


def breaker_rejection(plan: ClientPlan) -> CircuitOpenError:
    """The error for a call the breaker refused (names the breaker, carries pushback)."""
    wait = plan.breaker.remaining_open_time()
    return CircuitOpenError(
        f"circuit breaker {plan.breaker_name!r} is open for {plan.method}; retry in {wait:.3f}s",
        pushback=wait if wait > 0 else None,
    )


def bulkhead_rejection(name: str, limit: Any) -> BulkheadFullError:
    """The error for a call no bulkhead permit was free for."""
    return BulkheadFullError(f"bulkhead {name!r} is full ({limit} calls in flight)", pushback=0.05)


def rate_rejection(name: str, wait: float) -> RateLimitedError:
    """The error for a call over its rate limit; ``wait`` is when a token comes."""
    return RateLimitedError(
        f"rate limit {name!r} exceeded; retry in {wait:.3f}s", pushback=max(wait, 0.001)
    )


def trigger_of(exc: MeshkitError) -> str:
    """The fallback trigger name for a rejection."""
    if isinstance(exc, CircuitOpenError):
        return "circuit_open"
    if isinstance(exc, BulkheadFullError):
        return "bulkhead_full"
    if isinstance(exc, RateLimitedError):
        return "rate_limited"
    if isinstance(exc, CallRejectedError):
        return "rejected"
    return "deadline"


def attempt_timeout(
    deadline: float | None, per_attempt: float | None, now: float
) -> tuple[float | None, bool] | None:
    """The next attempt's timeout and whether ``per_attempt`` set it (so a
    DEADLINE_EXCEEDED is retryable); None when the call's deadline has passed."""
    timeout: float | None = None
    if deadline is not None:
        timeout = deadline - now
        if timeout <= 0:
            return None
    if per_attempt is not None and (timeout is None or per_attempt < timeout):
        return per_attempt, True
    return timeout, False


def refusal_trigger(plan: ClientPlan, exc: MeshkitError, m: Metrics) -> str:
    """Count a call refused before it was sent; the fallback trigger it fires."""
    m.failed_before_send.add(1, plan.attrs)
    trigger = trigger_of(exc)
    span_event("meshkit.rejected", {"reason": trigger})
    return "deadline_exceeded" if trigger == "deadline" else trigger


def exhausted_trigger(plan: ClientPlan, code: grpc.StatusCode) -> str | None:
    """The fallback trigger for a call whose last attempt failed with ``code``, or None
    when the failure is not transient (a business error is the caller's answer)."""
    if plan.fallback is None:
        return None
    name = code.name
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "deadline_exceeded"
    if (plan.retry is not None and plan.retry.is_retryable(name)) or name in (
        "UNAVAILABLE",
        "RESOURCE_EXHAUSTED",
    ):
        return "retries_exhausted"
    return None


def fallback_kind(plan: ClientPlan, trigger: str, client_stream: bool) -> str | None:
    """The kind of fallback to serve for ``trigger`` (``default``, ``error``, ``cached``,
    ``alternate``), or None. A client stream has no single request to key or resend."""
    fb = plan.fallback
    if fb is None or not fb.handles(trigger):
        return None
    kind = str(fb.kind)
    if client_stream and kind in ("cached", "alternate"):
        return None
    return kind


def fallback_served(plan: ClientPlan, kind: str, trigger: str, m: Metrics) -> None:
    """Count and annotate a fallback that was served."""
    m.fallbacks.add(1, plan.attrs)
    span_event("meshkit.fallback", {"kind": kind, "trigger": trigger})


class _Refused:
    __slots__ = ()


#: :func:`begin_attempt` when the breaker refuses the call's very first attempt.
REFUSED = _Refused()


def begin_attempt(
    plan: ClientPlan, attempt: int, deadline: float | None, per_attempt: float | None
) -> tuple[float | None, bool, float] | _Refused | None:
    """Permission and a timeout for attempt number ``attempt`` of a unary call.

    Returns ``(timeout, per_attempt_limited, started_at)`` to send it (the breaker
    permit, if any, is taken and the attempt counted); ``REFUSED`` when the breaker
    refuses the first attempt (the caller answers with :func:`breaker_rejection` or a
    fallback); None to stop with the previous outcome (the breaker refused a retry, or
    the deadline passed).
    """
    breaker = plan.breaker
    if breaker is not None and not breaker.try_acquire():
        if attempt == 1:
            return REFUSED
        span_event("meshkit.rejected", {"reason": "circuit_open", "attempt": attempt})
        return None
    now = _monotonic()
    limits = attempt_timeout(deadline, per_attempt, now)
    if limits is None:
        if breaker is not None:
            breaker.release()
        return None
    plan.tally.n += 1
    return limits[0], limits[1], now
