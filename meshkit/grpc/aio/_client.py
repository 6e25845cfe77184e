"""The fused asyncio client interceptor (grpc.aio): every client policy in one interceptor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from meshkit import deadline as _deadline
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
from meshkit.grpc._faults import client_fault_async
from meshkit.grpc._plan import FULL, PASS, ClientPlan, PlanCache, compile_client
from meshkit.grpc._replay import AsyncReplay
from meshkit.grpc._status import code_of, error_status, pushback_metadata
from meshkit.telemetry import instruments, span_event

__all__ = ["AioClientInterceptor", "arity_views"]

_log = logging.getLogger("meshkit.grpc")
_DEADLINE = _deadline._DEADLINE
_monotonic = time.monotonic
_OK = grpc.StatusCode.OK
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
_rng = random.Random()
_Details = grpc.aio.ClientCallDetails
AioRpcError = grpc.aio.AioRpcError
_EOF: Any = getattr(grpc.aio, "EOF", None)
_NAMES = {code: code.name for code in grpc.StatusCode}
_SUCall = grpc.aio.StreamUnaryCall
_STREAM: Any = object()  # the "request" of a response stream: never a fallback value


def _details(d: Any, timeout: float | None, metadata: Any = None) -> Any:
    return _Details(
        d.method,
        timeout,
        d.metadata if metadata is None else metadata,
        d.credentials,
        d.wait_for_ready,
    )


def _metadata(md: Any, previous: int) -> grpc.aio.Metadata:
    return grpc.aio.Metadata(*add_attempt_header(tuple(md) if md else (), previous))


def _error(code: grpc.StatusCode, message: str, trailers: Any = ()) -> AioRpcError:
    return AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), message, None)


def _error_of(exc: MeshkitError) -> AioRpcError:
    code, message, pushback = error_status(exc)
    return _error(code, message, pushback_metadata(pushback))


class _Attempt:
    """The outcome of one unary attempt: the call (for grpc) and its status."""

    __slots__ = ("call", "code", "error", "response")

    def __init__(self, call: Any, code: grpc.StatusCode, response: Any, error: Any) -> None:
        self.call = call
        self.code = code
        self.response = response
        self.error = error


async def _run(continuation: Any, details: Any, body: Any) -> _Attempt:
    call = await continuation(details, body)
    try:
        response = await call
    except AioRpcError as err:
        return _Attempt(call, err.code(), None, err)
    return _Attempt(call, _OK, response, None)


class _Value:
    """A fallback answer; grpc wraps a non-call return in ``UnaryUnaryCallResponse``."""


class AioClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """One grpc.aio client interceptor applying a :class:`~meshkit.Policy`.

    As :class:`meshkit.grpc.ClientInterceptor`; waits happen on the event loop.
    """

    def __init__(
        self,
        policy: Any,
        target: str | None = None,
        *,
        client_faults: bool = False,
        client_rate_limits: bool = False,
        alternate_channel: Callable[[str], grpc.aio.Channel] | None = None,
    ) -> None:
        self._policy = policy
        self._target = target or "default"
        self._client_faults = client_faults
        self._client_rate_limits = client_rate_limits
        self._plans = PlanCache(self._compile)
        self._m = instruments()
        self._fallbacks = FallbackSupport(getattr(policy, "last_good_cache", None))
        self._alternate_factory = alternate_channel or grpc.aio.insecure_channel
        self._alternates: dict[str, grpc.aio.Channel] = {}

    def _compile(self, method: Any) -> ClientPlan:
        name = method.decode() if isinstance(method, bytes) else method
        return compile_client(
            self._policy,
            name,
            self._target,
            client_faults=self._client_faults,
            client_rate_limits=self._client_rate_limits,
            flavour="aio",
        )

    def plan(self, method: str) -> ClientPlan:
        """The compiled plan for ``method`` (for tests and introspection)."""
        plan: ClientPlan = self._plans.get(method)
        return plan

    # -- unary responses ---------------------------------------------------------------

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        details = client_call_details
        plan: ClientPlan = self._plans.get(details.method)
        level = plan.level
        if level == PASS and _DEADLINE.get() is None:
            return await continuation(details, request)
        try:
            timeout = _deadline.compute_timeout(details.timeout, plan.timeout, plan.margin)
        except DeadlineExceededError as exc:
            return await self._refused(plan, exc, request, details, None)
        if level != FULL:
            if timeout != details.timeout:
                details = _details(details, timeout)
            return await continuation(details, request)
        if not plan.quick:
            return await self._unary(plan, continuation, details, request, timeout, None)
        # The common case, inline: a non-blocking bulkhead, then the first attempt sent
        # from here; only a failed first attempt goes on to the retry loop.
        start = _monotonic()
        deadline = start + timeout if timeout is not None else None
        bulkhead = plan.bulkhead
        if bulkhead is not None and not bulkhead.try_acquire():
            return await self._bulkhead_full(plan, details, request, deadline)
        try:
            if plan.budget is not None:
                plan.budget.record_call()
            breaker = plan.breaker
            if breaker is not None and not breaker.try_acquire():
                return await self._refused(
                    plan, breaker_rejection(plan), request, details, deadline
                )
            per_attempt = plan.per_attempt_timeout
            attempt_timeout: float | None
            if per_attempt is not None and (timeout is None or per_attempt < timeout):
                attempt_timeout, hit_limit = per_attempt, True
            else:
                attempt_timeout, hit_limit = timeout, False
            plan.tally.n += 1
            try:
                call = await continuation(
                    details
                    if attempt_timeout == details.timeout
                    else _Details(
                        details.method,
                        attempt_timeout,
                        details.metadata,
                        details.credentials,
                        details.wait_for_ready,
                    ),
                    request,
                )
                try:
                    response = await call
                except AioRpcError as err:
                    first = _Attempt(call, err.code(), None, err)
                else:
                    if breaker is not None:
                        breaker.on_result(_monotonic() - start, "OK")
                    if plan.fallback is not None:
                        self._remember(plan, request, response)
                    return call
            except BaseException:
                if breaker is not None:
                    breaker.release()
                raise
            if breaker is not None:
                breaker.on_result(_monotonic() - start, _NAMES[first.code])
            return await self._retrying(
                plan, continuation, details, request, deadline, None, first, hit_limit
            )
        finally:
            if bulkhead is not None:
                bulkhead.release()

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        details = client_call_details
        plan: ClientPlan = self._plans.get(details.method)
        level = plan.level
        if level == PASS and _DEADLINE.get() is None:
            return await continuation(details, request_iterator)
        try:
            timeout = _deadline.compute_timeout(details.timeout, plan.timeout, plan.margin)
        except DeadlineExceededError as exc:
            return await self._refused(plan, exc, None, details, None)
        if level != FULL:
            if timeout != details.timeout:
                details = _details(details, timeout)
            return await continuation(details, request_iterator)
        # Always through a replay (limit 0 without retries): never hedged, never cached.
        limit = plan.retry.max_buffer_bytes if plan.retry is not None else 0
        replay = AsyncReplay(request_iterator, limit)
        # Return a call at once: grpc.aio feeds ``call.write()`` messages to the request
        # iterator only after the interceptor returned, so waiting here for the response
        # would wait for writes that cannot come. The attempts run on a task.
        task = asyncio.ensure_future(
            self._unary(plan, continuation, details, None, timeout, replay)
        )
        return _AioUnaryCall(task, replay)

    async def _admit(
        self, plan: ClientPlan, details: Any, request: Any, deadline: float | None
    ) -> Any:
        """Fault, rate limit and bulkhead; returns None when admitted, else the answer."""
        m = self._m
        if plan.fault is not None:
            injected = await client_fault_async(plan, details.metadata, deadline, _rng)
            if injected is not None:
                raise _error(injected[0], injected[1])
        if plan.rate_limiter is not None:
            wait = plan.rate_limiter.try_acquire("")
            if wait > 0:
                m.rate_limit_rejections.add(1, plan.attrs)
                return await self._refused(
                    plan, rate_rejection(plan.method, wait), request, details, deadline
                )
        bulkhead = plan.bulkhead
        if bulkhead is not None:
            if plan.bulkhead_wait > 0:
                left = None if deadline is None else max(0.0, deadline - _monotonic())
                ok = await bulkhead.acquire_async(left)
            else:
                ok = bulkhead.try_acquire()
            if not ok:
                return await self._bulkhead_full(plan, details, request, deadline)
        return None

    async def _bulkhead_full(
        self, plan: ClientPlan, details: Any, request: Any, deadline: float | None
    ) -> Any:
        self._m.bulkhead_rejections.add(1, plan.attrs)
        bulkhead = plan.bulkhead
        exc = bulkhead_rejection(bulkhead.name or plan.method, bulkhead.config.max_concurrent)
        return await self._refused(plan, exc, request, details, deadline)

    def _release(self, plan: ClientPlan) -> None:
        if plan.bulkhead is not None:
            plan.bulkhead.release()

    async def _unary(
        self,
        plan: ClientPlan,
        continuation: Any,
        details: Any,
        request: Any,
        timeout: float | None,  # noqa: ASYNC109 - the call's timeout, not ours
        replay: AsyncReplay | None,
    ) -> Any:
        deadline = _monotonic() + timeout if timeout is not None else None
        if plan.fault is not None or plan.rate_limiter is not None or plan.bulkhead_wait > 0:
            refused = await self._admit(plan, details, request, deadline)
            if refused is not None:
                return refused
        elif plan.bulkhead is not None and not plan.bulkhead.try_acquire():
            return await self._bulkhead_full(plan, details, request, deadline)
        try:
            if plan.hedging is not None and replay is None:
                return await self._hedged(plan, continuation, details, request, deadline)
            return await self._retrying(plan, continuation, details, request, deadline, replay)
        finally:
            self._release(plan)

    async def _retrying(
        self,
        plan: ClientPlan,
        continuation: Any,
        details: Any,
        request: Any,
        deadline: float | None,
        replay: AsyncReplay | None,
        first: _Attempt | None = None,
        first_hit_limit: bool = False,
    ) -> Any:
        """Attempts until one succeeds or the policy stops; ``first`` is the outcome of
        a first attempt already sent (and reported to the breaker) by the caller."""
        m = self._m
        retry = plan.retry
        breaker = plan.breaker
        if plan.budget is not None and first is None:
            plan.budget.record_call()
        per_attempt = retry.per_attempt_timeout if retry is not None else None
        metadata = details.metadata
        attempt = 1
        prev_delay: float | None = None
        last: _Attempt | None = first
        hit_limit = first_hit_limit
        while True:
            if last is None or attempt > 1:  # else the caller sent the first attempt
                began = begin_attempt(plan, attempt, deadline, per_attempt)
                if not isinstance(began, tuple):
                    if began is None:
                        break
                    return await self._refused(  # the breaker refused the first attempt
                        plan, breaker_rejection(plan), request, details, deadline
                    )
                timeout, hit_limit, now = began
                body = replay.attempt() if replay is not None else request
                try:
                    call = await continuation(
                        _Details(
                            details.method,
                            timeout,
                            metadata,
                            details.credentials,
                            details.wait_for_ready,
                        ),
                        body,
                    )
                    try:
                        response = await call
                    except AioRpcError as err:
                        last = _Attempt(call, err.code(), None, err)
                    else:
                        if breaker is not None:
                            breaker.on_result(_monotonic() - now, "OK")
                        if plan.fallback is not None and replay is None:
                            self._remember(plan, request, response)
                        return call
                except BaseException:
                    if breaker is not None:
                        breaker.release()
                    raise
                if breaker is not None:
                    breaker.on_result(_monotonic() - now, _NAMES[last.code])
            assert last is not None
            if replay is not None and not replay.replayable:
                break
            delay = retry_delay(
                plan,
                attempt,
                last.code,
                last.error.trailing_metadata() if last.error is not None else None,
                prev_delay,
                deadline,
                hit_limit and last.code is _DEADLINE_EXCEEDED,
                m,
            )
            if delay is None:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            prev_delay = delay
            attempt += 1
            metadata = _metadata(details.metadata, attempt - 1)
        if last is None:
            return await self._refused(
                plan,
                DeadlineExceededError("the deadline passed before an attempt could be sent"),
                request,
                details,
                deadline,
            )
        return await self._exhausted(plan, last, request, details, deadline)

    async def _hedged(
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
        if budget is not None:
            budget.record_call()
        tasks: dict[asyncio.Task[_Attempt], float] = {}
        calls: list[Any] = []

        async def one(index: int, left: float | None) -> _Attempt:
            md = details.metadata if index == 0 else _metadata(details.metadata, index)
            call = await continuation(_details(details, left, md), request)
            calls.append(call)
            try:
                response = await call
            except AioRpcError as err:
                return _Attempt(call, err.code(), None, err)
            return _Attempt(call, _OK, response, None)

        def launch() -> bool:
            if breaker is not None and not breaker.try_acquire():
                return False
            now = _monotonic()
            left = None if deadline is None else deadline - now
            if left is not None and left <= 0:
                if breaker is not None:
                    breaker.release()
                return False
            index = len(tasks)
            plan.tally.n += 1
            if index > 0:
                m.retries.add(1, plan.attrs)
                span_event("meshkit.hedge", {"attempt": index + 1})
            tasks[asyncio.ensure_future(one(index, left))] = now
            return True

        if not launch():
            return await self._refused(plan, breaker_rejection(plan), request, details, deadline)
        pending: set[asyncio.Task[_Attempt]] = set(tasks)
        next_hedge = _monotonic() + hedging.delay
        winner: _Attempt | None = None
        last: _Attempt | None = None
        try:
            while pending or len(tasks) < hedging.max_attempts:
                now = _monotonic()
                can_hedge = len(tasks) < hedging.max_attempts
                until = next_hedge if can_hedge else deadline
                if deadline is not None and until is not None:
                    until = min(until, deadline)
                wait = None if until is None else max(0.0, until - now)
                if pending:
                    done, pending = await asyncio.wait(
                        pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                    )
                else:
                    done = set()
                    if wait:
                        await asyncio.sleep(wait)
                launch_now = False
                for task in done:
                    outcome = task.result()
                    if breaker is not None:
                        breaker.on_result(_monotonic() - tasks[task], outcome.code.name)
                    if outcome.code is _OK or hedging.is_fatal(outcome.code.name):
                        winner = outcome
                        break
                    last = outcome
                    launch_now = True
                if winner is not None:
                    break
                now = _monotonic()
                if deadline is not None and now >= deadline:
                    break
                if can_hedge and (launch_now or now >= next_hedge):
                    if budget is None or budget.try_withdraw():
                        if launch():
                            pending = {t for t in tasks if not t.done()}
                            next_hedge = _monotonic() + hedging.delay
                            continue
                    else:
                        m.budget_exhausted.add(1, plan.attrs)
                    # No more hedges can be sent: wait for the ones in flight.
                    tasks_cap = len(tasks)
                    hedging = _Capped(hedging, tasks_cap)
                if not pending and len(tasks) >= hedging.max_attempts:
                    break
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
                    if breaker is not None:
                        breaker.release()
            for call in calls:
                if not call.done():
                    call.cancel()
        if winner is not None:
            if winner.code is _OK and plan.fallback is not None:
                self._remember(plan, request, winner.response)
            return winner.call
        if last is None:
            return await self._refused(
                plan,
                DeadlineExceededError("deadline exceeded while hedging"),
                request,
                details,
                deadline,
            )
        return await self._exhausted(plan, last, request, details, deadline)

    # -- streaming responses -------------------------------------------------------------

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await self._stream(continuation, client_call_details, request, None)

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._stream(continuation, client_call_details, None, request_iterator)

    async def _stream(
        self, continuation: Any, details: Any, request: Any, request_iterator: Any
    ) -> Any:
        plan: ClientPlan = self._plans.get(details.method)
        body = request if request_iterator is None else request_iterator
        level = plan.level
        if level == PASS and _DEADLINE.get() is None:
            return await continuation(details, body)
        try:
            timeout = _deadline.compute_timeout(details.timeout, plan.timeout, plan.margin)
        except DeadlineExceededError as exc:
            self._m.failed_before_send.add(1, plan.attrs)
            raise _error_of(exc) from None
        if level != FULL:
            if timeout != details.timeout:
                details = _details(details, timeout)
            return await continuation(details, body)
        deadline = _monotonic() + timeout if timeout is not None else None
        await self._admit(plan, details, _STREAM, deadline)  # raises when refused
        replay = None
        if request_iterator is not None and plan.retry is not None:
            replay = AsyncReplay(request_iterator, plan.retry.max_buffer_bytes)
        if plan.breaker is not None and not plan.breaker.try_acquire():
            self._release(plan)
            self._m.failed_before_send.add(1, plan.attrs)
            raise _error_of(breaker_rejection(plan))
        if plan.budget is not None and plan.retry is not None:
            plan.budget.record_call()
        start = _monotonic()
        left = None if deadline is None else max(0.001, deadline - start)
        plan.tally.n += 1
        try:
            first = await continuation(
                _details(details, left), replay.attempt() if replay is not None else body
            )
        except BaseException:
            if plan.breaker is not None:
                plan.breaker.release()
            self._release(plan)
            raise
        state = _StreamState(first, plan.breaker, plan.bulkhead, deadline, start)
        first.add_done_callback(state.on_done)
        gen = self._stream_gen(state, plan, continuation, details, body, replay, deadline, start)
        return _AioStream(state, gen)

    async def _stream_gen(
        self,
        stream: _StreamState,
        plan: ClientPlan,
        continuation: Any,
        details: Any,
        body: Any,
        replay: AsyncReplay | None,
        deadline: float | None,
        start: float,
    ) -> AsyncIterator[Any]:
        m = self._m
        breaker = plan.breaker
        attempt = 1
        prev_delay: float | None = None
        committed = False
        stream.reading = True
        try:
            while True:
                if attempt > 1:
                    if stream.closed:  # cancelled (or past its deadline) during the backoff
                        raise asyncio.CancelledError()
                    if breaker is not None:
                        if not breaker.try_acquire():
                            raise _error_of(breaker_rejection(plan))
                        stream.holding = True
                    start = stream.started = _monotonic()
                    left = None if deadline is None else max(0.001, deadline - start)
                    md = _metadata(details.metadata, attempt - 1)
                    plan.tally.n += 1
                    stream.call = await continuation(
                        _details(details, left, md),
                        replay.attempt() if replay is not None else body,
                    )
                    stream.call.add_done_callback(stream.on_done)
                call = stream.call
                try:
                    async for message in call:
                        if not committed:
                            committed = stream.committed = True
                            if stream.holding and breaker is not None:
                                stream.holding = False
                                breaker.on_result(_monotonic() - start, "OK")
                        yield message
                    if stream.holding and breaker is not None:
                        stream.holding = False
                        breaker.on_result(_monotonic() - start, "OK")
                    return
                except AioRpcError as err:
                    code = err.code()
                    if stream.holding and breaker is not None:
                        stream.holding = False
                        breaker.on_result(_monotonic() - start, code.name)
                    if committed or (replay is not None and not replay.replayable):
                        raise
                    delay = retry_delay(
                        plan,
                        attempt,
                        code,
                        err.trailing_metadata(),
                        prev_delay,
                        deadline,
                        False,
                        m,
                    )
                    if delay is None:
                        raise
                if delay > 0:
                    await asyncio.sleep(delay)
                prev_delay = delay
                attempt += 1
        finally:
            call = stream.call
            if call is not None and not call.done():
                call.cancel()
            stream.close()

    # -- outcomes ----------------------------------------------------------------------------

    def _remember(self, plan: ClientPlan, request: Any, response: Any) -> None:
        fb = plan.fallback
        if fb is None or str(fb.kind) != "cached":
            return
        try:
            self._fallbacks.remember(plan.method, request, response)
        except Exception:
            _log.debug("could not cache the response of %s", plan.method, exc_info=True)

    async def _refused(
        self,
        plan: ClientPlan,
        exc: MeshkitError,
        request: Any,
        details: Any,
        deadline: float | None,
    ) -> Any:
        trigger = refusal_trigger(plan, exc, self._m)
        found, value = await self._fallback(plan, trigger, request, details, deadline)
        if found:
            return value
        raise _error_of(exc)

    async def _exhausted(
        self,
        plan: ClientPlan,
        last: _Attempt,
        request: Any,
        details: Any,
        deadline: float | None,
    ) -> Any:
        if plan.fallback is None:
            return last.call
        trigger = exhausted_trigger(plan, last.code)
        if trigger is None:
            return last.call
        found, value = await self._fallback(plan, trigger, request, details, deadline)
        return value if found else last.call

    async def _fallback(
        self, plan: ClientPlan, trigger: str, request: Any, details: Any, deadline: float | None
    ) -> tuple[bool, Any]:
        if request is _STREAM:
            return False, None  # a response stream: nothing to stand in for it
        kind = fallback_kind(plan, trigger, request is None)
        if kind is None:
            return False, None
        fb = plan.fallback
        try:
            if kind == "alternate":
                found, value = await self._alternate(plan, fb.target, request, details, deadline)
            else:
                found, value = self._fallbacks.local_value(fb, plan.method, request)
            if not found:
                return False, None
        except FallbackError as exc:
            self._m.fallbacks.add(1, plan.attrs)
            raise _error(code_of(exc.code), exc.message) from None
        fallback_served(plan, kind, trigger, self._m)
        return True, value

    async def _alternate(
        self,
        plan: ClientPlan,
        target: str | None,
        request: Any,
        details: Any,
        deadline: float | None,
    ) -> tuple[bool, Any]:
        if not target:
            return False, None
        types = method_types(plan.method)
        resp_cls = types[1] if types is not None else self._fallbacks.response_type(plan.method)
        serializer = getattr(type(request), "SerializeToString", None)
        if resp_cls is None or serializer is None:
            _log.warning("alternate fallback for %s: message types unknown", plan.method)
            return False, None
        channel = self._alternates.get(target)
        if channel is None:
            channel = self._alternates[target] = self._alternate_factory(target)
        call = channel.unary_unary(
            plan.method, request_serializer=serializer, response_deserializer=resp_cls.FromString
        )
        left = None if deadline is None else max(0.001, deadline - _monotonic())
        return True, await call(request, timeout=left, metadata=details.metadata)

    async def close(self) -> None:
        """Close the channels opened for alternate-target fallbacks."""
        for channel in self._alternates.values():
            await channel.close(None)
        self._alternates.clear()


class _StreamState:
    """What a retried response stream holds: the current attempt and its permits.

    Shared by the stream object and its generator, so neither refers to the other and a
    dropped stream is finalised at once (no reference cycle to wait for)."""

    __slots__ = (
        "breaker",
        "bulkhead",
        "call",
        "closed",
        "committed",
        "deadline",
        "holding",
        "reading",
        "started",
    )

    def __init__(
        self, first: Any, breaker: Any, bulkhead: Any, deadline: float | None, started: float
    ) -> None:
        self.call = first
        self.deadline = deadline
        self.started = started  # when the current attempt was sent
        self.breaker = breaker
        self.bulkhead = bulkhead
        # The first attempt's breaker permit, taken before the stream was built.
        self.holding = breaker is not None
        self.closed = False
        self.committed = False
        self.reading = False  # someone iterates the stream (its generator has started)

    def on_done(self, call: Any) -> None:
        # The call is over and will not be retried (committed streams never are, nor are
        # cancelled ones, nor any past the deadline): its permits go back even if nobody
        # reads the rest of it. grpc.aio keeps an unread call alive until it ends.
        if call is not self.call or self.closed:
            return
        if self.committed or call.cancelled():
            self.close()
            return
        # (grpc core may fire the deadline a hair before our clock reads it)
        if self.deadline is not None and _monotonic() >= self.deadline - 0.01:
            # A reader that waited out the deadline for a first message saw a hung server: a
            # failure for the breaker. An unread stream says nothing about the server.
            if self.holding and self.reading:
                self.holding = False
                self.breaker.on_result(_monotonic() - self.started, "DEADLINE_EXCEEDED")
            self.close()

    def close(self) -> None:
        """Give back the permits, once, however the stream ends: read to the end, failed,
        cancelled, or dropped before anyone iterated it (its generator never ran)."""
        if self.closed:
            return
        self.closed = True
        if self.holding:
            self.holding = False
            self.breaker.release()
        if self.bulkhead is not None:
            self.bulkhead.release()


class _AioStream(grpc.aio.UnaryStreamCall, grpc.aio.StreamStreamCall):  # type: ignore[misc,type-arg]
    """A response stream retried until committed; the call methods follow the current attempt."""

    def __init__(self, state: _StreamState, gen: AsyncIterator[Any]) -> None:
        self._state = state
        self._gen = gen

    @property
    def _call(self) -> Any:
        return self._state.call

    def __del__(self) -> None:
        state = self._state
        if not state.closed:
            with contextlib.suppress(Exception):  # e.g. the loop is already gone
                state.call.cancel()
            state.close()

    def __aiter__(self) -> AsyncIterator[Any]:
        # Iterate through the stream object, not straight through its generator: it is
        # what keeps the call alive (``async for m in stub.Stream(r)`` holds only this).
        return self

    def __anext__(self) -> Awaitable[Any]:
        return self._gen.__anext__()

    async def read(self) -> Any:
        try:
            return await self._gen.__anext__()
        except StopAsyncIteration:
            return _EOF

    @property
    def _done_writing_flag(self) -> bool:
        # grpc.aio's ``write()`` reads it from the call an interceptor returned.
        return bool(getattr(self._call, "_done_writing_flag", False))

    async def write(self, request: Any) -> None:
        await self._call.write(request)

    async def done_writing(self) -> None:
        await self._call.done_writing()

    def cancel(self) -> bool:
        state = self._state
        if state.closed:
            return False
        # The attempt in flight is cancelled, or the retry waiting out its backoff is dropped.
        state.call.cancel()
        state.close()
        return True

    def cancelled(self) -> bool:
        return bool(self._call.cancelled())

    def done(self) -> bool:
        return bool(self._call.done())

    def add_done_callback(self, callback: Any) -> None:
        self._call.add_done_callback(callback)

    def time_remaining(self) -> float | None:
        value: float | None = self._call.time_remaining()
        return value

    async def initial_metadata(self) -> Any:
        return await self._call.initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = await self._call.code()
        return code

    async def details(self) -> str:
        details: str = await self._call.details()
        return details

    async def debug_error_string(self) -> str:
        text: str = await self._call.debug_error_string()
        return text

    async def wait_for_connection(self) -> None:
        await self._call.wait_for_connection()


class _AioUnaryCall(grpc.aio.StreamUnaryCall):  # type: ignore[misc,type-arg]
    """A stream-unary call whose attempts run on ``task``; it behaves as grpc.aio's call.

    The task ends with the final attempt's call, a fallback value, or an ``AioRpcError``
    (a refusal); cancelling this call cancels the task and so the attempt in flight."""

    def __init__(self, task: asyncio.Future[Any], replay: AsyncReplay) -> None:
        self._task = task
        self._replay = replay

    def __await__(self) -> Any:
        outcome = yield from self._task.__await__()
        if isinstance(outcome, _SUCall):
            return (yield from outcome.__await__())
        return outcome

    async def _final(self) -> Any:
        """The final call, a fallback value, or the error that ended the task."""
        try:
            return await asyncio.shield(self._task)
        except (AioRpcError, asyncio.CancelledError) as exc:
            return exc

    @property
    def _done_writing_flag(self) -> bool:
        # grpc.aio's ``write()`` reads it: the request stream has ended.
        return self._replay.source_done

    def cancel(self) -> bool:
        if not self._task.done():
            return self._task.cancel()
        outcome = self._outcome()
        return bool(outcome.cancel()) if isinstance(outcome, _SUCall) else False

    def _outcome(self) -> Any:
        if self._task.cancelled():
            return None
        exc = self._task.exception()
        return exc if exc is not None else self._task.result()

    def cancelled(self) -> bool:
        if not self._task.done():
            return False
        outcome = self._outcome()
        if outcome is None:
            return True
        if isinstance(outcome, AioRpcError):
            return outcome.code() is grpc.StatusCode.CANCELLED
        return bool(outcome.cancelled()) if isinstance(outcome, _SUCall) else False

    def done(self) -> bool:
        if not self._task.done():
            return False
        outcome = self._outcome()
        return bool(outcome.done()) if isinstance(outcome, _SUCall) else True

    def add_done_callback(self, callback: Any) -> None:
        def on_task(_task: Any) -> None:
            outcome = self._outcome()
            if isinstance(outcome, _SUCall) and not outcome.done():
                outcome.add_done_callback(lambda _c: callback(self))
            else:
                callback(self)

        self._task.add_done_callback(on_task)

    def time_remaining(self) -> float | None:
        if self._task.done():
            outcome = self._outcome()
            if isinstance(outcome, _SUCall):
                left: float | None = outcome.time_remaining()
                return left
        return None

    async def initial_metadata(self) -> Any:
        outcome = await self._final()
        if isinstance(outcome, _SUCall):
            return await outcome.initial_metadata()
        if isinstance(outcome, AioRpcError):
            return outcome.initial_metadata()
        return grpc.aio.Metadata()

    async def trailing_metadata(self) -> Any:
        outcome = await self._final()
        if isinstance(outcome, _SUCall):
            return await outcome.trailing_metadata()
        if isinstance(outcome, AioRpcError):
            return outcome.trailing_metadata()
        return grpc.aio.Metadata()

    async def code(self) -> grpc.StatusCode:
        outcome = await self._final()
        if isinstance(outcome, _SUCall):
            code: grpc.StatusCode = await outcome.code()
            return code
        if isinstance(outcome, AioRpcError):
            return outcome.code()
        if isinstance(outcome, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        return _OK

    async def details(self) -> str:
        outcome = await self._final()
        if isinstance(outcome, _SUCall):
            text: str = await outcome.details()
            return text
        if isinstance(outcome, AioRpcError):
            return str(outcome.details())
        if isinstance(outcome, asyncio.CancelledError):
            return "Locally cancelled by application!"
        return ""

    async def debug_error_string(self) -> str:
        outcome = await self._final()
        if isinstance(outcome, _SUCall):
            # (grpc.aio calls have it; grpc-stubs does not declare it)
            return str(await outcome.debug_error_string())  # type: ignore[attr-defined]
        if isinstance(outcome, AioRpcError):
            return str(outcome.debug_error_string())
        return ""

    async def wait_for_connection(self) -> None:
        outcome = await self._final()
        if isinstance(outcome, _SUCall):
            await outcome.wait_for_connection()

    async def write(self, request: Any) -> None:  # grpc.aio's wrapper feeds the writes
        raise NotImplementedError

    async def done_writing(self) -> None:
        raise NotImplementedError


class _Capped:
    """A hedging policy seen with fewer attempts (the budget refused more hedges)."""

    __slots__ = ("_inner", "max_attempts")

    def __init__(self, inner: Any, max_attempts: int) -> None:
        self._inner = inner
        self.max_attempts = max_attempts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _UnaryStreamView(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """grpc.aio files each interceptor under ONE arity (an ``elif`` chain on its type), so
    the fused interceptor is registered once per arity through these views. A call still
    runs through exactly one interceptor: the view forwards to the shared core."""

    def __init__(self, core: AioClientInterceptor) -> None:
        self.core = core
        self.intercept_unary_stream = core.intercept_unary_stream  # type: ignore[method-assign]

    async def intercept_unary_stream(  # pragma: no cover - replaced per instance
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await self.core.intercept_unary_stream(continuation, client_call_details, request)


class _StreamUnaryView(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    """See :class:`_UnaryStreamView`."""

    def __init__(self, core: AioClientInterceptor) -> None:
        self.core = core
        self.intercept_stream_unary = core.intercept_stream_unary  # type: ignore[method-assign]

    async def intercept_stream_unary(  # pragma: no cover - replaced per instance
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self.core.intercept_stream_unary(
            continuation, client_call_details, request_iterator
        )


class _StreamStreamView(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    """See :class:`_UnaryStreamView`."""

    def __init__(self, core: AioClientInterceptor) -> None:
        self.core = core
        self.intercept_stream_stream = core.intercept_stream_stream  # type: ignore[method-assign]

    async def intercept_stream_stream(  # pragma: no cover - replaced per instance
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self.core.intercept_stream_stream(
            continuation, client_call_details, request_iterator
        )


def arity_views(core: AioClientInterceptor) -> list[Any]:
    """``core`` (filed as unary-unary) plus its views for the other three arities."""
    return [core, _UnaryStreamView(core), _StreamUnaryView(core), _StreamStreamView(core)]
