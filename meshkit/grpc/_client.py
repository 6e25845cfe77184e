"""The fused sync client interceptor: the attempt engine's steps, waited for on threads.

Order of the chain for one call (the go-grpc-middleware order, outermost first):
deadline -> client fault -> client rate limit -> bulkhead -> hedging or retry loop
(each attempt: circuit breaker -> send) -> fallback on rejection or exhaustion. Every
decision is :class:`~meshkit.grpc._engine.Attempts`'; this adapter sends attempts,
sleeps, waits for permits and futures, and shapes the answer as grpcio's own.

Why this module is long: grpcio's four call shapes each need their own future or
iterator (``_SucceededCall``, ``_PendingCall``, ``_RaceCall``, ``_RetryingStream``) that
behaves exactly as grpcio's, and they share the interceptor's private step loop.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from meshkit._compat import grpcio as _grpcio
from meshkit.grpc._adapter import ClientAdapter, StreamState
from meshkit.grpc._engine import Acquire, Attempts, Await, Fail, Finish, Send, Serve, Sleep, Step
from meshkit.grpc._fallback import FallbackError
from meshkit.grpc._replay import Replay
from meshkit.grpc._status import LocalRpcError, code_of, pushback_metadata

__all__ = ["ClientInterceptor"]

_log = logging.getLogger("meshkit.grpc")
_monotonic = time.monotonic
_OK = grpc.StatusCode.OK
#: grpcio's continuation: sends the call (a request or a request iterator) and returns
#: its outcome (a ``grpc.Call`` and ``grpc.Future``; a response iterator for streams).
Continuation = Callable[[grpc.ClientCallDetails, Any], Any]


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """Call details with the fields grpcio reads."""


def _details(d: grpc.ClientCallDetails, timeout: float | None, metadata: Any = None) -> _Details:
    try:
        return _Details(
            d.method,
            timeout,
            d.metadata if metadata is None else metadata,
            d.credentials,  # type: ignore[attr-defined]
            d.wait_for_ready,  # type: ignore[attr-defined]
            d.compression,  # type: ignore[attr-defined]
        )
    except AttributeError:  # details from another interceptor may lack the optional fields
        return _Details(
            d.method,
            timeout,
            d.metadata if metadata is None else metadata,
            getattr(d, "credentials", None),
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )


def _for_attempt(d: grpc.ClientCallDetails, step: Send) -> grpc.ClientCallDetails:
    if step.metadata is None and step.timeout == d.timeout:
        return d
    return _details(d, step.timeout, step.metadata)


def _failure(step: Fail) -> LocalRpcError:
    return LocalRpcError(step.code, step.message, pushback_metadata(step.pushback))


class _SucceededCall(grpc.Call, grpc.Future):  # type: ignore[misc,type-arg]
    """A call that already ended OK with a response in hand (a fallback's value, or
    the alternate target's answer): what an interceptor returns instead of a call."""

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


def _report(eng: Attempts, outcome: Any, replay: Replay | None, attempt: int = 0) -> Step:
    code = _code(outcome)
    return eng.outcome(
        code,
        None if code is _OK else _trailers(outcome),
        attempt=attempt,
        replayable=replay is None or replay.replayable,
    )


class ClientInterceptor(
    ClientAdapter[grpc.Channel],
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """One interceptor applying a :class:`~meshkit.Policy` to every call of a channel
    (arguments: see :class:`~meshkit.grpc._adapter.ClientAdapter`)."""

    _executor: futures.ThreadPoolExecutor | None = None  # hedges' threads, when needed

    def _insecure_channel(self, target: str) -> grpc.Channel:
        return grpc.insecure_channel(target)

    # -- entry points ------------------------------------------------------------------

    def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return self._unary(continuation, client_call_details, request, None)

    def intercept_stream_unary(
        self,
        continuation: Continuation,
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return self._unary(continuation, client_call_details, None, request_iterator)

    def intercept_unary_stream(
        self, continuation: Continuation, client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return self._stream(continuation, client_call_details, request, None)

    def intercept_stream_stream(
        self,
        continuation: Continuation,
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return self._stream(continuation, client_call_details, None, request_iterator)

    # -- unary responses -----------------------------------------------------------------

    def _unary(
        self,
        continuation: Continuation,
        details: grpc.ClientCallDetails,
        request: Any,
        request_iterator: Iterator[Any] | None,
    ) -> Any:
        stream = request_iterator is not None
        plan, eng, timeout, refusal = self._admit(
            details.method, details.timeout, details.metadata, stream, False
        )
        if eng is None:
            if timeout != details.timeout:
                details = _details(details, timeout)
            return continuation(details, request if request_iterator is None else request_iterator)
        if refusal is not None:
            return self._answer(eng, refusal, None, details, request)
        # A client stream always goes through a Replay (limit 0 without retries).
        replay = None
        if request_iterator is not None:
            limit = plan.retry.max_buffer_bytes if plan.retry is not None else 0
            replay = Replay(request_iterator, limit)
        return self._run(eng, eng.start(), continuation, details, request, replay)

    def _run(
        self,
        eng: Attempts,
        step: Step,
        continuation: Continuation,
        details: grpc.ClientCallDetails,
        request: Any,
        replay: Replay | None,
        outcome: Any = None,
        may_defer: bool = True,
    ) -> Any:
        """Run the engine's steps to the answer. A first attempt still in flight (the
        caller used ``.future()``) is not waited for: the call object is returned at once
        and the rest runs when the attempt ends (see :class:`_PendingCall`)."""
        while True:
            if isinstance(step, Send):
                if eng.hedging:
                    return self._hedged(eng, step, continuation, details, request)
                try:
                    outcome = continuation(
                        _for_attempt(details, step),
                        replay.attempt() if replay is not None else request,
                    )
                except BaseException:  # nothing was sent (e.g. the serializer failed)
                    eng.unsent()
                    raise
                if may_defer:
                    done = getattr(outcome, "done", None)  # (absent on another's outcome)
                    if done is not None and not done():
                        return self._defer(eng, outcome, continuation, details, request, replay)
                step = _report(eng, outcome, replay)
            elif isinstance(step, Sleep):
                time.sleep(step.seconds)
                step = eng.resume()
            elif isinstance(step, Acquire):
                bulkhead = eng.plan.bulkhead
                assert bulkhead is not None
                step = eng.acquired(bulkhead.acquire(step.max_wait))
            else:
                return self._answer(eng, step, outcome, details, request, replay)

    def _defer(
        self,
        eng: Attempts,
        first: Any,
        continuation: Continuation,
        details: grpc.ClientCallDetails,
        request: Any,
        replay: Replay | None,
    ) -> _PendingCall:
        def settle(done: Any) -> Any:
            step = _report(eng, done, replay)
            return self._run(
                eng, step, continuation, details, request, replay, done, may_defer=False
            )

        plan = eng.plan
        return _PendingCall(
            first, settle, eng.cancel, plan.retry is not None or bool(plan.fallback)
        )

    def _hedged(
        self,
        eng: Attempts,
        step: Step,
        continuation: Continuation,
        details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Race the engine's hedges: cancellable futures where grpcio's internals allow it
        (meshkit._compat.grpcio), else threads through the public continuation. A caller
        that used ``.future()`` gets a future at once; the race runs on a thread."""
        invoke = _grpcio.sync_future_invoker(continuation) or self._thread_invoker(continuation)
        if _grpcio.future_call(continuation):
            return _RaceCall(lambda race: self._race(eng, step, invoke, details, request, race))
        return self._race(eng, step, invoke, details, request, None)

    def _race(
        self,
        eng: Attempts,
        step: Step,
        invoke: Callable[[Any, Any], Any],
        details: grpc.ClientCallDetails,
        request: Any,
        race: _RaceCall | None,
    ) -> Any:
        cond = race.cond if race is not None else threading.Condition()
        finished: collections.deque[tuple[int, Any]] = collections.deque()
        attempts: dict[int, Any] = {}
        outcomes: dict[int, Any] = {}

        def on_done(fut: Any, attempt: int) -> None:
            with cond:
                finished.append((attempt, fut))
                cond.notify()

        racing = True
        try:
            while racing:
                if isinstance(step, Send):
                    fut = invoke(_for_attempt(details, step), request)
                    attempts[step.attempt] = fut
                    fut.add_done_callback(lambda f, a=step.attempt: on_done(f, a))
                    step = eng.tick()
                elif isinstance(step, Await):
                    with cond:
                        while not finished and not (race is not None and race.cancelling):
                            left = None if step.until is None else step.until - _monotonic()
                            if left is not None and left <= 0:
                                break
                            cond.wait(left)
                        if race is not None and race.cancelling:
                            return _CANCELLED  # (the finally cancels the attempts)
                        item = finished.popleft() if finished else None
                    if item is None:
                        step = eng.tick()
                        continue
                    attempt, fut = item
                    outcomes[attempt] = fut.outcome() if isinstance(fut, _ThreadAttempt) else fut
                    step = _report(eng, outcomes[attempt], None, attempt)
                else:
                    racing = False
        finally:
            if racing:  # cancelled, or an error (or an interrupt) ended the race: no verdicts
                eng.cancel()
            for attempt, fut in attempts.items():  # the losers (the server sees CANCELLED)
                if attempt not in outcomes:
                    fut.cancel()
        last = outcomes.get(step.attempt) if isinstance(step, Finish) else None
        if isinstance(step, Serve) and isinstance(step.otherwise, Finish):
            last = outcomes.get(step.otherwise.attempt)
        return self._answer(eng, step, last, details, request)

    def _thread_invoker(self, continuation: Continuation) -> Callable[[Any, Any], Any]:
        with self._lock:
            if self._executor is None:
                self._executor = futures.ThreadPoolExecutor(
                    max_workers=16, thread_name_prefix="meshkit-hedge"
                )
            executor = self._executor

        def invoke(d: Any, request: Any) -> Any:
            return _ThreadAttempt(executor.submit(continuation, d, request))

        return invoke

    # -- answers -------------------------------------------------------------------------

    def _answer(
        self,
        eng: Attempts,
        step: Step,
        outcome: Any,
        details: grpc.ClientCallDetails,
        request: Any,
        replay: Replay | None = None,
    ) -> Any:
        """The outcome grpcio gets for a final step (``outcome``: the last attempt's)."""
        if isinstance(step, Serve):
            served = self._serve(eng, step, request, details)
            if served is not None:
                return served
            step = step.otherwise
        if isinstance(step, Fail):
            return _failure(step)
        if replay is None and _code(outcome) is _OK and eng.plan.fallback is not None:
            self._remember(eng.plan, request, outcome.result())
        return outcome

    def _serve(
        self, eng: Attempts, step: Serve, request: Any, details: grpc.ClientCallDetails
    ) -> Any:
        """The fallback's answer, or None when it has none."""
        try:
            if step.kind == "alternate":
                served = self._call_alternate(eng, request, details)
                if served is None:
                    return None
            else:
                found, value = self._local_fallback(eng, step, request)
                if not found:
                    return None
                served = _SucceededCall(value)
        except FallbackError as exc:
            served = LocalRpcError(code_of(exc.code), exc.message)
        eng.served(step)
        return served

    def _call_alternate(self, eng: Attempts, request: Any, details: grpc.ClientCallDetails) -> Any:
        alternate = self._alternate(eng, request)
        if alternate is None:
            return None
        call, left = alternate
        try:
            response, _call = call.with_call(request, timeout=left, metadata=details.metadata)
        except grpc.RpcError as err:
            return err
        return _SucceededCall(response)

    # -- streaming responses ---------------------------------------------------------------

    def _stream(
        self,
        continuation: Continuation,
        details: grpc.ClientCallDetails,
        request: Any,
        request_iterator: Iterator[Any] | None,
    ) -> Any:
        body = request if request_iterator is None else request_iterator
        plan, eng, timeout, refusal = self._admit(
            details.method, details.timeout, details.metadata, request_iterator is not None, True
        )
        if eng is None:
            if timeout != details.timeout:
                details = _details(details, timeout)
            return continuation(details, body)
        if refusal is not None:
            return self._answer(eng, refusal, None, details, request)
        replay = None
        if request_iterator is not None and plan.retry is not None:
            replay = Replay(request_iterator, plan.retry.max_buffer_bytes)
        return _RetryingStream(StreamState(eng, continuation, details, body, replay)).start()


class _Later(grpc.Call, grpc.Future):  # type: ignore[misc,type-arg]
    """A call object returned at once whose final outcome comes later (from a thread or
    a done callback); every grpc.Call and grpc.Future method follows that outcome."""

    def __init__(self) -> None:
        # The caller's context (deadline, span) for work run on another thread.
        self._context = contextvars.copy_context()
        self._final: Any = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Any], None]] = []

    def _finish(self, settle: Callable[[], Any]) -> None:
        try:
            final = settle()
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
    def cancelled(self) -> bool:
        return self._done.is_set() and bool(self._final.cancelled())

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
        return None

    def add_callback(self, callback: Any) -> bool:
        self.add_done_callback(lambda _f: callback())
        return True


class _PendingCall(_Later):
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
        super().__init__()
        self._first = first
        self._settle = settle
        self._abandon = abandon
        self._may_block = may_block
        self._cancelled = False
        first.add_done_callback(self._on_first_done)

    def _on_first_done(self, first: Any) -> None:
        if self._cancelled or first.cancelled():
            self._abandon()
            self._set(first)
        elif self._may_block and _code(first) is not _OK:
            threading.Thread(
                target=self._context.run,
                args=(self._finish, lambda: self._settle(first)),
                name="meshkit-retry",
                daemon=True,
            ).start()
        else:
            self._finish(lambda: self._settle(first))

    def cancel(self) -> bool:
        # Cancels the first attempt while it is in flight; once retries have begun they run
        # to their end (grpc.Future allows cancel() to refuse).
        if self._done.is_set() or not self._first.cancel():
            return False
        self._cancelled = True
        return True

    def cancelled(self) -> bool:
        return self._cancelled or super().cancelled()

    def time_remaining(self) -> Any:
        return self._first.time_remaining()


class _RaceCall(_Later):
    """A hedged ``.future()`` call: the race runs on a thread of its own and this future
    follows its answer; ``cancel()`` ends the race and cancels every attempt in flight."""

    def __init__(self, race: Callable[[_RaceCall], Any]) -> None:
        super().__init__()
        self.cond = threading.Condition()  # the race waits on it; cancel() wakes it
        self.cancelling = False
        threading.Thread(
            target=self._context.run,
            args=(self._finish, lambda: race(self)),
            name="meshkit-hedge",
            daemon=True,
        ).start()

    def cancel(self) -> bool:
        with self.cond:
            if self._done.is_set():
                return False
            self.cancelling = True
            self.cond.notify_all()
        return True

    def cancelled(self) -> bool:
        return self.cancelling or super().cancelled()


_CANCELLED = LocalRpcError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")


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

    def __init__(self, state: StreamState) -> None:
        self._s = state
        self._eng = state.eng

    @property
    def _call(self) -> Any:
        return self._s.call

    def start(self) -> Any:
        step = self._advance(self._eng.start())
        if isinstance(step, Fail):
            return _failure(step)
        return self

    def _advance(self, step: Step) -> Step:
        """Run the engine's steps until an attempt is sent or the stream is over."""
        eng = self._eng
        while True:
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                if eng.closed:  # cancelled while it waited out the backoff
                    return Fail(grpc.StatusCode.CANCELLED, "the call was cancelled")
                step = eng.resume()
            elif isinstance(step, Acquire):
                assert eng.plan.bulkhead is not None
                step = eng.acquired(eng.plan.bulkhead.acquire(step.max_wait))
            elif isinstance(step, Send):
                state = self._s
                try:
                    state.call = state.continuation(
                        _for_attempt(state.details, step), state.attempt_body()
                    )
                except BaseException:  # e.g. the request serializer failed: nothing was sent
                    eng.unsent()
                    raise
                return step
            else:
                return step

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        eng = self._eng
        while True:
            try:
                message = next(self._call)
            except StopIteration:
                eng.stream_outcome(_OK)
                eng.close()
                raise
            except grpc.RpcError as err:
                step = eng.stream_outcome(_code(err), _trailers(err), replayable=self._s.replayable)
                step = self._advance(step)
                if isinstance(step, Send):
                    continue
                eng.close()
                if isinstance(step, Fail):
                    raise _failure(step) from err
                raise
            eng.commit()
            return message

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
        if self._eng.closed:
            return False
        self._eng.cancel()
        # The attempt in flight is cancelled, or the retry waiting out its backoff dropped.
        if self._call is not None:
            self._call.cancel()
        return True

    def __del__(self) -> None:
        # A caller that stops iterating early and drops the stream must not keep its
        # bulkhead and breaker permits: grpcio cancels an abandoned call, and so do we.
        if not self._eng.closed and self._call is not None:
            try:
                self.cancel()
            except Exception:
                _log.debug("cancelling an abandoned stream failed", exc_info=True)

    def add_callback(self, callback: Any) -> bool:
        return bool(self._call.add_callback(callback))
