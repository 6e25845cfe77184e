"""Per-method compilation: the layers that apply to one method (defaults, service
rule, method rule), each replacing whole sections, merged into a frozen
:class:`MethodPolicy`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from meshkit.config.sections import DEFAULT_DEADLINE_MARGIN, SECTIONS
from meshkit.resilience.adaptive import AdaptiveLimitConfig
from meshkit.resilience.breaker import (
    CircuitBreakerConfig,
)
from meshkit.resilience.bulkhead import BulkheadConfig
from meshkit.resilience.fallback import FallbackPolicy
from meshkit.resilience.fault import FaultPolicy
from meshkit.resilience.hedging import HedgingPolicy
from meshkit.resilience.ratelimit import RateLimitConfig
from meshkit.resilience.retry import RetryPolicy

# --------------------------------------------------------------------------------------
# The compiled per-method policy.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MethodPolicy:
    """Everything the adapters apply to one method, compiled once.

    ``method`` is the method's name alone (``Charge``; ``""`` when looked up by
    service), ``service`` the full service name (``shop.v1.PaymentService``),
    ``full_method`` the gRPC path (``/shop.v1.PaymentService/Charge``). A section is
    ``None`` when off. ``matched`` lists the labels of what applied (``defaults``,
    ``rules[0]``...). ``is_noop`` is true when nothing at all is configured (the
    adapters' fast path; deadline propagation still applies); ``client_is_noop`` and
    ``server_is_noop`` say the same for one side (see each section's ``side``).
    """

    method: str
    service: str
    full_method: str
    timeout: float | None = None
    deadline_margin: float = DEFAULT_DEADLINE_MARGIN
    retry: RetryPolicy | None = None
    hedging: HedgingPolicy | None = None
    circuit_breaker: CircuitBreakerConfig | None = None
    bulkhead: BulkheadConfig | None = None
    adaptive_limit: AdaptiveLimitConfig | None = None
    rate_limit: RateLimitConfig | None = None
    fallback: FallbackPolicy | None = None
    fault: FaultPolicy | None = None
    matched: tuple[str, ...] = ()
    is_noop: bool = True
    client_is_noop: bool = True
    server_is_noop: bool = True

    def key_for(self, scope: str, target: str = "") -> str:
        """A registry key for a shared instance of ``scope`` (``target``, ``service``
        or ``method``) on ``target`` (``""`` on servers): ``"host:50051"``,
        ``"host:50051/shop.v1.PaymentService"``, ``"host:50051/shop.v1.PaymentService/Charge"``.
        """
        if scope == "target":
            return target
        if scope == "service":
            return f"{target}/{self.service}"
        return f"{target}{self.full_method}"


def _side_applies(cfg: Any, side: str) -> bool:
    return cfg is not None and bool(cfg.applies_to(side))


def _compile(service: str, method: str, layers: list[tuple[str, dict[str, Any]]]) -> MethodPolicy:
    merged: dict[str, Any] = {"deadline_margin": DEFAULT_DEADLINE_MARGIN}
    labels: list[str] = []
    for label, layer in layers:
        if layer:
            labels.append(label)
        merged.update(layer)
    full = f"/{service}/{method}" if method else f"/{service}"
    mp = MethodPolicy(
        method=method, service=service, full_method=full, matched=tuple(labels), **merged
    )
    side_sections = ("bulkhead", "adaptive_limit", "rate_limit", "fault")
    client_only = ("timeout", "retry", "hedging", "circuit_breaker", "fallback")
    client_noop = all(getattr(mp, s) is None for s in client_only) and not any(
        _side_applies(getattr(mp, s), "client") for s in side_sections
    )
    server_noop = not any(_side_applies(getattr(mp, s), "server") for s in side_sections)
    noop = all(getattr(mp, s) is None for s in SECTIONS if s != "deadline_margin")
    return dataclasses.replace(
        mp, is_noop=noop, client_is_noop=client_noop, server_is_noop=server_noop
    )
