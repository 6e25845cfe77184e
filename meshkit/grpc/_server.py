"""The fused sync server interceptor: deadline propagation and server-side policies.

For each call: record the incoming deadline (for the handler's whole run, streaming
included) -> rate limit -> fault -> adaptive concurrency limit -> bulkhead ->
(optional) per-service thread-pool isolation -> the handler.
"""

from __future__ import annotations

import contextvars
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from typing import Any

import grpc

from meshkit import deadline as _deadline
from meshkit.grpc._faults import decide
from meshkit.grpc._plan import PlanCache, ServerPlan, compile_server
from meshkit.grpc._server_core import (
    BULKHEAD_PUSHBACK,
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

__all__ = ["IsolationPool", "ServerInterceptor"]

_log = logging.getLogger("meshkit.grpc")
_DEADLINE = _deadline._DEADLINE
_monotonic = time.monotonic
_rng = random.Random()


class IsolationPool:
    """A bounded thread pool for one service's handlers (one pool per service, so a slow service cannot starve the others).

    grpcio gives every service the server's one thread pool, and an interceptor
    cannot change that. The isolation pool runs the service's unary-response handlers
    on ``workers`` threads of its own; the grpcio worker only waits for the result, up
    to the call's deadline. Guarantees:

    * at most ``workers + queue`` calls of the service are admitted at once; the next
      one is refused at once with RESOURCE_EXHAUSTED and ``grpc-retry-pushback-ms``;
    * a grpcio worker is held by this service only while a call of it is admitted, and
      no longer than that call's deadline: a handler that hangs past its deadline keeps
      one of the service's *own* threads, never a grpcio worker;
    * other services keep the rest of grpcio's pool.

    Streaming-response handlers are admitted by the same count but run on the grpcio
    worker (they yield from it), so only the first guarantee holds for them.
    """

    def __init__(self, name: str, workers: int, queue: int = 0) -> None:
        if workers < 1:
            raise ValueError(f"isolation pool {name!r}: workers must be >= 1, got {workers}")
        self.name = name
        self.workers = workers
        self.capacity = workers + max(0, queue)
        self._executor = futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"meshkit-{name}"
        )
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Calls admitted and not finished (running or queued)."""
        return self._admitted

    def try_enter(self) -> bool:
        with self._lock:
            if self._admitted >= self.capacity:
                return False
            self._admitted += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._admitted -= 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> futures.Future[Any]:
        """Run ``fn`` on the pool in a copy of the caller's context (deadline included)."""
        ctx = contextvars.copy_context()
        fut = self._executor.submit(ctx.run, fn, *args)
        fut.add_done_callback(lambda _f: self.leave())
        return fut

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _abort(context: Any, rejection: Rejection) -> None:
    context.set_trailing_metadata(rejection.trailers)
    context.abort(rejection.code, rejection.message)


