"""Adaptive concurrency limits after Netflix's concurrency-limits (AIMD, Gradient2, Vegas).

The limiter admits calls while fewer than ``limit`` are in flight. Each admitted
call returns a :class:`Token`; the adapter reports the call's round-trip time with
:meth:`Token.success`, an overload signal with :meth:`Token.dropped` (the call timed
out or was rejected downstream), or :meth:`Token.ignore` (an outcome that says
nothing about load, e.g. a caller error). The algorithm turns samples into a new
limit: it shrinks when latency rises or drops happen and grows back when healthy.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from enum import StrEnum

from meshkit.resilience.bulkhead import LimitScope, Side
from meshkit.resilience.clock import SYSTEM_CLOCK, Clock
from meshkit.resilience.events import Event, EventEmitter


class AdaptiveAlgorithm(StrEnum):
    """The limit algorithms."""

    AIMD = "aimd"
    GRADIENT2 = "gradient2"
    VEGAS = "vegas"


@dataclass(frozen=True, slots=True)
class AdaptiveLimitConfig:
    """A validated adaptive-limit configuration (keys documented in docs/policy.md).

    Shared: ``algorithm``, ``initial_limit``, ``min_limit``, ``max_limit``, ``scope``,
    ``side`` (default ``server``). AIMD: ``backoff_ratio`` (multiplicative decrease)
    and ``timeout`` (an RTT above it counts as a drop). Gradient2: ``smoothing``,
    ``tolerance`` (how much the short RTT may exceed the long one before the limit
    shrinks), ``long_window`` (samples in the long-RTT average) and ``queue_size``
    (headroom added to the limit). Vegas: ``smoothing`` and ``alpha``/``beta``
    (queue-size thresholds, multiplied by ``log10(limit)``). Gradient2 and Vegas
    update once per sample window, as Netflix's ``WindowedLimit`` does: a window
    closes after ``sample_window`` seconds with at least ``min_window_samples``
    samples and feeds the average RTT, the largest in-flight count and whether any
    call dropped. AIMD updates on every sample so that it backs off at once.
    """

    algorithm: AdaptiveAlgorithm = AdaptiveAlgorithm.GRADIENT2
    initial_limit: int = 20
    min_limit: int = 2
    max_limit: int = 200
    backoff_ratio: float = 0.9
    timeout: float = 5.0
    smoothing: float = 0.2
    tolerance: float = 1.5
    long_window: int = 600
    queue_size: int = 4
    alpha: float = 3.0
    beta: float = 6.0
    sample_window: float = 1.0
    min_window_samples: int = 10
    scope: LimitScope = LimitScope.SERVICE
    side: Side = Side.SERVER

    def applies_to(self, side: str) -> bool:
        """Whether the adapter on ``side`` (``"client"``/``"server"``) applies it."""
        return self.side is Side.BOTH or self.side.value == side


class _Algorithm:
    windowed = True

    def update(self, limit: float, rtt: float, inflight: int, dropped: bool) -> float:
        raise NotImplementedError


class _Aimd(_Algorithm):
    windowed = False

    def __init__(self, cfg: AdaptiveLimitConfig) -> None:
        self.cfg = cfg

    def update(self, limit: float, rtt: float, inflight: int, dropped: bool) -> float:
        if dropped or rtt > self.cfg.timeout:
            return limit * self.cfg.backoff_ratio
        if inflight * 2 >= limit:
            return limit + 1
        return limit


class _Gradient2(_Algorithm):
    _WARMUP = 10

    def __init__(self, cfg: AdaptiveLimitConfig) -> None:
        self.cfg = cfg
        self._long = 0.0
        self._n = 0
        self._alpha = 2.0 / (cfg.long_window + 1)

    def update(self, limit: float, rtt: float, inflight: int, dropped: bool) -> float:
        cfg = self.cfg
        short = max(rtt, 1e-9)
        if self._n < self._WARMUP:
            self._n += 1
            self._long += (short - self._long) / self._n
        else:
            self._long += (short - self._long) * self._alpha
        if self._long / short > 2:
            # The long average lags far behind a recovery: let it catch up.
            self._long *= 0.95
        if dropped:
            gradient = 0.5
        else:
            if inflight < limit / 2:
                return limit  # App-limited: the sample says nothing about capacity.
            gradient = max(0.5, min(1.0, cfg.tolerance * self._long / short))
        target = limit * gradient + cfg.queue_size
        return limit * (1 - cfg.smoothing) + target * cfg.smoothing


class _Vegas(_Algorithm):
    def __init__(self, cfg: AdaptiveLimitConfig) -> None:
        self.cfg = cfg
        self._rtt_noload = 0.0

    def update(self, limit: float, rtt: float, inflight: int, dropped: bool) -> float:
        cfg = self.cfg
        if rtt <= 0:
            return limit
        if self._rtt_noload == 0 or rtt < self._rtt_noload:
            self._rtt_noload = rtt
            if not dropped:
                return limit
        log = max(1.0, math.log10(limit))
        if dropped:
            target = limit - log
        else:
            if inflight * 2 < limit:
                return limit
            queue = math.ceil(limit * (1 - self._rtt_noload / rtt))
            if queue <= log:
                target = limit + cfg.beta * log
            elif queue < cfg.alpha * log:
                target = limit + log
            elif queue > cfg.beta * log:
                target = limit - log
            else:
                return limit
        return limit * (1 - cfg.smoothing) + target * cfg.smoothing


def _algorithm(cfg: AdaptiveLimitConfig) -> _Algorithm:
    if cfg.algorithm is AdaptiveAlgorithm.AIMD:
        return _Aimd(cfg)
    if cfg.algorithm is AdaptiveAlgorithm.VEGAS:
        return _Vegas(cfg)
    return _Gradient2(cfg)


class Token:
    """One admitted call. Report exactly one outcome; later reports are ignored."""

    __slots__ = ("_done", "_limiter", "inflight", "start")

    def __init__(self, limiter: AdaptiveLimiter, start: float, inflight: int) -> None:
        self._limiter = limiter
        self.start = start
        self.inflight = inflight
        self._done = False

    def success(self, rtt: float | None = None) -> None:
        """The call completed; ``rtt`` in seconds (default: measured by the clock)."""
        if self._done:
            return
        self._done = True
        self._limiter._complete(self, rtt, dropped=False)

    def dropped(self) -> None:
        """The call hit an overload signal (timeout, RESOURCE_EXHAUSTED, UNAVAILABLE)."""
        if self._done:
            return
        self._done = True
        self._limiter._complete(self, None, dropped=True)

    def ignore(self) -> None:
        """Free the slot without a sample (the outcome says nothing about load)."""
        if self._done:
            return
        self._done = True
        self._limiter._complete(self, None, dropped=False, sample=False)


class AdaptiveLimiter(EventEmitter):
    """An adaptive concurrency limit. Thread-safe; never blocks (usable from asyncio)."""

    def __init__(
        self,
        config: AdaptiveLimitConfig | None = None,
        *,
        name: str = "",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else AdaptiveLimitConfig()
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._limit = float(self.config.initial_limit)
        self._in_flight = 0
        self._rejected = 0
        self._algo = _algorithm(self.config)
        self._win_start = clock.now()
        self._win_count = 0
        self._win_rtt = 0.0
        self._win_inflight = 0
        self._win_drop = False

    @property
    def limit(self) -> int:
        """The current concurrency limit."""
        return int(self._limit)

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet reported."""
        return self._in_flight

    @property
    def rejected(self) -> int:
        """Calls refused since creation."""
        return self._rejected

    def try_acquire(self) -> Token | None:
        """Admit a call (a :class:`Token`) or refuse it (``None``; event ``rejected``)."""
        with self._lock:
            if self._in_flight < int(self._limit):
                self._in_flight += 1
                return Token(self, self._clock.now(), self._in_flight)
            self._rejected += 1
        self._emit(
            Event("rejected", "adaptive_limit", self.name, self._clock.now(), value=self._limit)
        )
        return None

    def _complete(
        self, token: Token, rtt: float | None, *, dropped: bool, sample: bool = True
    ) -> None:
        now = self._clock.now()
        changed: int | None = None
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if sample:
                measured = rtt if rtt is not None else now - token.start
                cfg = self.config
                old = int(self._limit)
                if self._algo.windowed:
                    update = self._add_to_window(now, measured, token.inflight, dropped)
                else:
                    update = (measured, token.inflight, dropped)
                if update is not None:
                    new = self._algo.update(self._limit, *update)
                    self._limit = min(float(cfg.max_limit), max(float(cfg.min_limit), new))
                    if int(self._limit) != old:
                        changed = int(self._limit)
        if changed is not None:
            self._emit(
                Event("limit_changed", "adaptive_limit", self.name, now, value=float(changed))
            )

    def _add_to_window(
        self, now: float, rtt: float, inflight: int, dropped: bool
    ) -> tuple[float, int, bool] | None:
        """Aggregate one sample; return the window's summary when it closes."""
        self._win_count += 1
        self._win_rtt += rtt
        self._win_inflight = max(self._win_inflight, inflight)
        self._win_drop = self._win_drop or dropped
        cfg = self.config
        if now - self._win_start < cfg.sample_window or self._win_count < cfg.min_window_samples:
            return None
        summary = (self._win_rtt / self._win_count, self._win_inflight, self._win_drop)
        self._win_start = now
        self._win_count = 0
        self._win_rtt = 0.0
        self._win_inflight = 0
        self._win_drop = False
        return summary
