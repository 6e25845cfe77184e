"""Fault injection: delays and aborts by percentage, from config or Envoy's headers.

With ``allow_headers`` the caller may ask for faults with Envoy's fault filter
vocabulary (request metadata):

* ``x-envoy-fault-delay-request``: delay in milliseconds;
* ``x-envoy-fault-delay-request-percentage``: percent of requests to delay;
* ``x-envoy-fault-abort-grpc-request``: numeric gRPC status to abort with;
* ``x-envoy-fault-abort-request``: HTTP status to abort with (mapped to a gRPC
  code; it wins over the gRPC header, as in Envoy);
* ``x-envoy-fault-abort-request-percentage``: percent of requests to abort.

A percentage header is read only with its fault header; without it, 100 percent.
Unlike Envoy (which caps it by the configured percentage), meshkit takes the header's
percentage as given, clamped to [0, 100]: enabling headers is the opt-in.
Malformed header values are ignored (no fault), never an error for the caller.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from meshkit.resilience.bulkhead import Side
from meshkit.resilience.codes import code_from_http_status, code_from_number

_log = logging.getLogger("meshkit.resilience.fault")
_RNG = random.Random()

DELAY_HEADER = "x-envoy-fault-delay-request"
DELAY_PERCENT_HEADER = "x-envoy-fault-delay-request-percentage"
ABORT_GRPC_HEADER = "x-envoy-fault-abort-grpc-request"
ABORT_HTTP_HEADER = "x-envoy-fault-abort-request"
ABORT_PERCENT_HEADER = "x-envoy-fault-abort-request-percentage"

FAULT_HEADERS: frozenset[str] = frozenset(
    {DELAY_HEADER, DELAY_PERCENT_HEADER, ABORT_GRPC_HEADER, ABORT_HTTP_HEADER, ABORT_PERCENT_HEADER}
)

Headers = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What to do to one call: wait ``delay`` seconds, then abort with ``abort_code``
    (a status code name) or proceed (``None``)."""

    delay: float = 0.0
    abort_code: str | None = None

    @property
    def is_noop(self) -> bool:
        """No delay and no abort."""
        return self.delay <= 0 and self.abort_code is None


NO_FAULT = FaultDecision()


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """Delay ``delay_percent``% of calls by ``delay`` s; abort ``abort_percent``% with
    ``abort_code``. ``allow_headers`` lets request metadata ask for faults.
    ``side``: where the adapter injects (default ``server``)."""

    delay_percent: float = 0.0
    delay: float = 0.0
    abort_percent: float = 0.0
    abort_code: str = "UNAVAILABLE"
    allow_headers: bool = False
    side: Side = Side.SERVER

    def applies_to(self, side: str) -> bool:
        """Whether the adapter on ``side`` (``"client"``/``"server"``) applies it."""
        return self.side is Side.BOTH or self.side.value == side

    def decide(self, rng: random.Random | None = None) -> FaultDecision:
        """Roll the dice for one call (delay and abort are rolled independently)."""
        r = rng if rng is not None else _RNG
        delay = 0.0
        if self.delay_percent > 0 and self.delay > 0 and r.random() * 100 < self.delay_percent:
            delay = self.delay
        abort = None
        if self.abort_percent > 0 and r.random() * 100 < self.abort_percent:
            abort = self.abort_code
        if delay == 0.0 and abort is None:
            return NO_FAULT
        return FaultDecision(delay, abort)

    def from_headers(self, headers: Headers) -> FaultPolicy:
        """This policy overridden by the request's ``x-envoy-fault-*`` metadata.

        Returns ``self`` unchanged when ``allow_headers`` is false or no fault header
        is present. A fault given by headers replaces that fault (delay or abort)
        of the configured policy.
        """
        if not self.allow_headers:
            return self
        found = _fault_headers(headers)
        if not found:
            return self
        policy = self
        delay_ms = _number(found.get(DELAY_HEADER))
        if delay_ms is not None and delay_ms >= 0:
            pct = _percent(found.get(DELAY_PERCENT_HEADER))
            policy = replace(policy, delay=delay_ms / 1000.0, delay_percent=pct)
        code: str | None = None
        http_status = _number(found.get(ABORT_HTTP_HEADER))
        grpc_status = _number(found.get(ABORT_GRPC_HEADER))
        if http_status is not None and 200 <= http_status < 600:
            code = code_from_http_status(int(http_status))
        elif grpc_status is not None and grpc_status >= 0:
            code = code_from_number(int(grpc_status))
        if code == "OK":
            code = None
        if code is not None:
            pct = _percent(found.get(ABORT_PERCENT_HEADER))
            policy = replace(policy, abort_code=code, abort_percent=pct)
        return policy


def _fault_headers(headers: Headers) -> dict[str, str]:
    items: Iterable[tuple[str, str | bytes]]
    items = headers.items() if isinstance(headers, Mapping) else headers
    found: dict[str, str] = {}
    for key, value in items:
        k = key.lower()
        if k in FAULT_HEADERS:
            found[k] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return found


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        _log.debug("ignoring a malformed fault header value %r", text)
        return None
    return value if value == value else None  # NaN is malformed too


def _percent(text: str | None) -> float:
    value = _number(text)
    if value is None:
        return 100.0
    return min(100.0, max(0.0, value))
