"""Retry policy: which codes to retry, how many attempts, and how long to back off.

The policy decides; the adapter waits (on a thread or the event loop) and never
sleeps past the call's deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from meshkit.resilience.budget import RetryBudgetConfig

_DEFAULT_BUDGET = RetryBudgetConfig()
_RNG = random.Random()


class Jitter(StrEnum):
    """How a backoff is randomised so that clients do not retry in lockstep."""

    NONE = "none"
    FULL = "full"
    EQUAL = "equal"
    DECORRELATED = "decorrelated"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how to retry one method (validated by :mod:`meshkit.config`).

    ``max_attempts`` counts the first attempt too (1 = never retry).
    ``per_attempt_timeout`` bounds each attempt; the call's overall timeout still
    bounds them all. ``budget`` is the per-target retry budget's config (``None``:
    no budget). ``max_buffer_bytes`` caps the client-stream messages buffered for
    replay; past it the call is committed and no longer retried.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    jitter: Jitter = Jitter.FULL
    retryable_codes: frozenset[str] = frozenset({"UNAVAILABLE"})
    per_attempt_timeout: float | None = None
    budget: RetryBudgetConfig | None = _DEFAULT_BUDGET
    max_buffer_bytes: int = 1 << 20

    def base_backoff(self, retry_index: int) -> float:
        """The un-jittered backoff before retry ``retry_index`` (1 = first retry).

        ``min(max_backoff, initial_backoff * multiplier ** (retry_index - 1))``.
        """
        exponent = max(0, retry_index - 1)
        try:
            raw = self.initial_backoff * self.multiplier**exponent
        except OverflowError:
            return self.max_backoff
        return min(self.max_backoff, raw)

    def backoff(
        self,
        retry_index: int,
        previous_delay: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """Seconds to wait before retry ``retry_index`` (1 = the first retry).

        With ``b = base_backoff(retry_index)``:

        * ``none``: ``b``;
        * ``full``: ``uniform(0, b)``;
        * ``equal``: ``b/2 + uniform(0, b/2)``;
        * ``decorrelated``: ``min(max_backoff, uniform(initial_backoff, previous*3))``
          where ``previous`` is ``previous_delay`` (the delay used before the last
          retry; ``initial_backoff`` when there was none).
        """
        r = rng if rng is not None else _RNG
        if self.jitter is Jitter.DECORRELATED:
            prev = previous_delay if previous_delay and previous_delay > 0 else self.initial_backoff
            high = max(self.initial_backoff, prev * 3)
            return min(self.max_backoff, r.uniform(self.initial_backoff, high))
        b = self.base_backoff(retry_index)
        if self.jitter is Jitter.NONE:
            return b
        if self.jitter is Jitter.FULL:
            return r.uniform(0.0, b)
        return b / 2 + r.uniform(0.0, b / 2)

    def max_backoff_for(self, retry_index: int) -> float:
        """The largest delay :meth:`backoff` can return before retry ``retry_index``."""
        if self.jitter is Jitter.DECORRELATED:
            # previous*3 grows geometrically from initial_backoff, capped by max_backoff.
            try:
                high = self.initial_backoff * 3.0**retry_index
            except OverflowError:
                return self.max_backoff
            return min(self.max_backoff, high)
        return self.base_backoff(retry_index)

    def worst_case(self) -> float | None:
        """Worst-case duration of all attempts plus backoffs, or ``None`` if unbounded.

        Unbounded when ``per_attempt_timeout`` is not set (then only the call's
        overall timeout bounds the attempts).
        """
        if self.per_attempt_timeout is None:
            return None
        backoffs = sum(self.max_backoff_for(i) for i in range(1, self.max_attempts))
        return self.max_attempts * self.per_attempt_timeout + backoffs

    def is_retryable(self, code: str, *, per_attempt_timeout_hit: bool = False) -> bool:
        """Whether an attempt that ended with ``code`` may be retried.

        A ``DEADLINE_EXCEEDED`` caused by ``per_attempt_timeout`` (not by the
        call's own deadline) is retryable whenever ``per_attempt_timeout`` is set;
        the adapter says so with ``per_attempt_timeout_hit=True``.
        """
        if per_attempt_timeout_hit and self.per_attempt_timeout is not None:
            return True
        return code in self.retryable_codes
