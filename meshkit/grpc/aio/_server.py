"""The fused grpc.aio server interceptor: deadline propagation and server-side policies."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from meshkit import deadline as _deadline
from meshkit.grpc._faults import decide
from meshkit.grpc._plan import PlanCache, ServerPlan, compile_server
from meshkit.grpc._server import ServerInterceptor as _SyncInterceptor
from meshkit.grpc._server_core import Admission, Rejection, admit, bulkhead_rejection
from meshkit.grpc._status import code_of
from meshkit.telemetry import instruments

__all__ = ["AioServerInterceptor"]

_DEADLINE = _deadline._DEADLINE
_INFINITE = _deadline._INFINITE
_monotonic = time.monotonic
_rng = random.Random()


def _deadline_of(context: Any) -> float | None:
    try:
        left = context.time_remaining()
    except Exception:
        return None
    if left is None or left > _INFINITE:
        return None
    return float(_monotonic() + left)


def _code_name(context: Any) -> str:
    try:
        value = context.code()
    except Exception:
        value = None
    if value is None:
        return "UNKNOWN"
    if isinstance(value, grpc.StatusCode):
        return value.name
    if isinstance(value, int):
        for code in grpc.StatusCode:
            if code.value[0] == value:
                return code.name
    return str(value)


async def _abort(context: Any, rejection: Rejection) -> None:
    context.set_trailing_metadata(rejection.trailers)
    await context.abort(rejection.code, rejection.message)


def _reset(token: Any) -> None:
    # An async generator may be finalised in another context; the reset then fails
    # harmlessly (that context never saw the deadline).
    with contextlib.suppress(ValueError):
        _DEADLINE.reset(token)


class AioServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc,type-arg]
    """One grpc.aio server interceptor: deadline propagation plus the policy's server side.

    Handlers that are plain functions (run by grpc.aio's migration thread pool) get the
    sync wrappers.
    """

    def __init__(self, policy: Any = None) -> None:
        self._policy = policy
        self._plans = PlanCache(self._compile)
        self._wrapped: dict[str, tuple[Any, Any]] = {}
        self._m = instruments()
        self._sync = _SyncInterceptor(policy)

    def _compile(self, method: str) -> ServerPlan:
        return compile_server(self._policy, method, flavour="aio")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(self._plans.get(method), handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, plan: ServerPlan, handler: Any) -> Any:
        for field in ("unary_unary", "stream_unary", "unary_stream", "stream_stream"):
            behavior = getattr(handler, field)
            if behavior is None:
                continue
            if inspect.isasyncgenfunction(behavior):
                return handler._replace(**{field: self._async_gen(plan, behavior)})
            if inspect.iscoroutinefunction(behavior):
                return handler._replace(**{field: self._coroutine(plan, behavior)})
            # A sync handler run on the migration thread pool.
            return self._sync._wrap(self._sync._plans.get(plan.method), handler)
        return handler

    async def _admit(self, plan: ServerPlan, context: Any, deadline: float | None) -> Admission:
        m = self._m
        adm = admit(plan, context, m)
        if isinstance(adm, Rejection):
            await _abort(context, adm)
        assert isinstance(adm, Admission)
        try:
            if plan.fault is not None:
                metadata = context.invocation_metadata() if plan.allow_fault_headers else None
                decision = decide(plan.fault, plan.allow_fault_headers, metadata, _rng)
                if decision is not None:
                    delay = decision.delay
                    if deadline is not None:
                        delay = min(delay, max(0.0, deadline - _monotonic()))
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if decision.abort_code is not None:
                        await context.abort(
                            code_of(decision.abort_code),
                            f"fault injected: abort {decision.abort_code}",
                        )
            bulkhead = plan.bulkhead
            if bulkhead is not None:
                if plan.bulkhead_wait > 0:
                    left = None if deadline is None else max(0.0, deadline - _monotonic())
                    ok = await bulkhead.acquire_async(left)
                else:
                    ok = bulkhead.try_acquire()
                if not ok:
                    m.bulkhead_rejections.add(1, plan.attrs)
                    await _abort(context, bulkhead_rejection(plan))
                adm.bulkhead = bulkhead
        except BaseException:
            adm.done("RESOURCE_EXHAUSTED")
            raise
        return adm

    def _coroutine(self, plan: ServerPlan, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not plan.active:

            async def deadline_only(request: Any, context: Any) -> Any:
                token = _DEADLINE.set(_deadline_of(context))
                try:
                    return await behavior(request, context)
                finally:
                    _reset(token)

            return deadline_only

        quick = plan.fault is None and plan.bulkhead_wait <= 0
        bulkhead = plan.bulkhead
        m = self._m

        async def guarded(request: Any, context: Any) -> Any:
            deadline = _deadline_of(context)
            token = _DEADLINE.set(deadline)
            try:
                if quick:
                    # No fault to wait out, no bulkhead queue: admit without a coroutine.
                    adm = admit(plan, context, m)
                    if isinstance(adm, Rejection):
                        await _abort(context, adm)
                    assert isinstance(adm, Admission)
                    if bulkhead is not None:
                        if not bulkhead.try_acquire():
                            adm.done("RESOURCE_EXHAUSTED")
                            m.bulkhead_rejections.add(1, plan.attrs)
                            await _abort(context, bulkhead_rejection(plan))
                        adm.bulkhead = bulkhead
                else:
                    adm = await self._admit(plan, context, deadline)
                code = "OK"
                try:
                    return await behavior(request, context)
                except BaseException:
                    code = _code_name(context)
                    raise
                finally:
                    adm.done(code)
            finally:
                _reset(token)

        return guarded

    def _async_gen(self, plan: ServerPlan, behavior: Callable[..., Any]) -> Callable[..., Any]:
        active = plan.active

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            deadline = _deadline_of(context)
            token = _DEADLINE.set(deadline)
            try:
                adm = await self._admit(plan, context, deadline) if active else None
                code = "OK"
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException:
                    code = _code_name(context)
                    raise
                finally:
                    if adm is not None:
                        adm.done(code)
            finally:
                _reset(token)

        return streaming