class ServerInterceptor(grpc.ServerInterceptor):  # type: ignore[misc,type-arg]
    """One server interceptor: deadline propagation plus the policy's server side.

    ``isolate`` maps a service name (``shop.v1.PaymentService``) to a number of
    threads (or an :class:`IsolationPool`) for per-service isolation.
    """

    def __init__(
        self, policy: Any = None, *, isolate: Mapping[str, int | IsolationPool] | None = None
    ) -> None:
        self._policy = policy
        self._pools: dict[str, IsolationPool] = {}
        for service, spec in (isolate or {}).items():
            self._pools[service] = (
                spec if isinstance(spec, IsolationPool) else IsolationPool(service, int(spec))
            )
        self._plans = PlanCache(self._compile)
        self._wrapped: dict[str, tuple[Any, Any]] = {}
        self._m = instruments()

    def _compile(self, method: str) -> ServerPlan:
        service = method.lstrip("/").partition("/")[0]
        return compile_server(
            self._policy, method, isolation=self._pools.get(service), flavour="sync"
        )

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return wrapped_handler(
            self._wrapped, handler_call_details.method, handler, self.wrap_handler
        )

    def wrap_handler(self, method: str, handler: Any) -> Any:
        """``handler`` (a sync ``grpc.RpcMethodHandler`` of ``method``) under its compiled
        server plan; the aio interceptor uses it for sync handlers on the thread pool."""
        return self._wrap(self._plans.get(method), handler)

    def _wrap(self, plan: ServerPlan, handler: Any) -> Any:
        if handler.unary_unary is not None:
            return with_behavior(handler, "unary_unary", self._unary(plan, handler.unary_unary))
        if handler.stream_unary is not None:
            return with_behavior(handler, "stream_unary", self._unary(plan, handler.stream_unary))
        if handler.unary_stream is not None:
            behavior = self._streaming(plan, handler.unary_stream)
            return with_behavior(handler, "unary_stream", behavior)
        if handler.stream_stream is not None:
            behavior = self._streaming(plan, handler.stream_stream)
            return with_behavior(handler, "stream_stream", behavior)
        return handler

    # -- admission ----------------------------------------------------------------------

    def _admit(self, plan: ServerPlan, context: Any, deadline: float | None) -> Admission:
        """Apply the policies; aborts the call (raises) on a rejection."""
        m = self._m
        adm = admit(plan, context, m)
        if isinstance(adm, Rejection):
            _abort(context, adm)
        assert isinstance(adm, Admission)
        try:
            if plan.fault is not None:
                metadata = context.invocation_metadata() if plan.allow_fault_headers else None
                decision = decide(plan.fault, plan.allow_fault_headers, metadata, _rng)
                if decision is not None:
                    delay = decision.delay
                    if deadline is not None:
                        delay = min(delay, max(0.0, deadline - _monotonic()))
                    end = _monotonic() + delay
                    while context.is_active() and _monotonic() < end:
                        time.sleep(min(0.02, max(0.0, end - _monotonic())))
                    if decision.abort_code is not None:
                        code = code_of(decision.abort_code)
                        context.abort(code, f"fault injected: abort {decision.abort_code}")
            bulkhead = plan.bulkhead
            if bulkhead is not None:
                if plan.bulkhead_wait > 0:
                    left = None if deadline is None else max(0.0, deadline - _monotonic())
                    ok = bulkhead.acquire(left)
                else:
                    ok = bulkhead.try_acquire()
                if not ok:
                    m.bulkhead_rejections.add(1, plan.attrs)
                    _abort(context, bulkhead_rejection(plan))
                adm.bulkhead = bulkhead
        except BaseException:
            adm.done("RESOURCE_EXHAUSTED")
            raise
        return adm

    # -- unary responses ------------------------------------------------------------------

    def _unary(self, plan: ServerPlan, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not plan.active:

            def deadline_only(request: Any, context: Any) -> Any:
                token = _DEADLINE.set(deadline_of(context))
                try:
                    return behavior(request, context)
                finally:
                    _DEADLINE.reset(token)

            return deadline_only

        pool = plan.isolation
        bulkhead = plan.bulkhead
        m = self._m
        # No fault delay to sleep out and no bulkhead queue to wait in: admission is
        # a few non-blocking checks (admit_now), with no deadline to watch.
        never_waits = plan.fault is None and plan.bulkhead_wait <= 0
        if never_waits and pool is None and plan.rate_limit is None and plan.adaptive is None:
            assert bulkhead is not None  # the plan is active
            # Only a bulkhead: a permit or a refusal, nothing allocated.

            def bulkheaded(request: Any, context: Any) -> Any:
                token = _DEADLINE.set(deadline_of(context))
                try:
                    if not bulkhead.try_acquire():
                        m.bulkhead_rejections.add(1, plan.attrs)
                        _abort(context, bulkhead_rejection(plan))
                    try:
                        return behavior(request, context)
                    finally:
                        bulkhead.release()
                finally:
                    _DEADLINE.reset(token)

            return bulkheaded

        def guarded(request: Any, context: Any) -> Any:
            deadline = deadline_of(context)
            token = _DEADLINE.set(deadline)
            try:
                if never_waits:
                    adm = admit_now(plan, context, m)
                    if isinstance(adm, Rejection):
                        _abort(context, adm)
                    assert isinstance(adm, Admission)
                else:
                    adm = self._admit(plan, context, deadline)
                code = "OK"
                try:
                    if pool is None:
                        return behavior(request, context)
                    return self._isolated(pool, plan, behavior, request, context, deadline)
                except BaseException:
                    code = code_name(context)
                    raise
                finally:
                    adm.done(code)
            finally:
                _DEADLINE.reset(token)

        return guarded

    def _isolated(
        self,
        pool: IsolationPool,
        plan: ServerPlan,
        behavior: Callable[..., Any],
        request: Any,
        context: Any,
        deadline: float | None,
    ) -> Any:
        if not pool.try_enter():
            self._m.bulkhead_rejections.add(1, plan.attrs)
            _abort(
                context,
                Rejection(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"isolation pool {pool.name!r} is full ({pool.capacity} calls admitted)",
                    BULKHEAD_PUSHBACK,
                ),
            )
        fut = pool.submit(behavior, request, context)
        left = None if deadline is None else max(0.0, deadline - _monotonic())
        try:
            return fut.result(timeout=left)
        except futures.TimeoutError:
            fut.cancel()
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{plan.method} did not finish before its deadline",
            )

    # -- streaming responses ---------------------------------------------------------------

    def _streaming(self, plan: ServerPlan, behavior: Callable[..., Any]) -> Callable[..., Any]:
        active = plan.active
        pool = plan.isolation

        def streaming(request: Any, context: Any) -> Iterator[Any]:
            deadline = deadline_of(context)
            token = _DEADLINE.set(deadline)
            adm: Admission | None = None
            entered = False
            try:
                if active:
                    adm = self._admit(plan, context, deadline)
                    if pool is not None:
                        if not pool.try_enter():
                            adm.done("RESOURCE_EXHAUSTED")
                            self._m.bulkhead_rejections.add(1, plan.attrs)
                            _abort(
                                context,
                                Rejection(
                                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"isolation pool {pool.name!r} is full",
                                    BULKHEAD_PUSHBACK,
                                ),
                            )
                        entered = True
                try:
                    iterator = behavior(request, context)
                except BaseException:
                    if adm is not None:
                        adm.done(code_name(context))
                    if entered and pool is not None:
                        pool.leave()
                    raise
            finally:
                _DEADLINE.reset(token)
            if adm is None and not entered:
                return _with_deadline(iterator, deadline, None, context)
            finish = _Once(adm, pool if entered else None, context)
            context.add_callback(finish)
            return _with_deadline(iterator, deadline, finish, context)

        return streaming


class _Once:
    """Release a streaming call's permits once, at its end or its cancellation."""

    __slots__ = ("_adm", "_context", "_done", "_lock", "_pool")

    def __init__(self, adm: Admission | None, pool: IsolationPool | None, context: Any) -> None:
        self._adm = adm
        self._pool = pool
        self._context = context
        self._done = False
        self._lock = threading.Lock()

    def __call__(self, code: str | None = None) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        if self._adm is not None:
            self._adm.done(code or code_name(self._context))
        if self._pool is not None:
            self._pool.leave()


def _with_deadline(
    iterator: Any, deadline: float | None, finish: _Once | None, context: Any
) -> Iterator[Any]:
    """Iterate a sync response generator with the deadline set around each ``next()``."""
    it = iter(iterator)
    try:
        while True:
            token = _DEADLINE.set(deadline)
            try:
                item = next(it)
            except StopIteration:
                if finish is not None:
                    finish("OK")
                return
            finally:
                _DEADLINE.reset(token)
            yield item
    finally:
        if finish is not None:
            finish()
