"""The :class:`ResilienceRegistry`: the live, shared resilience state of a process.

A :class:`~meshkit.config.Policy` is an immutable compiled document; the breakers,
retry budgets, bulkheads and limiters its interceptors use live here, keyed by name
and config, so they outlive the document: a reload builds a new Policy over the same
registry and every instance whose name and config did not change keeps its state.
This is the shape of Resilience4j's ``CircuitBreakerRegistry``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from meshkit.resilience.adaptive import AdaptiveLimitConfig, AdaptiveLimiter
from meshkit.resilience.breaker import CircuitBreaker, CircuitBreakerConfig
from meshkit.resilience.budget import RetryBudget, RetryBudgetConfig
from meshkit.resilience.bulkhead import Bulkhead, BulkheadConfig
from meshkit.resilience.clock import SYSTEM_CLOCK, Clock
from meshkit.resilience.events import EventEmitter, Listener
from meshkit.resilience.fallback import LastGoodCache
from meshkit.resilience.ratelimit import KeyedRateLimiter, RateLimitConfig

__all__ = ["MAX_INSTANCES", "ResilienceRegistry"]

#: Upper bound on the instances of each kind a registry remembers (oldest dropped).
MAX_INSTANCES = 10_000

_T = TypeVar("_T", bound=EventEmitter)
_C = TypeVar("_C", bound=Hashable)


class _Instances(Generic[_C, _T]):
    """Instances of one kind by ``(name, config)``; created once; bounded (the oldest
    is dropped when full).

    Reads are a plain dict lookup; creation takes the lock. A dropped instance lives
    on in whoever holds it, so bounding never breaks a call in flight.
    """

    def __init__(self, factory: Callable[[str, _C], _T], limit: int) -> None:
        self._factory = factory
        self._items: dict[tuple[str, _C], _T] = {}
        self._lock = threading.Lock()
        self._limit = limit
        self._listeners: list[Listener] = []

    def get(self, name: str, config: _C) -> _T:
        key = (name, config)
        item = self._items.get(key)
        if item is not None:
            return item
        with self._lock:
            item = self._items.get(key)
            if item is None:
                item = self._factory(name, config)
                for listener in self._listeners:
                    item.add_listener(listener)
                if len(self._items) >= self._limit:
                    del self._items[next(iter(self._items))]
                self._items[key] = item
        return item

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)
            items = list(self._items.values())
        for item in items:
            item.add_listener(listener)

    def snapshot(self) -> dict[str, _T]:
        # Insertion order: when one name has several configs, the newest wins.
        with self._lock:
            return {name: item for (name, _), item in self._items.items()}


class ResilienceRegistry:
    """Breakers, retry budgets, bulkheads and limiters by ``(name, config)``, plus the
    last-good-response cache and the event listeners: the state that outlives a
    policy document.

    One registry is shared by every :class:`~meshkit.config.Policy` built over it
    (``Policy.from_dict(doc, registry=registry)``, or ``policy.with_registry(...)``
    on a reload). Asking twice for the same name and an equal config gives the same
    instance, so a reload that leaves a breaker's config alone keeps its state (an
    OPEN breaker stays OPEN) even when the rest of the document changed; a changed
    config gives a fresh instance under the same name (the old one finishes the
    calls that hold it, and the snapshots show the newest).

    Each kind holds at most ``limit`` instances (the oldest is dropped). ``clock``
    drives every instance and the cache.
    """

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, limit: int = MAX_INSTANCES) -> None:
        self.clock = clock
        self._breakers: _Instances[CircuitBreakerConfig, CircuitBreaker] = _Instances(
            lambda name, cfg: CircuitBreaker(cfg, name=name, clock=clock), limit
        )
        self._budgets: _Instances[RetryBudgetConfig, RetryBudget] = _Instances(
            lambda name, cfg: RetryBudget(cfg, name=name, clock=clock), limit
        )
        self._bulkheads: _Instances[BulkheadConfig, Bulkhead] = _Instances(
            lambda name, cfg: Bulkhead(cfg, name=name, clock=clock), limit
        )
        self._rate_limiters: _Instances[RateLimitConfig, KeyedRateLimiter] = _Instances(
            lambda name, cfg: KeyedRateLimiter(cfg, name=name, clock=clock), limit
        )
        self._adaptive: _Instances[AdaptiveLimitConfig, AdaptiveLimiter] = _Instances(
            lambda name, cfg: AdaptiveLimiter(cfg, name=name, clock=clock), limit
        )
        self._last_good: LastGoodCache | None = None
        self._last_good_lock = threading.Lock()

    # -- instances -----------------------------------------------------------------

    def breaker(self, scope_key: str, config: CircuitBreakerConfig) -> CircuitBreaker:
        """The breaker named ``scope_key`` (``MethodPolicy.key_for(config.scope,
        target)``) with this ``config``."""
        return self._breakers.get(scope_key, config)

    def retry_budget(self, target: str, config: RetryBudgetConfig) -> RetryBudget:
        """The retry budget of ``target`` with this ``config`` (which config a target
        gets is the policy's choice: :meth:`meshkit.config.Policy.retry_budget`)."""
        return self._budgets.get(target, config)

    def bulkhead(self, key: str, config: BulkheadConfig) -> Bulkhead:
        """The bulkhead named ``key`` with this ``config``."""
        return self._bulkheads.get(key, config)

    def rate_limiter(self, key: str, config: RateLimitConfig) -> KeyedRateLimiter:
        """The keyed rate limiter named ``key``; callers' keys live inside it."""
        return self._rate_limiters.get(key, config)

    def adaptive_limiter(self, key: str, config: AdaptiveLimitConfig) -> AdaptiveLimiter:
        """The adaptive concurrency limiter named ``key`` with this ``config``."""
        return self._adaptive.get(key, config)

    def last_good_cache(self) -> LastGoodCache:
        """The cache of last good responses for ``fallback: {kind: cached}`` (one per
        registry, made on first use)."""
        if self._last_good is None:
            with self._last_good_lock:
                if self._last_good is None:
                    self._last_good = LastGoodCache(clock=self.clock)
        return self._last_good

    def add_listener(self, listener: Listener) -> None:
        """Receive the events of every breaker, budget, bulkhead and limiter this
        registry has made or will make."""
        for instances in self._kinds():
            instances.add_listener(listener)

    def _kinds(self) -> tuple[_Instances[Any, Any], ...]:
        return (
            self._breakers,
            self._budgets,
            self._bulkheads,
            self._rate_limiters,
            self._adaptive,
        )

    # -- snapshots (by name; the newest instance when a name has several configs) ------

    def breakers(self) -> dict[str, CircuitBreaker]:
        """The breakers made so far, by name."""
        return self._breakers.snapshot()

    def retry_budgets(self) -> dict[str, RetryBudget]:
        """The retry budgets made so far, by target."""
        return self._budgets.snapshot()

    def bulkheads(self) -> dict[str, Bulkhead]:
        """The bulkheads made so far, by key."""
        return self._bulkheads.snapshot()

    def rate_limiters(self) -> dict[str, KeyedRateLimiter]:
        """The rate limiters made so far, by key."""
        return self._rate_limiters.snapshot()

    def adaptive_limiters(self) -> dict[str, AdaptiveLimiter]:
        """The adaptive limiters made so far, by key."""
        return self._adaptive.snapshot()

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{n}={len(k._items)}"
            for n, k in zip(
                ("breakers", "budgets", "bulkheads", "rate_limiters", "adaptive"),
                self._kinds(),
                strict=True,
            )
        )
        return f"ResilienceRegistry({sizes})"
