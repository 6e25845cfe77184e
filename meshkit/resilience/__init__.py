"""Transport-free resilience policies: pure state machines with an injected clock.

Nothing here imports grpc, HTTP or NATS. The adapters in :mod:`meshkit.grpc` own the
waiting (threads or asyncio); these classes own the decisions, and a
:class:`ResilienceRegistry` holds the shared instances by name and config.
"""

from meshkit.resilience.adaptive import (
    AdaptiveAlgorithm,
    AdaptiveLimitConfig,
    AdaptiveLimiter,
    Token,
)
from meshkit.resilience.breaker import (
    BreakerMetrics,
    BreakerScope,
    BreakerState,
    CircuitBreaker,
    CircuitBreakerConfig,
    WindowType,
)
from meshkit.resilience.budget import RetryBudget, RetryBudgetConfig
from meshkit.resilience.bulkhead import Bulkhead, BulkheadConfig, LimitScope, Side
from meshkit.resilience.clock import SYSTEM_CLOCK, Clock, FakeClock
from meshkit.resilience.events import Event, Listener
from meshkit.resilience.fallback import FallbackKind, FallbackPolicy, FallbackTrigger, LastGoodCache
from meshkit.resilience.fault import FaultDecision, FaultPolicy
from meshkit.resilience.hedging import HedgingPolicy
from meshkit.resilience.ratelimit import KeyedRateLimiter, RateLimitConfig, RateLimiter, TokenBucket
from meshkit.resilience.registry import ResilienceRegistry
from meshkit.resilience.retry import Jitter, RetryPolicy

__all__ = [
    "SYSTEM_CLOCK",
    "AdaptiveAlgorithm",
    "AdaptiveLimitConfig",
    "AdaptiveLimiter",
    "BreakerMetrics",
    "BreakerScope",
    "BreakerState",
    "Bulkhead",
    "BulkheadConfig",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "Clock",
    "Event",
    "FakeClock",
    "FallbackKind",
    "FallbackPolicy",
    "FallbackTrigger",
    "FaultDecision",
    "FaultPolicy",
    "HedgingPolicy",
    "Jitter",
    "KeyedRateLimiter",
    "LastGoodCache",
    "LimitScope",
    "Listener",
    "RateLimitConfig",
    "RateLimiter",
    "ResilienceRegistry",
    "RetryBudget",
    "RetryBudgetConfig",
    "RetryPolicy",
    "Side",
    "Token",
    "TokenBucket",
    "WindowType",
]
