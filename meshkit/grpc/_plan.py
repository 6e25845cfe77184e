"""Per-method plans: a method's policy compiled once into what the interceptors need.

The fused interceptors look a plan up by method name (one dict lookup per call) and
take the fast path when the plan says so. Plans hold the shared state instances
(breakers, budgets, bulkheads, limiters) fetched once from the policy's
:class:`~meshkit.resilience.registry.ResilienceRegistry`, and the telemetry attribute
dicts, so nothing is built per call.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshkit.telemetry import (
    Tally,
    attempts_tally,
    breaker_listener,
    instruments,
    method_attributes,
    watch_bulkhead,
)

if TYPE_CHECKING:
    from meshkit.config import MethodPolicy, Policy
    from meshkit.resilience.breaker import CircuitBreaker
    from meshkit.resilience.budget import RetryBudget
    from meshkit.resilience.bulkhead import Bulkhead
    from meshkit.resilience.fallback import FallbackPolicy
    from meshkit.resilience.fault import FaultPolicy
    from meshkit.resilience.hedging import HedgingPolicy
    from meshkit.resilience.ratelimit import KeyedRateLimiter
    from meshkit.resilience.retry import RetryPolicy

__all__ = [
    "ClientPlan",
    "PlanCache",
    "PlanLevel",
    "ServerPlan",
    "compile_client",
    "compile_server",
]

_log = logging.getLogger("meshkit.grpc")


class PlanLevel(enum.IntEnum):
    """How much a client interceptor does for a method: the fast paths skip the
    attempt engine when the policy leaves it nothing to do."""

    #: No client-side policy: only propagate the incoming deadline (and do nothing at
    #: all when no deadline is set).
    DEADLINE_ONLY = 0
    #: A timeout (or deadline margin) only: set the call's timeout and send it.
    TIMEOUT_ONLY = 1
    #: Anything else (retries, hedging, breaker, bulkhead, limits, faults,
    #: fallbacks): run the call through the attempt engine.
    RESILIENT = 2


@dataclass(slots=True)
class ClientPlan:
    """What a client interceptor does for one method."""

    method: str
    level: PlanLevel
    policy: MethodPolicy | None = None
    timeout: float | None = None
    margin: float = 0.0
    retry: RetryPolicy | None = None
    budget: RetryBudget | None = None
    hedging: HedgingPolicy | None = None
    breaker: CircuitBreaker | None = None
    breaker_name: str = ""
    bulkhead: Bulkhead | None = None
    bulkhead_wait: float = 0.0
    rate_limiter: KeyedRateLimiter | None = None
    fault: FaultPolicy | None = None
    allow_fault_headers: bool = False
    fallback: FallbackPolicy | None = None
    attrs: dict[str, str] = field(default_factory=dict)
    tally: Tally = field(default_factory=lambda: Tally({}))
    per_attempt_timeout: float | None = None  # the retry policy's, when it retries


@dataclass(slots=True)
class ServerPlan:
    """What a server interceptor does for one method."""

    method: str
    active: bool
    policy: Any = None
    bulkhead: Any = None
    bulkhead_wait: float = 0.0
    adaptive: Any = None
    rate_limit: Any = None  # the config; limiters are per key
    rate_key: str | None = None
    fault: Any = None
    allow_fault_headers: bool = False
    isolation: Any = None  # an isolation pool for sync servers
    attrs: dict[str, str] = field(default_factory=dict)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return getattr(obj, name, default) if obj is not None else default


def _applies(cfg: Any, side: str) -> bool:
    applies = getattr(cfg, "applies_to", None)
    return True if applies is None else bool(applies(side))


def _applies_strict(cfg: Any, side: str) -> bool:
    applies = getattr(cfg, "applies_to", None)
    return False if applies is None else bool(applies(side))


def _wait_of(cfg: Any) -> float:
    wait = _get(cfg, "max_wait", 0.0)
    return float(wait) if wait else 0.0


def compile_client(
    policy: Policy | None,
    method: str,
    target: str,
    *,
    client_faults: bool,
    client_rate_limits: bool,
    flavour: str = "sync",
) -> ClientPlan:
    """Compile ``method``'s policy for a client channel to ``target``."""
    attrs = method_attributes(method, "client", target=target)
    plan = _client_plan(policy, method, target, attrs, client_faults, client_rate_limits, flavour)
    plan.tally = attempts_tally(attrs)
    if plan.bulkhead is not None:
        watch_bulkhead(plan.bulkhead, attrs)
    return plan


