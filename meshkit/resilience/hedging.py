"""Hedging policy: a value object. The race itself lives in the adapter."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HedgingPolicy:
    """Send up to ``max_attempts`` copies of a unary call, ``delay`` seconds apart.

    The first OK or *fatal* status wins and the other attempts are cancelled. A
    status in ``non_fatal_codes`` does not end the race: the next hedge is sent at
    once (as gRPC's hedging policy specifies). Hedges draw on the target's retry
    budget like retries do. Only for methods that are safe to run more than once.
    """

    max_attempts: int = 2
    delay: float = 0.1
    non_fatal_codes: frozenset[str] = frozenset({"UNAVAILABLE"})

    def is_fatal(self, code: str) -> bool:
        """Whether an attempt ending with ``code`` ends the race (OK is fatal: it wins)."""
        return code not in self.non_fatal_codes
