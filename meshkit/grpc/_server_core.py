"""Admission decisions shared by the sync and asyncio server interceptors."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from meshkit.deadline import _INFINITE
from meshkit.grpc._plan import ServerPlan
from meshkit.grpc._status import metadata_value, rich_trailers
from meshkit.telemetry import Metrics, span_event

__all__ = [
    "Admission",
    "Rejection",
    "admit",
    "admit_now",
    "code_name",
    "deadline_of",
    "rate_key",
    "with_behavior",
    "wrapped_handler",
]

_monotonic = time.monotonic
_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
_OVERLOAD_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"})

#: Pushback sent with a bulkhead or concurrency-limit rejection: long enough for a
#: call in flight to finish on a loaded server, short enough not to idle a client.
BULKHEAD_PUSHBACK = 0.05


def timeout_slack(seconds: float) -> float:
    """How much later than the caller's the deadline a server reads may be.

    grpc core sends the timeout (``grpc-timeout``) with at most a few significant
    digits, rounded up: 1 ms steps below 1 s, 10 ms up to 10 s, 100 ms up to 100 s, 1 s
    up to 1000 s, and so on; and the server's deadline lands up to one more step late
    (measured with grpcio 1.85 on sync and asyncio servers: a 2 s budget reads up to
    2.010 s, 200 s up to 201.0 s). Two steps of the value's magnitude cover both.
    """
    step = 0.001
    bound = 1.0
    while seconds >= bound and step < 3600.0:
        step *= 10.0
        bound *= 10.0
    return 2.0 * step


def deadline_of(context: Any) -> float | None:
    """The incoming call's deadline as a ``time.monotonic()`` instant, or None.

    It is moved earlier by :func:`timeout_slack`, so the deadline a handler (and every
    call it makes) sees is never later than its caller's: without it a 2 s budget
    grows by about 10 ms at each hop.
    """
    try:
        left = context.time_remaining()
    except Exception:
        return None
    if left is None or left > _INFINITE:
        return None
    left = float(left)
    return _monotonic() + max(0.0, left - timeout_slack(left))


def wrapped_handler(
    cache: dict[str, tuple[Any, Any]],
    method: str,
    handler: Any,
    wrap: Callable[[str, Any], Any],
) -> Any:
    """``handler`` wrapped by ``wrap(method, handler)``, once per method: grpcio hands the
    same handler object for every call, so the wrapper is reused until it changes."""
    cached = cache.get(method)
    if cached is not None and cached[0] is handler:
        return cached[1]
    wrapped = wrap(method, handler)
    cache[method] = (handler, wrapped)
    return wrapped


_HANDLER_FACTORIES: dict[str, Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def with_behavior(handler: Any, kind: str, behavior: Any) -> grpc.RpcMethodHandler[Any, Any]:
    """A method handler like ``handler`` whose ``kind`` (``"unary_unary"`` ...) behavior
    is ``behavior``: built with grpcio's public constructors, so nothing depends on how
    grpcio represents a handler."""
    return _HANDLER_FACTORIES[kind](
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class Rejection:
    """A refused call: the status, message and trailers to answer with."""

    __slots__ = ("code", "message", "trailers")

    def __init__(self, code: grpc.StatusCode, message: str, pushback: float | None) -> None:
        self.code = code
        self.message = message
        self.trailers = rich_trailers(code, message, pushback=pushback)


class Admission:
    """Permits held by an admitted call; :meth:`done` gives them back exactly once."""

    __slots__ = ("_done", "bulkhead", "m", "plan", "token")

    def __init__(self, plan: ServerPlan, m: Metrics) -> None:
        self.plan = plan
        self.m = m
        self.token: Any = None
        self.bulkhead: Any = None
        self._done = False

    def done(self, code: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        if self.bulkhead is not None:
            self.bulkhead.release()
        token = self.token
        if token is not None:
            if code is None or code == "OK":
                token.success()
            elif code in _OVERLOAD_CODES:
                token.dropped()
            else:
                token.ignore()


def rate_key(plan: ServerPlan, metadata: Any, context: Any) -> str:
    """The caller key for the rate limiter: a header value, the peer, or "" (one bucket)."""
    key = plan.rate_key
    if not key or key == "method":
        return ""
    if key == "peer":
        try:
            return str(context.peer())
        except Exception:
            return ""
    if key.startswith("metadata:"):
        value = metadata_value(metadata, key[len("metadata:") :].lower())
        if value is None:
            return ""
        return value.decode("latin-1") if isinstance(value, bytes) else value
    return ""


def admit(plan: ServerPlan, context: Any, m: Metrics) -> Admission | Rejection:
    """Rate limit and adaptive limit for one incoming call (the bulkhead comes after faults)."""
    limiter = plan.rate_limit
    if limiter is not None:
        key = plan.rate_key
        metadata = context.invocation_metadata() if key and key.startswith("metadata:") else None
        wait = limiter.try_acquire(rate_key(plan, metadata, context))
        if wait > 0:
            m.rate_limit_rejections.add(1, plan.attrs)
            span_event("meshkit.rejected", {"reason": "rate_limited"})
            return Rejection(
                _RESOURCE_EXHAUSTED,
                f"rate limit exceeded for {plan.method}; retry in {wait:.3f}s",
                wait if wait != float("inf") else None,
            )
    adm = Admission(plan, m)
    if plan.adaptive is not None:
        token = plan.adaptive.try_acquire()
        if token is None:
            m.bulkhead_rejections.add(1, plan.attrs)
            span_event("meshkit.rejected", {"reason": "concurrency_limit"})
            return Rejection(
                _RESOURCE_EXHAUSTED,
                f"concurrency limit {plan.adaptive.limit} reached for {plan.method}",
                BULKHEAD_PUSHBACK,
            )
        adm.token = token
    return adm


def bulkhead_rejection(plan: ServerPlan) -> Rejection:
    """The answer when the server bulkhead has no permit."""
    plan_bh = plan.bulkhead
    span_event("meshkit.rejected", {"reason": "bulkhead_full"})
    return Rejection(
        _RESOURCE_EXHAUSTED,
        f"bulkhead {plan_bh.name or plan.method!r} is full "
        f"({plan_bh.config.max_concurrent} calls in flight)",
        BULKHEAD_PUSHBACK,
    )


def admit_now(plan: ServerPlan, context: Any, m: Metrics) -> Admission | Rejection:
    """The whole admission when nothing needs waiting for (no fault, no bulkhead queue):
    rate limit, adaptive limit, then a bulkhead permit if one is free."""
    adm = admit(plan, context, m)
    bulkhead = plan.bulkhead
    if bulkhead is not None and isinstance(adm, Admission):
        if not bulkhead.try_acquire():
            adm.done("RESOURCE_EXHAUSTED")
            m.bulkhead_rejections.add(1, plan.attrs)
            return bulkhead_rejection(plan)
        adm.bulkhead = bulkhead
    return adm


def code_name(context: Any) -> str:
    """The status code name a handler's context ended with (for the adaptive limit)."""
    code = getattr(context, "code", None)
    try:
        value = code() if callable(code) else None
    except Exception:
        value = None
    if value is None:
        return "UNKNOWN"
    if isinstance(value, grpc.StatusCode):
        return value.name
    if isinstance(value, int):
        for status in grpc.StatusCode:
            if status.value[0] == value:
                return status.name
    return str(value)