def _client_plan(
    policy: Policy | None,
    method: str,
    target: str,
    attrs: dict[str, str],
    client_faults: bool,
    client_rate_limits: bool,
    flavour: str,
) -> ClientPlan:
    if policy is None:
        return ClientPlan(method, PlanLevel.DEADLINE_ONLY, attrs=attrs)
    mp: MethodPolicy = policy.for_method(method)
    timeout = mp.timeout
    margin = float(mp.deadline_margin or 0.0)
    if mp.client_is_noop and not client_faults and not client_rate_limits:
        return ClientPlan(method, PlanLevel.DEADLINE_ONLY, mp, attrs=attrs, margin=margin)
    plan = ClientPlan(method, PlanLevel.RESILIENT, mp, timeout=timeout, margin=margin, attrs=attrs)
    registry = policy.registry
    retry = mp.retry
    if retry is not None and retry.max_attempts > 1:
        plan.retry = retry
        plan.per_attempt_timeout = retry.per_attempt_timeout
    hedging = mp.hedging
    if hedging is not None and hedging.max_attempts > 1:
        plan.hedging = hedging
    if plan.retry is not None or plan.hedging is not None:
        if retry is not None:
            plan.budget = (
                policy.retry_budget(target, retry.budget) if retry.budget is not None else None
            )
        else:
            plan.budget = policy.retry_budget(target)
    service = mp.service
    cb = mp.circuit_breaker
    if cb is not None:
        key = mp.key_for(str(cb.scope), target)
        plan.breaker = registry.breaker(key, cb)
        plan.breaker_name = key
        _attach_breaker_listener(plan.breaker, key)
    bh = _get(mp, "bulkhead")
    if bh is not None and _applies(bh, "client"):
        scoped = method if str(_get(bh, "scope", "service")) == "method" else f"/{service}"
        plan.bulkhead = registry.bulkhead(f"client:{flavour}:{target}{scoped}", bh)
        plan.bulkhead_wait = _wait_of(bh)
    rl = _get(mp, "rate_limit")
    if rl is not None and (client_rate_limits or _applies_strict(rl, "client")):
        scoped = method if str(_get(rl, "scope", "service")) == "method" else f"/{service}"
        plan.rate_limiter = registry.rate_limiter(f"client:{target}{scoped}", rl)
    fault = _get(mp, "fault")
    if fault is not None and (client_faults or _applies_strict(fault, "client")):
        plan.fault = fault
        plan.allow_fault_headers = bool(_get(fault, "allow_headers", False))
    plan.fallback = _get(mp, "fallback")
    if (
        plan.retry is None
        and plan.hedging is None
        and plan.breaker is None
        and plan.bulkhead is None
        and plan.rate_limiter is None
        and plan.fault is None
        and plan.fallback is None
    ):
        plan.level = PlanLevel.TIMEOUT_ONLY
    return plan


def compile_server(
    policy: Policy | None, method: str, *, isolation: Any = None, flavour: str = "sync"
) -> ServerPlan:
    """Compile ``method``'s policy for a server."""
    attrs = method_attributes(method, "server")
    if policy is None:
        return ServerPlan(method, isolation is not None, isolation=isolation, attrs=attrs)
    mp: MethodPolicy = policy.for_method(method)
    plan = ServerPlan(method, False, mp, isolation=isolation, attrs=attrs)
    service = method.lstrip("/").partition("/")[0]
    bh = _get(mp, "bulkhead")
    if bh is not None and _applies(bh, "server"):
        scoped = method if str(_get(bh, "scope", "service")) == "method" else f"/{service}"
        plan.bulkhead = policy.registry.bulkhead(f"server:{flavour}:{scoped}", bh)
        plan.bulkhead_wait = _wait_of(bh)
    al = _get(mp, "adaptive_limit")
    if al is not None and _applies(al, "server"):
        plan.adaptive = policy.registry.adaptive_limiter(f"server:{flavour}:/{service}", al)
    rl = _get(mp, "rate_limit")
    if rl is not None and _applies(rl, "server"):
        scoped = method if str(_get(rl, "scope", "service")) == "method" else f"/{service}"
        plan.rate_limit = policy.registry.rate_limiter(f"server:{scoped}", rl)
        plan.rate_key = _get(rl, "key")
    fault = _get(mp, "fault")
    if fault is not None and _applies(fault, "server"):
        plan.fault = fault
        plan.allow_fault_headers = bool(_get(fault, "allow_headers", False))
    if plan.bulkhead is not None:
        watch_bulkhead(plan.bulkhead, attrs)
    plan.active = any(
        x is not None
        for x in (plan.bulkhead, plan.adaptive, plan.rate_limit, plan.fault, plan.isolation)
    )
    return plan


_listened: set[int] = set()
_listened_lock = threading.Lock()


def _attach_breaker_listener(breaker: Any, name: str) -> None:
    """Record the breaker's transitions as metrics, once per breaker instance."""
    add = getattr(breaker, "add_listener", None)
    if add is None:
        return
    with _listened_lock:
        if id(breaker) in _listened:
            return
        _listened.add(id(breaker))
    record = breaker_listener(name)
    # The state gauge starts at the breaker's current state; transitions move it.
    state = getattr(breaker, "state", None)
    if state is not None:
        instruments().breaker_state.add(1, {"breaker": name, "state": str(state)})

    def on_event(event: Any) -> None:
        if getattr(event, "kind", None) == "state_transition":
            record(event.from_state, event.to_state)

    add(on_event)


class PlanCache:
    """Plans by method name; compiled on first use. Safe under threads (idempotent)."""

    __slots__ = ("_compile", "_plans")

    def __init__(self, compile_fn: Any) -> None:
        self._plans: dict[str, Any] = {}
        self._compile = compile_fn

    def get(self, method: str) -> Any:
        plan = self._plans.get(method)
        if plan is None:
            plan = self._compile(method)
            # setdefault keeps the first plan when two threads race, so shared state is one.
            plan = self._plans.setdefault(method, plan)
        return plan
