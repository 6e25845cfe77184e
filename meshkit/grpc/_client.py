"""The fused sync client interceptor: every client policy in one grpcio interceptor.

Order of the chain for one call (the go-grpc-middleware order, outermost first):
deadline -> client fault -> client rate limit -> bulkhead -> hedging or retry loop
(each attempt: circuit breaker -> send) -> fallback on rejection or exhaustion.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from meshkit import deadline as _deadline
from meshkit._compat import grpcio as _grpcio
from meshkit.errors import DeadlineExceededError, MeshkitError
from meshkit.grpc._core import (
    add_attempt_header,
    begin_attempt,
    breaker_rejection,
    bulkhead_rejection,
    exhausted_trigger,
    fallback_kind,
    fallback_served,
    rate_rejection,
    refusal_trigger,
    retry_delay,
)
from meshkit.grpc._fallback import FallbackError, FallbackSupport, method_types
from meshkit.grpc._faults import client_fault
from meshkit.grpc._plan import FULL, PASS, ClientPlan, PlanCache, compile_client
from meshkit.grpc._replay import Replay
from meshkit.grpc._status import LocalRpcError, code_of, error_status, pushback_metadata
from meshkit.telemetry import instruments, span_event

__all__ = ["ClientInterceptor"]

_log = logging.getLogger("meshkit.grpc")
_DEADLINE = _deadline._DEADLINE
_monotonic = time.monotonic
_OK = grpc.StatusCode.OK
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
_rng = random.Random()
_NAMES = {code: code.name for code in grpc.StatusCode}


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """Call details with the fields grpcio reads."""


def _details(d: Any, timeout: float | None, metadata: Any = None) -> _Details:
    try:
        return _Details(
            d.method,
            timeout,
            d.metadata if metadata is None else metadata,
            d.credentials,
            d.wait_for_ready,
            d.compression,
        )
    except AttributeError:  # details from another interceptor may lack some fields
        pass
    return _Details(
        d.method,
        timeout,
        d.metadata if metadata is None else metadata,
        getattr(d, "credentials", None),
        getattr(d, "wait_for_ready", None),
        getattr(d, "compression", None),
    )


class _Value(grpc.Call, grpc.Future):  # type: ignore[misc,type-arg]
    """A locally produced successful outcome (a fallback value)."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def initial_metadata(self) -> Any:
        return ()

    def trailing_metadata(self) -> Any:
        return ()

    def code(self) -> grpc.StatusCode:
        return _OK

    def details(self) -> str:
        return ""

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:  # type: ignore[override]
        return None

    def traceback(self, timeout: float | None = None) -> Any:
        return None

    def add_done_callback(self, fn: Any) -> None:
        fn(self)


def _code(outcome: Any) -> grpc.StatusCode:
    try:
        code = outcome.code()
    except Exception:  # a local failure outcome without a code
        return grpc.StatusCode.UNKNOWN
    return code if code is not None else grpc.StatusCode.UNKNOWN


def _trailers(outcome: Any) -> Any:
    try:
        return outcome.trailing_metadata()
    except Exception:
        return None


class ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """One interceptor applying a :class:`~meshkit.Policy` to every call of a channel.

    ``target`` keys the shared per-target state (breakers, retry budgets, bulkheads);
    several channels to the same target share it. ``alternate_channel`` builds the
    channel for ``kind: alternate`` fallbacks (default: insecure).
    """

    def __init__(
        self,
        policy: Any,
        target: str | None = None,
        *,
        client_faults: bool = False,
        client_rate_limits: bool = False,
        alternate_channel: Callable[[str], grpc.Channel] | None = None,
    ) -> None:
        self._policy = policy
        self._target = target or "default"
        self._client_faults = client_faults
        self._client_rate_limits = client_rate_limits
        self._plans = PlanCache(self._compile)
        self._m = instruments()
        self._fallbacks = FallbackSupport(getattr(policy, "last_good_cache", None))
        self._alternate_factory = alternate_channel or grpc.insecure_channel
        self._alternates: dict[str, grpc.Channel] = {}
        self._executor: futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _compile(self, method: str) -> ClientPlan:
        return compile_client(
            self._policy,
            method,
            self._target,
            client_faults=self._client_faults,
            client_rate_limits=self._client_rate_limits,
            flavour="sync",
        )

    def plan(self, method: str) -> ClientPlan:
        """The compiled plan for ``method`` (for tests and introspection)."""
        plan: ClientPlan = self._plans.get(method)
        return plan

    # -- entry points ------------------------------------------------------------------

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        plan: ClientPlan = self._plans.get(details.method)
        level = plan.level
        if level == PASS and _DEADLINE.get() is None:
            return continuation(details, request)
        try:
            timeout = _deadline.compute_timeout(details.timeout, plan.timeout, plan.margin)
        except DeadlineExceededError as exc:
            return self._refused(plan, exc, request, details, None)
        if level != FULL:
            if timeout != details.timeout:
                details = _details(details, timeout)
            return continuation(details, request)
        return self._call(plan, continuation, details, request, None, timeout)

    def _call(
        self,
        plan: ClientPlan,
        continuation: Any,
        details: Any,
        request: Any,
        replay: Replay | None,
        timeout: float | None,
    ) -> Any:
        """A unary-response call: admit it, send the first attempt from here, and hand a
        failed one to the retry loop. A first attempt still in flight (the caller used
        ``.future()``) is not waited for: the rest runs when it ends (:meth:`_defer`)."""
        start = _monotonic()
        deadline = start + timeout if timeout is not None else None
        bulkhead = plan.bulkhead
        if not plan.quick:
            refused = self._admit(plan, details, request, deadline)
            if refused is not None:
                return refused
            if plan.hedging is not None and replay is None:
                try:
                    return self._hedged(plan, continuation, details, request, deadline)
                finally:
                    if bulkhead is not None:
                        bulkhead.release()
        elif bulkhead is not None and not bulkhead.try_acquire():
            self._m.bulkhead_rejections.add(1, plan.attrs)
            full = bulkhead_rejection(bulkhead.name or plan.method, bulkhead.config.max_concurrent)
            return self._refused(plan, full, request, details, deadline)
        deferred = False
        try:
            if plan.budget is not None:
                plan.budget.record_call()
            breaker = plan.breaker
            if breaker is not None and not breaker.try_acquire():
                return self._refused(plan, breaker_rejection(plan), request, details, deadline)
            per_attempt = plan.per_attempt_timeout
            attempt_timeout: float | None
            if per_attempt is not None and (timeout is None or per_attempt < timeout):
                attempt_timeout, hit_limit = per_attempt, True
            else:
                attempt_timeout, hit_limit = timeout, False
            plan.tally.n += 1
            try:
                outcome = continuation(
                    details
                    if attempt_timeout == details.timeout
                    else _details(details, attempt_timeout),
                    replay.attempt() if replay is not None else request,
                )
            except BaseException:  # nothing was sent: the breaker's permit goes back
                if breaker is not None:
                    breaker.release()
                raise
            done = getattr(outcome, "done", None)  # (absent on another interceptor's outcome)
            if done is not None and not done():
                # Invoked through ``.future()``: the caller must not wait here. The rest
                # (breaker, retries, the bulkhead permit) runs when this attempt ends.
                deferred = True
                return self._defer(
                    plan,
                    continuation,
                    details,
                    request,
                    replay,
                    deadline,
                    start,
                    hit_limit,
                    outcome,
                )
            code = _code(outcome)
            if code is _OK:  # the common case, without another call
                if breaker is not None:
                    breaker.on_result(_monotonic() - start, "OK")
                if plan.fallback is not None and replay is None:
                    self._remember(plan, request, outcome)
                return outcome
            return self._after_first(
                plan, continuation, details, request, replay, deadline, start, hit_limit, outcome
            )
        finally:
            if bulkhead is not None and not deferred:
                bulkhead.release()

    def _admit(self, plan: ClientPlan, details: Any, request: Any, deadline: float | None) -> Any:
        """Fault, rate limit and bulkhead (waiting up to ``max_wait``): None when the call
        may go on (holding a bulkhead permit), else the outcome to answer with."""
        m = self._m
        if plan.fault is not None:
            injected = client_fault(plan, details.metadata, deadline, _rng)
            if injected is not None:
                return LocalRpcError(injected[0], injected[1])
        if plan.rate_limiter is not None:
            wait = plan.rate_limiter.try_acquire("")
            if wait > 0:
                m.rate_limit_rejections.add(1, plan.attrs)
                return self._refused(
                    plan, rate_rejection(plan.method, wait), request, details, deadline
                )
        bulkhead = plan.bulkhead
        if bulkhead is not None:
            if plan.bulkhead_wait > 0:
                left = None if deadline is None else max(0.0, deadline - _monotonic())
                ok = bulkhead.acquire(left)
            else:
                ok = bulkhead.try_acquire()
            if not ok:
                m.bulkhead_rejections.add(1, plan.attrs)
                exc = bulkhead_rejection(
                    bulkhead.name or plan.method, bulkhead.config.max_concurrent
                )
                return self._refused(plan, exc, request, details, deadline)
        return None

    def _defer(
        self,
        plan: ClientPlan,
        continuation: Any,
        details: Any,
        request: Any,
        replay: Replay | None,
        deadline: float | None,
        start: float,
        hit_limit: bool,
        first: Any,
    ) -> _PendingCall:
        """The future for a ``.future()`` call whose first attempt is in flight; it holds
        the bulkhead permit (and the breaker's) until the call is settled."""
        bulkhead, breaker = plan.bulkhead, plan.breaker

        def settle(done: Any) -> Any:
            try:
                return self._after_first(
                    plan, continuation, details, request, replay, deadline, start, hit_limit, done
                )
            finally:
                if bulkhead is not None:
                    bulkhead.release()

        def abandon() -> None:  # cancelled by the caller: no verdict for the breaker
            if breaker is not None:
                breaker.release()
            if bulkhead is not None:
                bulkhead.release()

        may_block = plan.retry is not None or plan.fallback is not None
        return _PendingCall(first, settle, abandon, may_block)

    def _after_first(
        self,
        plan: ClientPlan,
        continuation: Any,
        details: Any,
        request: Any,
        replay: Replay | None,
        deadline: float | None,
        start: float,
        hit_limit: bool,
        outcome: Any,
    ) -> Any:
        """The finished first attempt of the quick path: report it, then retry if need be."""
        breaker = plan.breaker
        code = _code(outcome)
        if code is _OK:
            if breaker is not None:
                breaker.on_result(_monotonic() - start, "OK")
            if plan.fallback is not None and replay is None:
                self._remember(plan, request, outcome)
            return outcome
        if breaker is not None:
            breaker.on_result(_monotonic() - start, _NAMES[code])
        return self._retrying(
            plan, continuation, details, request, deadline, replay, outcome, hit_limit
        )

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        plan: ClientPlan = self._plans.get(details.method)
        level = plan.level
        if level == PASS and _DEADLINE.get() is None:
            return continuation(details, request_iterator)
        try:
            timeout = _deadline.compute_timeout(details.timeout, plan.timeout, plan.margin)
        except DeadlineExceededError as exc:
            return self._refused(plan, exc, None, details, None)
        if level != FULL:
            if timeout != details.timeout:
                details = _details(details, timeout)
            return continuation(details, request_iterator)
        # Always through a Replay (limit 0 without retries): the attempt loop then never
        # hedges a client stream nor mistakes the iterator for a request to cache.
        limit = plan.retry.max_buffer_bytes if plan.retry is not None else 0
        replay = Replay(request_iterator, limit)
        return self._call(plan, continuation, details, None, replay, timeout)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._stream(continuation, details, request, None)

    def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return self._stream(continuation, details, None, request_iterator)

    # -- unary responses -----------------------------------------------------------------

    def _retrying(
        self,
        plan: ClientPlan,
        continuation: Any,
        details: Any,
        request: Any,
        deadline: float | None,
        replay: Replay | None,
        first: Any = None,
        first_hit_limit: bool = False,
    ) -> Any:
        """Attempts until one succeeds or the policy stops; ``first`` is the outcome of
        a failed first attempt already sent (and reported to the breaker) by the caller."""
        m = self._m
        retry = plan.retry
        breaker = plan.breaker
        if plan.budget is not None and first is None:
            plan.budget.record_call()
        per_attempt = retry.per_attempt_timeout if retry is not None else None
        metadata = details.metadata
        attempt = 1
        prev_delay: float | None = None
        outcome: Any = first
        hit_limit = first_hit_limit
        code = _code(first) if first is not None else _OK
        while True:
            if outcome is None or attempt > 1:  # else the caller sent the first attempt
                began = begin_attempt(plan, attempt, deadline, per_attempt)
                if not isinstance(began, tuple):
                    if began is None:
                        break
                    # The breaker refused the first attempt.
                    return self._refused(plan, breaker_rejection(plan), request, details, deadline)
                timeout, hit_limit, now = began
                body = replay.attempt() if replay is not None else request
                outcome = continuation(_details(details, timeout, metadata), body)
                code = _code(outcome)
                if breaker is not None:
                    breaker.on_result(_monotonic() - now, _NAMES[code])
            if code is _OK:
                if plan.fallback is not None and replay is None:
                    self._remember(plan, request, outcome)
                return outcome
            if replay is not None and not replay.replayable:
                break
            delay = retry_delay(
                plan,
                attempt,
                code,
                _trailers(outcome),
                prev_delay,
                deadline,
                hit_limit and code is _DEADLINE_EXCEEDED,
                m,
            )
            if delay is None:
                break
            if delay > 0:
                time.sleep(delay)
            prev_delay = delay
            attempt += 1
            metadata = add_attempt_header(details.metadata, attempt - 1)
        if outcome is None:
            exc2 = DeadlineExceededError("the deadline passed before an attempt could be sent")
            return self._refused(plan, exc2, request, details, deadline)
        return self._exhausted(plan, outcome, request, details, deadline)

    def _hedged(
        self,
        plan: ClientPlan,
        continuation: Any,
        details: Any,
        request: Any,
        deadline: float | None,
    ) -> Any:
        hedging = plan.hedging
        m = self._m
        breaker = plan.breaker
        budget = plan.budget
        # Cancellable futures where grpcio's internals allow it (meshkit._compat.grpcio);
        # otherwise threads through the public continuation.
        invoke = _grpcio.sync_future_invoker(continuation)
        if invoke is None:
            invoke = self._thread_invoker(continuation)
        if budget is not None:
            budget.record_call()
        cond = threading.Condition()
        finished: collections.deque[Any] = collections.deque()
        started: list[tuple[Any, float]] = []
        outstanding: set[int] = set()

        def launch(index: int) -> bool:
            if breaker is not None and not breaker.try_acquire():
                return False
            now = _monotonic()
            left = None if deadline is None else deadline - now
            if left is not None and left <= 0:
                if breaker is not None:
                    breaker.release()
                return False
            md = details.metadata if index == 0 else add_attempt_header(details.metadata, index)
            plan.tally.n += 1
            if index > 0:
                m.retries.add(1, plan.attrs)
                span_event("meshkit.hedge", {"attempt": index + 1})
            fut = invoke(_details(details, left, md), request)
            started.append((fut, now))
            outstanding.add(index)

            def done(f: Any, i: int = index) -> None:
                with cond:
                    finished.append((i, f))
                    cond.notify()

            fut.add_done_callback(done)
            return True

        if not launch(0):
            return self._refused(plan, breaker_rejection(plan), request, details, deadline)
        next_hedge = _monotonic() + hedging.delay
        hedge_open = hedging.max_attempts > 1  # more attempts may still be sent
        last: Any = None
        winner: Any = None
        while True:
            with cond:
                while not finished:
                    until = next_hedge if hedge_open else deadline
                    if until is not None and deadline is not None:
                        until = min(until, deadline)
                    if until is None:
                        cond.wait()
                        continue
                    now = _monotonic()
                    if now >= until:
                        break
                    cond.wait(until - now)
                batch = list(finished)
                finished.clear()
            launch_now = False
            for index, fut in batch:
                outstanding.discard(index)
                outcome = fut.outcome() if isinstance(fut, _ThreadAttempt) else fut
                code = _code(outcome)
                if breaker is not None:
                    breaker.on_result(_monotonic() - started[index][1], _NAMES[code])
                if code is _OK or hedging.is_fatal(code.name):
                    winner = outcome
                    break
                last = outcome
                launch_now = True
            if winner is not None:
                break
            now = _monotonic()
            if deadline is not None and now >= deadline:
                break
            if hedge_open and (launch_now or now >= next_hedge):
                sent = False
                if budget is not None and not budget.try_withdraw():
                    m.budget_exhausted.add(1, plan.attrs)
                else:
                    sent = launch(len(started))
                if sent:
                    next_hedge = _monotonic() + hedging.delay
                    hedge_open = len(started) < hedging.max_attempts
                else:
                    hedge_open = False  # budget spent or breaker open: wait for those in flight
            if not outstanding and not hedge_open:
                break
        for index, (fut, _) in enumerate(started):
            if index in outstanding:
                fut.cancel()
                if breaker is not None:
                    breaker.release()
        if winner is not None:
            if _code(winner) is _OK:
                if plan.fallback is not None:
                    self._remember(plan, request, winner)
                return winner
            return winner
        if last is None:
            exc = DeadlineExceededError("deadline exceeded while hedging")
            return self._refused(plan, exc, request, details, deadline)
        return self._exhausted(plan, last, request, details, deadline)

    def _thread_invoker(self, continuation: Any) -> Callable[[Any, Any], Any]:
        with self._lock:
            if self._executor is None:
                self._executor = futures.ThreadPoolExecutor(
                    max_workers=16, thread_name_prefix="meshkit-hedge"
                )
            executor = self._executor

        def invoke(d: Any, request: Any) -> Any:
            return _ThreadAttempt(executor.submit(continuation, d, request))

        return invoke

    # -- streaming responses ---------------------------------------------------------------

    def _stream(self, continuation: Any, details: Any, request: Any, request_iterator: Any) -> Any:
        plan: ClientPlan = self._plans.get(details.method)
        body = request if request_iterator is None else request_iterator
        level = plan.level
        if level == PASS and _DEADLINE.get() is None:
            return continuation(details, body)
        try:
            timeout = _deadline.compute_timeout(details.timeout, plan.timeout, plan.margin)
        except DeadlineExceededError as exc:
            self._m.failed_before_send.add(1, plan.attrs)
            code, message, _ = error_status(exc)
            return LocalRpcError(code, message)
        if level != FULL:
            if timeout != details.timeout:
                details = _details(details, timeout)
            return continuation(details, body)
        deadline = _monotonic() + timeout if timeout is not None else None
        m = self._m
        if plan.fault is not None:
            injected = client_fault(plan, details.metadata, deadline, _rng)
            if injected is not None:
                return LocalRpcError(injected[0], injected[1])
        if plan.rate_limiter is not None:
            wait = plan.rate_limiter.try_acquire("")
            if wait > 0:
                m.rate_limit_rejections.add(1, plan.attrs)
                return self._rejected_stream(plan, rate_rejection(plan.method, wait))
        bulkhead = plan.bulkhead
        if bulkhead is not None:
            left = None if deadline is None else max(0.0, deadline - _monotonic())
            ok = bulkhead.acquire(left) if plan.bulkhead_wait > 0 else bulkhead.try_acquire()
            if not ok:
                m.bulkhead_rejections.add(1, plan.attrs)
                exc2 = bulkhead_rejection(
                    bulkhead.name or plan.method, bulkhead.config.max_concurrent
                )
                return self._rejected_stream(plan, exc2)
        replay = None
        if request_iterator is not None and plan.retry is not None:
            replay = Replay(request_iterator, plan.retry.max_buffer_bytes)
        stream = _RetryingStream(
            self, plan, continuation, details, request, request_iterator, replay, deadline
        )
        return stream.start()

    def _rejected_stream(self, plan: ClientPlan, exc: MeshkitError) -> LocalRpcError:
        refusal_trigger(plan, exc, self._m)  # counted and annotated; no fallback for streams
        code, message, pushback = error_status(exc)
        return LocalRpcError(code, message, pushback_metadata(pushback))

    # -- outcomes ----------------------------------------------------------------------------

    def _remember(self, plan: ClientPlan, request: Any, outcome: Any) -> None:
        fb = plan.fallback
        if fb is None or str(fb.kind) != "cached":
            return
        try:
            self._fallbacks.remember(plan.method, request, outcome.result())
        except Exception:  # caching must never fail the call
            _log.debug("could not cache the response of %s", plan.method, exc_info=True)

    def _refused(
        self,
        plan: ClientPlan,
        exc: MeshkitError,
        request: Any,
        details: Any,
        deadline: float | None,
    ) -> Any:
        """A call refused before it was sent: fallback, or the error as an outcome."""
        trigger = refusal_trigger(plan, exc, self._m)
        served = self._fallback(plan, trigger, request, details, deadline)
        if served is not None:
            return served
        code, message, pushback = error_status(exc)
        return LocalRpcError(code, message, pushback_metadata(pushback))

    def _exhausted(
        self, plan: ClientPlan, outcome: Any, request: Any, details: Any, deadline: float | None
    ) -> Any:
        """The last attempt failed: the fallback for transient failures, else the failure."""
        if plan.fallback is None:
            return outcome
        trigger = exhausted_trigger(plan, _code(outcome))
        if trigger is None:
            return outcome
        served = self._fallback(plan, trigger, request, details, deadline)
        return served if served is not None else outcome

    def _fallback(
        self, plan: ClientPlan, trigger: str, request: Any, details: Any, deadline: float | None
    ) -> Any:
        kind = fallback_kind(plan, trigger, request is None)
        if kind is None:
            return None
        try:
            if kind == "alternate":
                value = self._alternate(plan, plan.fallback.target, request, details, deadline)
                if value is None:
                    return None
                served: Any = value
            else:
                ok, value = self._fallbacks.local_value(plan.fallback, plan.method, request)
                if not ok:
                    return None
                served = _Value(value)
        except FallbackError as exc:
            served = LocalRpcError(code_of(exc.code), exc.message)
        fallback_served(plan, kind, trigger, self._m)
        return served

    def _alternate(
        self,
        plan: ClientPlan,
        target: str | None,
        request: Any,
        details: Any,
        deadline: float | None,
    ) -> Any:
        if not target:
            return None
        types = method_types(plan.method)
        resp_cls = types[1] if types is not None else self._fallbacks.response_type(plan.method)
        serializer = getattr(type(request), "SerializeToString", None)
        if resp_cls is None or serializer is None:
            _log.warning("alternate fallback for %s: message types unknown", plan.method)
            return None
        with self._lock:
            channel = self._alternates.get(target)
            if channel is None:
                channel = self._alternates[target] = self._alternate_factory(target)
        call = channel.unary_unary(
            plan.method, request_serializer=serializer, response_deserializer=resp_cls.FromString
        )
        left = None if deadline is None else max(0.001, deadline - _monotonic())
        try:
            response, _call = call.with_call(request, timeout=left, metadata=details.metadata)
        except grpc.RpcError as err:
            return err
        return _Value(response)


