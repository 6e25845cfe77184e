"""Token-bucket rate limits, single and keyed by caller.

A bucket holds at most ``burst`` tokens and refills ``rate`` tokens every ``per``
seconds. :meth:`TokenBucket.try_acquire` never waits: it returns ``0.0`` when the
call may go, or the seconds until enough tokens will be there (the pushback hint
for ``grpc-retry-pushback-ms`` or ``Retry-After``).
"""

from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass

from meshkit.resilience.bulkhead import LimitScope, Side
from meshkit.resilience.clock import SYSTEM_CLOCK, Clock
from meshkit.resilience.events import Event, EventEmitter


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """``rate`` calls per ``per`` seconds with bursts up to ``burst``.

    ``key`` picks the caller key the adapter extracts per call: ``"method"`` (one
    bucket for all callers), ``"peer"`` (per peer address) or ``"metadata:<name>"``
    (per value of that request header; calls without it share the ``""`` bucket).
    ``scope`` (service or method) and ``side`` (default server) as for bulkheads.
    ``max_keys`` bounds the buckets kept per limiter (least recently used evicted).
    """

    rate: float = 100.0
    per: float = 1.0
    burst: int = 100
    key: str = "method"
    scope: LimitScope = LimitScope.SERVICE
    side: Side = Side.SERVER
    max_keys: int = 10_000

    @property
    def tokens_per_second(self) -> float:
        """The refill speed."""
        return self.rate / self.per

    @property
    def metadata_key(self) -> str | None:
        """The header name when ``key`` is ``metadata:<name>`` (lower-cased), else None."""
        if self.key.startswith("metadata:"):
            return self.key[len("metadata:") :]
        return None

    def applies_to(self, side: str) -> bool:
        """Whether the adapter on ``side`` (``"client"``/``"server"``) applies it."""
        return self.side is Side.BOTH or self.side.value == side


class TokenBucket:
    """One token bucket. Thread-safe, never blocks. Starts full."""

    __slots__ = ("_capacity", "_clock", "_lock", "_rate", "_stamp", "_tokens")

    def __init__(self, rate_per_second: float, burst: int, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._rate = rate_per_second
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._stamp = clock.now()
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        """Tokens available now."""
        with self._lock:
            self._refill()
            return self._tokens

    def _refill(self) -> None:
        now = self._clock.now()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
            self._stamp = now

    def try_acquire(self, n: int = 1) -> float:
        """Take ``n`` tokens: ``0.0`` if taken, else seconds until they would be there.

        ``math.inf`` when ``n`` exceeds the burst (it can never be served).
        """
        with self._lock:
            self._refill()
            if self._tokens >= n:
                self._tokens -= n
                return 0.0
            if n > self._capacity or self._rate <= 0:
                return math.inf
            return (n - self._tokens) / self._rate


class KeyedRateLimiter(EventEmitter):
    """Token buckets per caller key, at most ``config.max_keys`` of them (LRU).

    An evicted key comes back with a full bucket; ``max_keys`` bounds memory when
    keys come from callers (peers, API keys).
    """

    def __init__(
        self,
        config: RateLimitConfig | None = None,
        *,
        name: str = "",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else RateLimitConfig()
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()
        self._rejected = 0

    @property
    def rejected(self) -> int:
        """Calls refused since creation."""
        return self._rejected

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, key: str = "") -> TokenBucket:
        """The bucket for ``key`` (created full on first use)."""
        with self._lock:
            b = self._buckets.get(key)
            if b is not None:
                self._buckets.move_to_end(key)
                return b
            cfg = self.config
            b = TokenBucket(cfg.tokens_per_second, cfg.burst, clock=self._clock)
            self._buckets[key] = b
            while len(self._buckets) > cfg.max_keys:
                self._buckets.popitem(last=False)
            return b

    def try_acquire(self, key: str = "", n: int = 1) -> float:
        """As :meth:`TokenBucket.try_acquire` on ``key``'s bucket; a refusal emits
        an event of kind ``"rejected"`` with ``value`` = the wait hint."""
        wait = self.bucket(key).try_acquire(n)
        if wait > 0:
            with self._lock:
                self._rejected += 1
            self._emit(Event("rejected", "rate_limit", self.name, self._clock.now(), value=wait))
        return wait


#: The name :class:`meshkit.config.Policy` registries hand out.
RateLimiter = KeyedRateLimiter
