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
from meshkit.grpc._server_core import (
    Admission,
    Rejection,
    admit,
    admit_now,
    bulkhead_rejection,
    code_name,
    deadline_of,
    with_behavior,
    wrapped_handler,
)
from meshkit.grpc._status import code_of
from meshkit.telemetry import instruments

__all__ = ["AioServerInterceptor"]

_DEADLINE = _deadline._DEADLINE
_monotonic = time.monotonic
_rng = random.Random()


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
        return wrapped_handler(
            self._wrapped, handler_call_details.method, handler, self._wrap_method
        )

    def _wrap_method(self, method: str, handler: Any) -> Any:
        return self._wrap(self._plans.get(method), handler)

    def _wrap(self, plan: ServerPlan, handler: Any) -> Any:
        for field in ("unary_unary", "stream_unary", "unary_stream", "stream_stream"):
            behavior = getattr(handler, field)
            if behavior is None:
                continue
            if inspect.isasyncgenfunction(behavior):
                return with_behavior(handler, field, self._async_gen(plan, behavior))
            if inspect.iscoroutinefunction(behavior):
                return with_behavior(handler, field, self._coroutine(plan, behavior))
            # A sync handler run on the migration thread pool.
            return self._sync.wrap_handler(plan.method, handler)
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
                token = _DEADLINE.set(deadline_of(context))
                try:
                    return await behavior(request, context)
                finally:
                    _reset(token)

            return deadline_only

        bulkhead = plan.bulkhead
        m = self._m
        if plan.fault is None and plan.bulkhead_wait <= 0:
            if plan.rate_limit is None and plan.adaptive is None and bulkhead is not None:
                # Only a bulkhead: a permit or a refusal, nothing allocated.

                async def bulkheaded(request: Any, context: Any) -> Any:
                    token = _DEADLINE.set(deadline_of(context))
                    try:
                        if not bulkhead.try_acquire():
                            m.bulkhead_rejections.add(1, plan.attrs)
                            await _abort(context, bulkhead_rejection(plan))
                        try:
                            return await behavior(request, context)
                        finally:
                            bulkhead.release()
                    finally:
                        _reset(token)

                return bulkheaded

            async def admitted(request: Any, context: Any) -> Any:
                # No fault to wait out, no bulkhead queue: admit without a coroutine.
                token = _DEADLINE.set(deadline_of(context))
                try:
                    adm = admit_now(plan, context, m)
                    if isinstance(adm, Rejection):
                        await _abort(context, adm)
                    assert isinstance(adm, Admission)
                    code = "OK"
                    try:
                        return await behavior(request, context)
                    except BaseException:
                        code = code_name(context)
                        raise
                    finally:
                        adm.done(code)
                finally:
                    _reset(token)

            return admitted

        async def guarded(request: Any, context: Any) -> Any:
            deadline = deadline_of(context)
            token = _DEADLINE.set(deadline)
            try:
                adm = await self._admit(plan, context, deadline)
                code = "OK"
                try:
                    return await behavior(request, context)
                except BaseException:
                    code = code_name(context)
                    raise
                finally:
                    adm.done(code)
            finally:
                _reset(token)

        return guarded

    def _async_gen(self, plan: ServerPlan, behavior: Callable[..., Any]) -> Callable[..., Any]:
        active = plan.active

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            deadline = deadline_of(context)
            token = _DEADLINE.set(deadline)
            try:
                adm = await self._admit(plan, context, deadline) if active else None
                code = "OK"
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException:
                    code = code_name(context)
                    raise
                finally:
                    if adm is not None:
                        adm.done(code)
            finally:
                _reset(token)

        return streaming
