"""OpenTelemetry metrics and span events shared by meshkit's adapters.

Instruments come from the OpenTelemetry *API* meter ``"meshkit"`` and are created
once, on first use; with no SDK configured the API is a no-op and each record is a
cheap method call. Attribute dicts are built once per method (see
:func:`method_attributes`) and reused, so the hot path allocates nothing.

Metrics (all counters unless noted):

``meshkit.rpc.attempts``            every attempt sent (first tries, retries and hedges);
                                    an observable counter fed by plain integers
``meshkit.rpc.retries``             attempts after the first (``kind``: retry or hedge)
``meshkit.rpc.failed_before_send``  calls refused locally (``reason``: deadline, circuit_open,
                                    bulkhead_full, rate_limited, budget, fault)
``meshkit.retry_budget.exhausted``  retries refused by the per-target retry budget
``meshkit.circuit_breaker.transitions``  state changes (``breaker``, ``from``, ``to``)
``meshkit.circuit_breaker.state``   up-down counter per (``breaker``, ``state``): 1 for the current state
``meshkit.bulkhead.in_flight``      observable up-down counter of permits held (``bulkhead``)
``meshkit.bulkhead.rejections``     calls refused by a bulkhead or adaptive limit
``meshkit.rate_limit.rejections``   calls refused by a rate limiter
``meshkit.fallbacks``               fallbacks served (``kind``)
``meshkit.faults``                  faults injected (``fault``: delay or abort)

Span events go on the current span (the one opentelemetry-instrumentation-grpc opened,
when it is installed): ``meshkit.retry``, ``meshkit.hedge``, ``meshkit.rejected``,
``meshkit.fallback``, ``meshkit.fault``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics as _otel_metrics
from opentelemetry import trace as _otel_trace

__all__ = [
    "Metrics",
    "Tally",
    "attempts_tally",
    "configure",
    "instruments",
    "method_attributes",
    "span_event",
    "watch_bulkhead",
]

Attributes = Mapping[str, str | int | float | bool]


class Metrics:
    """The meshkit instruments, created once from the ``"meshkit"`` meter."""

    def __init__(self, meter: _otel_metrics.Meter | None = None) -> None:
        m = meter or _otel_metrics.get_meter("meshkit")
        # Hot-path counts are plain integers read by callbacks at collection time, so
        # a call costs one integer increment whether or not an SDK is configured.
        self.attempts = m.create_observable_counter(
            "meshkit.rpc.attempts",
            callbacks=[_observe(_attempt_tallies)],
            unit="{attempt}",
            description="RPC attempts sent",
        )
        self.retries = m.create_counter(
            "meshkit.rpc.retries", unit="{attempt}", description="Attempts after the first"
        )
        self.failed_before_send = m.create_counter(
            "meshkit.rpc.failed_before_send",
            unit="{call}",
            description="Calls refused locally before anything was sent",
        )
        self.budget_exhausted = m.create_counter(
            "meshkit.retry_budget.exhausted",
            unit="{retry}",
            description="Retries refused by the per-target retry budget",
        )
        self.breaker_transitions = m.create_counter(
            "meshkit.circuit_breaker.transitions",
            unit="{transition}",
            description="Circuit breaker state changes",
        )
        self.breaker_state = m.create_up_down_counter(
            "meshkit.circuit_breaker.state",
            unit="1",
            description="1 for each breaker's current state",
        )
        self.bulkhead_in_flight = m.create_observable_up_down_counter(
            "meshkit.bulkhead.in_flight",
            callbacks=[_observe_bulkheads],
            unit="{call}",
            description="Bulkhead permits held",
        )
        self.bulkhead_rejections = m.create_counter(
            "meshkit.bulkhead.rejections",
            unit="{call}",
            description="Calls refused by a bulkhead or concurrency limit",
        )
        self.rate_limit_rejections = m.create_counter(
            "meshkit.rate_limit.rejections",
            unit="{call}",
            description="Calls refused by a rate limiter",
        )
        self.fallbacks = m.create_counter(
            "meshkit.fallbacks", unit="{call}", description="Fallbacks served"
        )
        self.faults = m.create_counter(
            "meshkit.faults", unit="{call}", description="Faults injected"
        )


_lock = threading.Lock()
_metrics: Metrics | None = None


class Tally:
    """A counter for the hot path: ``tally.n += 1``; reported by an observable counter.

    Increments from several threads may very rarely lose a count (no lock, on purpose:
    the hot path stays one integer add).
    """

    __slots__ = ("attrs", "n")

    def __init__(self, attrs: Attributes) -> None:
        self.attrs = attrs
        self.n = 0


_attempt_tallies: list[Tally] = []
_bulkheads: list[tuple[Any, Attributes]] = []
_registry_lock = threading.Lock()


def attempts_tally(attrs: Attributes) -> Tally:
    """A new tally of attempts for one method's plan (reported as ``meshkit.rpc.attempts``)."""
    tally = Tally(attrs)
    with _registry_lock:
        _attempt_tallies.append(tally)
    return tally