class _PendingCall(grpc.Call, grpc.Future):  # type: ignore[misc,type-arg]
    """The outcome of a ``.future()`` call whose policy work is still to come.

    The first attempt is in flight; when it ends, ``settle`` reports it and retries if need
    be (on a thread of its own when that may block: retries sleep), and this future then
    follows the final outcome. A cancelled first attempt is ``abandon``-ed instead.
    """

    def __init__(
        self,
        first: Any,
        settle: Callable[[Any], Any],
        abandon: Callable[[], None],
        may_block: bool,
    ) -> None:
        self._first = first
        self._settle = settle
        self._abandon = abandon
        self._may_block = may_block
        # The caller's context (deadline, span) for the retries run on another thread.
        self._context = contextvars.copy_context()
        self._cancelled = False
        self._final: Any = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Any], None]] = []
        first.add_done_callback(self._on_first_done)

    def _on_first_done(self, first: Any) -> None:
        if self._cancelled or first.cancelled():
            self._abandon()
            self._set(first)
        elif self._may_block and _code(first) is not _OK:
            threading.Thread(
                target=self._context.run,
                args=(self._finish, first),
                name="meshkit-retry",
                daemon=True,
            ).start()
        else:
            self._finish(first)

    def _finish(self, first: Any) -> None:
        try:
            final = self._settle(first)
        except Exception as exc:  # the policy itself failed: still end the future
            _log.exception("settling a future call failed")
            final = LocalRpcError.from_exception(exc)
        self._set(final)

    def _set(self, final: Any) -> None:
        with self._lock:
            self._final = final
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                _log.exception("a future's done callback failed")

    def _wait(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise grpc.FutureTimeoutError()
        return self._final

    # grpc.Future
    def cancel(self) -> bool:
        # Cancels the first attempt while it is in flight; once retries have begun they run
        # to their end (grpc.Future allows cancel() to refuse).
        if self._done.is_set() or not self._first.cancel():
            return False
        self._cancelled = True
        return True

    def cancelled(self) -> bool:
        return self._cancelled or (self._done.is_set() and bool(self._final.cancelled()))

    def running(self) -> bool:
        return not self._done.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        return self._wait(timeout).result()

    def exception(self, timeout: float | None = None) -> Any:
        return self._wait(timeout).exception()

    def traceback(self, timeout: float | None = None) -> Any:
        return self._wait(timeout).traceback()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    # grpc.Call, of the final outcome
    def initial_metadata(self) -> Any:
        return self._wait().initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._wait().trailing_metadata()

    def code(self) -> Any:
        return self._wait().code()

    def details(self) -> Any:
        return self._wait().details()

    def is_active(self) -> bool:
        return not self._done.is_set()

    def time_remaining(self) -> Any:
        return self._first.time_remaining()

    def add_callback(self, callback: Any) -> bool:
        self.add_done_callback(lambda _f: callback())
        return True


class _ThreadAttempt:
    """An attempt run on a thread (when the future path is not reachable)."""

    def __init__(self, fut: futures.Future[Any]) -> None:
        self._fut = fut

    def outcome(self) -> Any:
        return self._fut.result()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._fut.add_done_callback(lambda _f: fn(self))

    def cancel(self) -> bool:
        # A blocking attempt cannot be cancelled; its own timeout ends it.
        return False


class _RetryingStream(grpc.Call):  # type: ignore[misc]
    """A response stream retried until committed (its first message)."""

    def __init__(
        self,
        owner: ClientInterceptor,
        plan: ClientPlan,
        continuation: Any,
        details: Any,
        request: Any,
        request_iterator: Any,
        replay: Replay | None,
        deadline: float | None,
    ) -> None:
        self._owner = owner
        self._plan = plan
        self._continuation = continuation
        self._details = details
        self._request = request
        self._request_iterator = request_iterator
        self._replay = replay
        self._deadline = deadline
        self._call: Any = None
        self._committed = False
        self._attempt = 0
        self._prev_delay: float | None = None
        self._started = 0.0
        self._closed = False
        self._breaker_open = False

    def start(self) -> Any:
        plan = self._plan
        if plan.budget is not None and plan.retry is not None:
            plan.budget.record_call()
        error = self._send()
        if error is not None:
            self._finish()
            return error
        return self

    def _send(self) -> Any:
        """Start the next attempt; returns an error outcome when it cannot be sent."""
        plan = self._plan
        breaker = plan.breaker
        if breaker is not None and not breaker.try_acquire():
            self._breaker_open = False
            exc = breaker_rejection(plan)
            code, message, pushback = error_status(exc)
            return LocalRpcError(code, message, pushback_metadata(pushback))
        self._breaker_open = breaker is not None
        self._attempt += 1
        now = _monotonic()
        timeout = None if self._deadline is None else max(0.001, self._deadline - now)
        md = (
            self._details.metadata
            if self._attempt == 1
            else add_attempt_header(self._details.metadata, self._attempt - 1)
        )
        if self._replay is not None:
            body = self._replay.attempt()
        elif self._request_iterator is not None:
            body = self._request_iterator
        else:
            body = self._request
        plan.tally.n += 1
        self._started = now
        try:
            self._call = self._continuation(_details(self._details, timeout, md), body)
        except BaseException:  # e.g. the request serializer failed: nothing was sent
            if self._breaker_open:
                self._breaker_open = False
                plan.breaker.release()
            self._finish()
            raise
        return None

    def _report(self, code: grpc.StatusCode) -> None:
        if self._breaker_open:
            self._breaker_open = False
            self._plan.breaker.on_result(_monotonic() - self._started, code.name)

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        plan = self._plan
        if plan.bulkhead is not None:
            plan.bulkhead.release()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                message = next(self._call)
            except StopIteration:
                self._report(_OK)
                self._finish()
                raise
            except grpc.RpcError as err:
                code = _code(err)
                self._report(code)
                if self._committed or not self._may_retry(code, err):
                    self._finish()
                    raise
                if self._closed:  # cancelled while it waited out the backoff
                    raise LocalRpcError(
                        grpc.StatusCode.CANCELLED, "the call was cancelled"
                    ) from err
                error = self._send()
                if error is not None:
                    self._finish()
                    raise error from err
                continue
            if not self._committed:
                self._committed = True
                self._report(_OK)
            return message

    def _may_retry(self, code: grpc.StatusCode, err: Any) -> bool:
        if self._replay is not None and not self._replay.replayable:
            return False
        delay = retry_delay(
            self._plan,
            self._attempt,
            code,
            _trailers(err),
            self._prev_delay,
            self._deadline,
            False,
            self._owner._m,
        )
        if delay is None:
            return False
        if delay > 0:
            time.sleep(delay)
        self._prev_delay = delay
        return True

    # grpc.Call, delegated to the current attempt
    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def code(self) -> Any:
        return self._call.code()

    def details(self) -> Any:
        return self._call.details()

    def is_active(self) -> bool:
        return bool(self._call.is_active())

    def time_remaining(self) -> Any:
        return self._call.time_remaining()

    def cancel(self) -> bool:
        if self._closed:
            return False
        if self._breaker_open:
            self._breaker_open = False
            self._plan.breaker.release()
        self._finish()
        # The attempt in flight is cancelled, or the retry waiting out its backoff dropped.
        if self._call is not None:
            self._call.cancel()
        return True

    def __del__(self) -> None:
        # A caller that stops iterating early and drops the stream must not keep its
        # bulkhead and breaker permits: grpcio cancels an abandoned call, and so do we.
        if not self._closed and self._call is not None:
            try:
                self.cancel()
            except Exception:
                _log.debug("cancelling an abandoned stream failed", exc_info=True)

    def add_callback(self, callback: Any) -> bool:
        return bool(self._call.add_callback(callback))
