"""A retry budget per target, after Finagle's RetryBudget.

Every call deposits ``ratio`` of a retry; every retry withdraws one. Deposits and
withdrawals expire after ``ttl``. A reserve of ``min_per_second * ttl`` retries lets
low-traffic clients retry at all. Under a total outage the attempts within one
``ttl`` therefore stay below ``calls * (1 + ratio) + min_per_second * ttl``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from meshkit.resilience.clock import SYSTEM_CLOCK, Clock
from meshkit.resilience.events import Event, EventEmitter

_BUCKETS = 10


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    """``ratio`` retries per call, plus ``min_per_second`` retries always allowed.

    ``ttl`` is how long a deposit or withdrawal counts (Finagle's default 10 s).
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    ttl: float = 10.0


class RetryBudget(EventEmitter):
    """The shared budget of retries for one target. Thread-safe, never blocks.

    Call :meth:`record_call` once per logical call (not per attempt) and
    :meth:`try_withdraw` before each retry or hedge; a ``False`` means the retry
    must not be sent (an event ``budget_exhausted`` is emitted).
    """

    def __init__(
        self,
        config: RetryBudgetConfig | None = None,
        *,
        name: str = "",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else RetryBudgetConfig()
        self.name = name
        self._clock = clock
        # Bound once, and the system clock's own function when it is the system clock:
        # the hot path reads the clock on every call.
        self._now = time.monotonic if clock is SYSTEM_CLOCK else clock.now
        self._width = self.config.ttl / _BUCKETS
        # Per bucket: deposits (calls) and withdrawals (retries). Sums kept aside so a
        # read is O(1); expiring a bucket subtracts it.
        self._calls = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._sum_calls = 0
        self._sum_retries = 0
        self._epoch = int(clock.now() / self._width)
        self._lock = threading.Lock()
        self._reserve = self.config.min_per_second * self.config.ttl

    def _roll(self) -> int:
        epoch = int(self._now() / self._width)
        if epoch > self._epoch:
            self._advance(epoch)
        return epoch % _BUCKETS

    def _advance(self, epoch: int) -> None:
        """Expire the buckets between the current epoch and ``epoch`` (a later one)."""
        for i in range(min(epoch - self._epoch, _BUCKETS)):
            slot = (self._epoch + 1 + i) % _BUCKETS
            self._sum_calls -= self._calls[slot]
            self._sum_retries -= self._retries[slot]
            self._calls[slot] = 0
            self._retries[slot] = 0
        self._epoch = epoch

    def record_call(self) -> None:
        """Deposit one call's share (``ratio``) of a retry."""
        # Called once per call: _roll is inlined (same arithmetic, one call less).
        with self._lock:
            epoch = int(self._now() / self._width)
            if epoch > self._epoch:
                self._advance(epoch)
            self._calls[epoch % _BUCKETS] += 1
            self._sum_calls += 1

    def balance(self) -> float:
        """Retries that may be withdrawn now."""
        with self._lock:
            self._roll()
            return self._balance()

    def _balance(self) -> float:
        return self._reserve + self.config.ratio * self._sum_calls - self._sum_retries

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; ``False`` when it is spent."""
        with self._lock:
            slot = self._roll()
            if self._balance() >= 1.0:
                self._retries[slot] += 1
                self._sum_retries += 1
                return True
        self._emit(Event("budget_exhausted", "retry_budget", self.name, self._clock.now()))
        return False