def watch_bulkhead(bulkhead: Any, attrs: Attributes) -> None:
    """Report ``bulkhead.in_flight`` as ``meshkit.bulkhead.in_flight`` (once per instance)."""
    with _registry_lock:
        if any(b is bulkhead for b, _ in _bulkheads):
            return
        _bulkheads.append((bulkhead, {**attrs, "bulkhead": getattr(bulkhead, "name", "")}))


def _observe(tallies: list[Tally]) -> Any:
    from opentelemetry.metrics import Observation

    def callback(options: Any) -> list[Any]:
        totals: dict[tuple[tuple[str, Any], ...], tuple[int, Attributes]] = {}
        for tally in list(tallies):
            key = tuple(sorted(tally.attrs.items()))
            prev = totals.get(key)
            totals[key] = (tally.n + (prev[0] if prev else 0), tally.attrs)
        return [Observation(n, dict(attrs)) for n, attrs in totals.values()]

    return callback


def _observe_bulkheads(options: Any) -> list[Any]:
    from opentelemetry.metrics import Observation

    return [Observation(int(b.in_flight), dict(a)) for b, a in list(_bulkheads)]


def instruments() -> Metrics:
    """The process-wide :class:`Metrics` (created on first call)."""
    global _metrics
    current = _metrics
    if current is None:
        with _lock:
            if _metrics is None:
                _metrics = Metrics()
            current = _metrics
    return current


def configure(meter_provider: _otel_metrics.MeterProvider | None = None) -> Metrics:
    """Record meshkit's metrics through ``meter_provider`` (None: the global one).

    Interceptors take the instruments when they are built, so call this before
    building channels and servers. Mostly for tests; applications set the global
    provider with the OpenTelemetry SDK and need nothing else.
    """
    global _metrics
    meter = meter_provider.get_meter("meshkit") if meter_provider is not None else None
    with _lock:
        _metrics = Metrics(meter)
        return _metrics


def method_attributes(method: str, side: str, **extra: str) -> dict[str, str]:
    """Attributes for one method, built once and reused for every record on that method.

    ``method`` is the full gRPC method (``/pkg.Svc/M``); it is split into OpenTelemetry's
    ``rpc.service`` and ``rpc.method``.
    """
    service, _, name = method.lstrip("/").partition("/")
    attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, "side": side}
    attrs.update(extra)
    return attrs


def span_event(name: str, attributes: Attributes | None = None) -> None:
    """Add an event to the current span, if one is recording (cheap when none is)."""
    span = _otel_trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes=dict(attributes) if attributes else None)


def breaker_listener(name: str) -> Any:
    """A transition listener that records breaker state metrics and a span event.

    Its signature is ``(old_state, new_state)`` with states as strings or enums;
    adapters register it on breakers that accept listeners.
    """
    m = instruments()

    def on_transition(old: Any, new: Any, *_: Any) -> None:
        old_name = getattr(old, "name", None) or str(old)
        new_name = getattr(new, "name", None) or str(new)
        m.breaker_transitions.add(1, {"breaker": name, "from": old_name, "to": new_name})
        m.breaker_state.add(-1, {"breaker": name, "state": old_name})
        m.breaker_state.add(1, {"breaker": name, "state": new_name})
        span_event(
            "meshkit.circuit_breaker.transition",
            {"breaker": name, "from": old_name, "to": new_name},
        )

    return on_transition
