"""Fault injection: the decision for one call (the engine and the servers wait it out)."""

from __future__ import annotations

import random
import time
from typing import Any

from meshkit.telemetry import instruments, span_event

__all__ = ["decide"]

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
