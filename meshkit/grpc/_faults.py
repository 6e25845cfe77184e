"""Fault injection for the adapters: decide (policy) and wait (sync or asyncio)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc

from meshkit.grpc._status import code_of
from meshkit.telemetry import instruments, span_event

__all__ = ["client_fault", "client_fault_async", "decide"]

_monotonic = time.monotonic


def decide(fault: Any, allow_headers: bool, metadata: Any, rng: random.Random) -> Any:
    """The fault decision for one call (None: no fault), headers applied when allowed."""
    policy = fault
    if allow_headers and metadata:
        policy = policy.from_headers(metadata)
    decision = policy.decide(rng)
    if decision.is_noop:
        return None
    m = instruments()
    if decision.delay > 0:
        m.faults.add(1, {"fault": "delay"})
    if decision.abort_code is not None:
        m.faults.add(1, {"fault": "abort"})
    span_event(
        "meshkit.fault",
        {"delay_ms": round(decision.delay * 1000.0, 3), "abort": decision.abort_code or ""},
    )
    return decision


def _outcome(decision: Any, deadline: float | None) -> tuple[grpc.StatusCode, str] | None:
    if deadline is not None and _monotonic() >= deadline:
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded during an injected delay"
    if decision.abort_code is not None:
        return code_of(decision.abort_code), f"fault injected: abort {decision.abort_code}"
    return None


def _delay(decision: Any, deadline: float | None) -> float:
    delay = float(decision.delay)
    if deadline is not None:
        delay = min(delay, max(0.0, deadline - _monotonic()))
    return delay


def client_fault(
    plan: Any, metadata: Any, deadline: float | None, rng: random.Random
) -> tuple[grpc.StatusCode, str] | None:
    """Apply a client-side fault on a thread: sleep, then maybe an abort status."""
    decision = decide(plan.fault, plan.allow_fault_headers, metadata, rng)
    if decision is None:
        return None
    delay = _delay(decision, deadline)
    if delay > 0:
        time.sleep(delay)
    return _outcome(decision, deadline)


async def client_fault_async(
    plan: Any, metadata: Any, deadline: float | None, rng: random.Random
) -> tuple[grpc.StatusCode, str] | None:
    """Apply a client-side fault on the event loop."""
    decision = decide(plan.fault, plan.allow_fault_headers, metadata, rng)
    if decision is None:
        return None
    delay = _delay(decision, deadline)
    if delay > 0:
        await asyncio.sleep(delay)
    return _outcome(decision, deadline)
