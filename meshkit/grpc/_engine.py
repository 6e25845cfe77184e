"""The client's attempt engine: every decision of one resilient call, and no I/O.

One :class:`Attempts` per logical call. Given the method's compiled
:class:`~meshkit.grpc._plan.ClientPlan` and each outcome the adapter reports, it says
what to do next, as a *step*:

``Send``     send attempt ``n`` with this timeout and these headers
``Sleep``    wait this long, then call :meth:`Attempts.resume`
``Acquire``  wait up to ``max_wait`` for a bulkhead permit, then :meth:`Attempts.acquired`
``Await``    (hedging) wait for an attempt's outcome until ``until``, then :meth:`Attempts.tick`
``Finish``   answer with the outcome of attempt ``attempt``
``Fail``     answer with this status (nothing more is sent)
``Serve``    answer with a fallback of ``kind``; when it has nothing, ``otherwise``

and it records every verdict: breaker permits and results, bulkhead permits, the
retry budget's deposits and withdrawals, the rate limit, faults, metrics and span
events. It owns no threads, no event loop and no grpc objects (status codes are
values), so one engine serves the sync adapter (``meshkit/grpc/_client.py``, which
waits on threads) and the asyncio one (``meshkit/grpc/aio/_client.py``, which waits on
the loop): the Resilience4j separation, state machines decide and adapters wait.
Tests drive it with a fake clock through every path.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from meshkit.errors import (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceededError,
    MeshkitError,
    RateLimitedError,
)
from meshkit.grpc._faults import decide
from meshkit.grpc._status import (
    MESHKIT_ATTEMPTS_KEY,
    PREVIOUS_ATTEMPTS_KEY,
    STOP,
    code_of,
    error_status,
    parse_pushback,
)
from meshkit.telemetry import Metrics, instruments, span_event

if TYPE_CHECKING:
    from meshkit.grpc._plan import ClientPlan

__all__ = [
    "FINISHED",
    "Acquire",
    "Attempts",
    "Await",
    "Fail",
    "Finish",
    "Send",
    "Serve",
    "Sleep",
    "Step",
    "add_attempt_header",
]

MetadataItems = tuple[tuple[str, str | bytes], ...]
_OK = grpc.StatusCode.OK
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
_rng = random.Random()
# What a stream's attempt gets at least: grpc refuses a zero timeout.
_MIN_TIMEOUT = 0.001


# -- steps ---------------------------------------------------------------------------
# Values, not to be changed once made (not frozen: a frozen dataclass costs a slow
# ``object.__setattr__`` per field on the hot path).


@dataclass(slots=True)
class Send:
    """Send attempt ``attempt`` (1-based) with ``timeout`` seconds (None: none) and
    ``metadata`` (None: the caller's, unchanged)."""

    attempt: int
    timeout: float | None
    metadata: MetadataItems | None


@dataclass(slots=True)
class Sleep:
    """Wait ``seconds`` (a backoff or an injected delay), then :meth:`Attempts.resume`."""

    seconds: float


@dataclass(slots=True)
class Acquire:
    """Wait up to ``max_wait`` seconds (None: no limit) for a permit of the plan's
    bulkhead, then report with :meth:`Attempts.acquired`."""

    max_wait: float | None


@dataclass(slots=True)
class Await:
    """Hedging: wait for an attempt's outcome (:meth:`Attempts.outcome`) until the
    monotonic instant ``until`` (None: no timer), then :meth:`Attempts.tick`."""

    until: float | None


@dataclass(slots=True)
class Finish:
    """Answer with the outcome of attempt ``attempt`` (cancel any other in flight)."""

    attempt: int


@dataclass(slots=True)
class Fail:
    """Answer with this status; nothing (more) is sent."""

    code: grpc.StatusCode
    message: str
    pushback: float | None = None

    @classmethod
    def of(cls, exc: MeshkitError) -> Fail:
        """The status of a meshkit error (its code, message and pushback)."""
        return cls(*error_status(exc))


@dataclass(slots=True)
class Serve:
    """Answer with a fallback of ``kind`` (``default``, ``cached``, ``alternate``,
    ``error``) for ``trigger``; when it cannot answer, with ``otherwise``."""

    kind: str
    trigger: str
    otherwise: Fail | Finish


Step = Send | Sleep | Acquire | Await | Finish | Fail | Serve

# Why an attempt could not be sent.
_BREAKER = "circuit_open"
_DEADLINE = "deadline"
_BUDGET = "budget"

#: A response stream that ended, or an answer already given: nothing more to do.
FINISHED = Finish(0)


def add_attempt_header(metadata: Iterable[tuple[str, Any]] | None, previous: int) -> MetadataItems:
    """Metadata for a retry: the caller's, plus ``grpc-previous-rpc-attempts``.

    gRPC's C core consumes ``grpc-previous-rpc-attempts`` on the server side (it is a
    reserved header and never reaches a grpcio handler), so the same count also goes
    as ``x-meshkit-previous-attempts``, which handlers and logs can read.
    """
    base = tuple(
        item
        for item in (metadata or ())
        if item[0] not in (PREVIOUS_ATTEMPTS_KEY, MESHKIT_ATTEMPTS_KEY)
    )
    count = str(previous)
    return (*base, (PREVIOUS_ATTEMPTS_KEY, count), (MESHKIT_ATTEMPTS_KEY, count))


def _trigger_of(exc: MeshkitError) -> str:
    if isinstance(exc, CircuitOpenError):
        return "circuit_open"
    if isinstance(exc, BulkheadFullError):
        return "bulkhead_full"
    if isinstance(exc, RateLimitedError):
        return "rate_limited"
    if isinstance(exc, DeadlineExceededError):
        return "deadline_exceeded"
    return "rejected"


# -- the engine ------------------------------------------------------------------------


class Attempts:
    """The decisions for one call of ``plan`` (see the module docstring for the steps).

    ``timeout``: the call's (already shrunk to the propagated deadline); ``metadata``:
    the caller's, for fault headers and retry headers. ``request_stream`` /
    ``response_stream`` give the arity: fallbacks need a unary response, ``cached`` and
    ``alternate`` a single request; hedging needs both unary; a response stream is
    retried only until :meth:`commit`. ``clock`` is ``time.monotonic`` unless a test
    brings its own.

    Protocol: :meth:`start`, then for each step its report (:meth:`outcome` after a
    ``Send``'s attempt ended, :meth:`resume` after a ``Sleep``...). A unary call is closed
    (its bulkhead permit returned) by the step that ends it; a response stream by
    :meth:`close` when it ends; an abandoned call by :meth:`cancel`.
    """

    __slots__ = (
        "_after_sleep",
        "_clock",
        "_cut",
        "_hedge_open",
        "_inflight",
        "_last",
        "_last_code",
        "_m",
        "_next_hedge",
        "_permit",
        "_prev_delay",
        "attempt",
        "closed",
        "committed",
        "deadline",
        "hedging",
        "metadata",
        "plan",
        "request_stream",
        "response_stream",
    )

    def __init__(
        self,
        plan: ClientPlan,
        timeout: float | None,
        metadata: Iterable[tuple[str, Any]] | None = None,
        *,
        request_stream: bool = False,
        response_stream: bool = False,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.plan = plan
        self._clock = clock
        self.deadline = None if timeout is None else clock() + timeout
        self.metadata = metadata
        self.request_stream = request_stream
        self.response_stream = response_stream
        self.hedging = plan.hedging is not None and not (request_stream or response_stream)
        self._m = metrics if metrics is not None else instruments()
        self.attempt = 0
        self.closed = False
        self.committed = False
        self._permit = False  # a bulkhead permit is held
        self._cut = False  # the latest attempt's timeout is the per-attempt one
        self._prev_delay: float | None = None
        self._after_sleep: Callable[[], Step] | None = None  # what a Sleep leads to
        # Attempts in flight (each holding a breaker permit, if there is a breaker):
        # attempt -> when it was sent.
        self._inflight: dict[int, float] = {}
        self._last = 0  # the attempt whose failure is the answer so far
        self._last_code = _OK
        self._next_hedge = 0.0
        self._hedge_open = False

    # -- admission ---------------------------------------------------------------------

    def start(self) -> Step:
        """Admit the call (fault, rate limit, bulkhead), then its first attempt."""
        plan = self.plan
        if plan.fault is not None:
            decision = decide(plan.fault, plan.allow_fault_headers, self.metadata, _rng)
            if decision is not None:
                delay = float(decision.delay)
                if self.deadline is not None:
                    delay = min(delay, max(0.0, self.deadline - self._clock()))
                abort = decision.abort_code
                if delay > 0:
                    self._after_sleep = lambda: self._after_fault(abort)
                    return Sleep(delay)
                return self._after_fault(abort)
        if plan.rate_limiter is None:  # the common case, without a call more
            bulkhead = plan.bulkhead
            if bulkhead is None:
                return self._first()
            if bulkhead.try_acquire():
                self._permit = True
                return self._first()
        return self._limits()

    def _after_fault(self, abort: str | None) -> Step:
        if self.deadline is not None and self._clock() >= self.deadline:
            return self._end(Fail(_DEADLINE_EXCEEDED, "deadline exceeded during an injected delay"))
        if abort is not None:
            return self._end(Fail(code_of(abort), f"fault injected: abort {abort}"))
        return self._limits()

    def _limits(self) -> Step:
        plan = self.plan
        if plan.rate_limiter is not None:
            wait = plan.rate_limiter.try_acquire("")
            if wait > 0:
                self._m.rate_limit_rejections.add(1, plan.attrs)
                return self.refuse(
                    RateLimitedError(
                        f"rate limit {plan.method!r} exceeded; retry in {wait:.3f}s",
                        pushback=max(wait, 0.001),
                    )
                )
        bulkhead = plan.bulkhead
        if bulkhead is not None:
            if not bulkhead.try_acquire():
                if plan.bulkhead_wait > 0:
                    left = None if self.deadline is None else self.deadline - self._clock()
                    return Acquire(None if left is None else max(0.0, left))
                return self.acquired(False)
            self._permit = True
        return self._first()

    def acquired(self, ok: bool) -> Step:
        """The bulkhead permit an ``Acquire`` waited for was (not) granted."""
        if ok:
            self._permit = True
            return self._first()
        plan = self.plan
        bulkhead = plan.bulkhead
        assert bulkhead is not None
        self._m.bulkhead_rejections.add(1, plan.attrs)
        limit = bulkhead.config.max_concurrent
        return self.refuse(
            BulkheadFullError(
                f"bulkhead {bulkhead.name or plan.method!r} is full ({limit} calls in flight)",
                pushback=0.05,
            )
        )

    def _first(self) -> Step:
        plan = self.plan
        if plan.budget is not None and (plan.retry is not None or self.hedging):
            plan.budget.record_call()
        if self.hedging:
            assert plan.hedging is not None
            self._hedge_open = plan.hedging.max_attempts > 1
            self._next_hedge = self._clock() + plan.hedging.delay
        sent = self._try_send(1)
        return sent if isinstance(sent, Send) else self._send(1, sent)

    # -- attempts ----------------------------------------------------------------------

    def _send(self, attempt: int, why: str | None = None) -> Step:
        """``attempt``'s ``Send``, or the end when it may not go (``why``: it was tried)."""
        sent = self._try_send(attempt) if why is None else why
        if isinstance(sent, Send):
            return sent
        if sent is _BREAKER and attempt == 1:
            plan = self.plan
            assert plan.breaker is not None
            wait = plan.breaker.remaining_open_time()
            return self.refuse(
                CircuitOpenError(
                    f"circuit breaker {plan.breaker_name!r} is open for {plan.method}; "
                    f"retry in {wait:.3f}s",
                    pushback=wait if wait > 0 else None,
                )
            )
        if sent is _BREAKER:
            span_event("meshkit.rejected", {"reason": "circuit_open", "attempt": attempt})
        return self._give_up()

    def _try_send(self, attempt: int) -> Send | str:
        """Permission (the breaker's) and a timeout for ``attempt``, or why not."""
        plan = self.plan
        breaker = plan.breaker
        if breaker is not None and not breaker.try_acquire():
            return _BREAKER
        now = self._clock()
        timeout: float | None = None
        if self.deadline is not None:
            timeout = self.deadline - now
            if timeout <= 0:
                if breaker is not None:
                    breaker.release()
                return _DEADLINE
            if self.response_stream:
                timeout = max(_MIN_TIMEOUT, timeout)
        per_attempt = plan.per_attempt_timeout
        self._cut = False
        # Response streams are bounded by the call's deadline only: a per-attempt cut
        # would end a long, healthy stream.
        if (
            per_attempt is not None
            and not self.response_stream
            and (timeout is None or per_attempt < timeout)
        ):
            timeout, self._cut = per_attempt, True
        plan.tally.n += 1
        self.attempt = attempt
        self._inflight[attempt] = now
        if attempt > 1 and self.hedging:
            self._m.retries.add(1, plan.attrs)
            span_event("meshkit.hedge", {"attempt": attempt})
        md = None if attempt == 1 else add_attempt_header(self.metadata, attempt - 1)
        return Send(attempt, timeout, md)

    def _give_up(self) -> Step:
        """No further attempt can be sent: the last failure, or the deadline's error."""
        if self._last:
            return self._exhausted()
        message = (
            "deadline exceeded while hedging"
            if self.hedging
            else "the deadline passed before an attempt could be sent"
        )
        return self.refuse(DeadlineExceededError(message))

    def unsent(self) -> None:
        """The adapter could not send the last ``Send`` (nothing went out): the breaker's
        permit goes back, and the call is over."""
        self._drop(self.attempt)
        self.close()

    def _drop(self, attempt: int) -> None:
        if self._inflight.pop(attempt, None) is not None:
            breaker = self.plan.breaker
            if breaker is not None:
                breaker.release()

    def report(self, code: grpc.StatusCode, attempt: int = 0) -> None:
        """Tell the breaker how ``attempt`` (default: the latest) ended, once."""
        started = self._inflight.pop(attempt or self.attempt, None)
        breaker = self.plan.breaker
        if started is not None and breaker is not None:
            breaker.on_result(self._clock() - started, code.name)

    def outcome(
        self,
        code: grpc.StatusCode,
        trailers: Any = None,
        *,
        attempt: int = 0,
        replayable: bool = True,
    ) -> Step:
        """Attempt ``attempt`` (default: the latest) of a unary-response call ended with
        ``code`` (and ``trailers``, for pushback). ``replayable``: the request stream can
        be sent again."""
        attempt = attempt or self.attempt
        started = self._inflight.pop(attempt, None)
        breaker = self.plan.breaker
        if started is not None and breaker is not None:
            breaker.on_result(self._clock() - started, code.name)
        if self.hedging:
            return self._hedge_outcome(code, attempt)
        if code is _OK:
            return self._end(Finish(attempt))
        self._last, self._last_code = attempt, code
        if not replayable:
            return self._exhausted()
        delay = self._retry_delay(code, trailers, self._cut and code is _DEADLINE_EXCEEDED)
        if delay is None:
            return self._exhausted()
        self._after_sleep = self._send_next
        return Sleep(delay)

    def _send_next(self) -> Step:
        return self._send(self.attempt + 1)

    def resume(self) -> Step:
        """The ``Sleep`` is over: the next step."""
        assert self._after_sleep is not None
        return self._after_sleep()

    def _retry_delay(
        self, code: grpc.StatusCode, trailers: Any, per_attempt_cut: bool
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to stop with this outcome:
        attempts used up, a code not retryable, pushback saying stop, a wait past the
        deadline, or the target's retry budget spent."""
        plan = self.plan
        retry = plan.retry
        attempt = self.attempt
        if retry is None or attempt >= retry.max_attempts:
            return None
        if not retry.is_retryable(code.name, per_attempt_timeout_hit=per_attempt_cut):
            return None
        pushback = parse_pushback(trailers)
        if pushback == STOP:
            span_event("meshkit.retry.stopped", {"reason": "pushback"})
            return None
        delay = pushback if pushback is not None else retry.backoff(attempt, self._prev_delay, _rng)
        if self.deadline is not None and self._clock() + delay >= self.deadline:
            return None
        budget = plan.budget
        if budget is not None and not budget.try_withdraw():
            self._m.budget_exhausted.add(1, plan.attrs)
            span_event("meshkit.retry.budget_exhausted", {"attempt": attempt})
            return None
        self._m.retries.add(1, plan.attrs)
        span_event(
            "meshkit.retry",
            {"attempt": attempt + 1, "code": code.name, "delay_ms": round(delay * 1000.0, 3)},
        )
        self._prev_delay = delay
        return delay

    # -- response streams ----------------------------------------------------------------

    def commit(self) -> None:
        """A response stream's first message arrived: the breaker hears OK (the time to
        it), and the stream will not be retried."""
        if not self.committed:
            self.committed = True
            self.report(_OK)

    def stream_outcome(
        self, code: grpc.StatusCode, trailers: Any = None, *, replayable: bool = True
    ) -> Step:
        """A response stream's attempt ended with ``code`` (OK: it ended without an error):
        ``Finish`` (the error, or the end, stands) or ``Sleep`` before a retry."""
        self.report(code)
        if code is _OK or self.committed or not replayable:
            return FINISHED
        self._last, self._last_code = self.attempt, code
        delay = self._retry_delay(code, trailers, False)
        if delay is None:
            return FINISHED
        self._after_sleep = self._send_next
        return Sleep(delay)

    # -- hedging -------------------------------------------------------------------------

    def _hedge_outcome(self, code: grpc.StatusCode, attempt: int) -> Step:
        hedging = self.plan.hedging
        assert hedging is not None
        if code is _OK or hedging.is_fatal(code.name):
            return self._end(Finish(attempt))
        self._last, self._last_code = attempt, code
        if self._hedge_open:  # a non-fatal failure: the next hedge goes at once
            sent = self._hedge()
            if sent is not None:
                return sent
        return self.tick()

    def tick(self) -> Step:
        """Hedging: the next step now (a hedge when its delay is over, the end when
        nothing more can come, else how long to wait)."""
        now = self._clock()
        if self.deadline is not None and now >= self.deadline:
            return self._give_up()
        if self._hedge_open and now >= self._next_hedge:
            sent = self._hedge()
            if sent is not None:
                return sent
        if not self._hedge_open and not self._inflight and self._last:
            return self._give_up()
        until = self._next_hedge if self._hedge_open else self.deadline
        if self.deadline is not None and until is not None:
            until = min(until, self.deadline)
        return Await(until)

    def _hedge(self) -> Send | None:
        plan = self.plan
        hedging = plan.hedging
        assert hedging is not None
        budget = plan.budget
        if budget is not None and not budget.try_withdraw():
            self._m.budget_exhausted.add(1, plan.attrs)
            sent: Send | str = _BUDGET
        else:
            sent = self._try_send(self.attempt + 1)
        if isinstance(sent, Send):
            self._next_hedge = self._clock() + hedging.delay
            self._hedge_open = sent.attempt < hedging.max_attempts
            return sent
        # Budget spent, breaker open or deadline passed: wait for those in flight.
        self._hedge_open = False
        return None

    # -- endings -------------------------------------------------------------------------

    def _exhausted(self) -> Step:
        """The last attempt failed: a fallback for transient failures, else that failure."""
        done = Finish(self._last)
        plan = self.plan
        fb = plan.fallback
        if fb is None or self.response_stream:
            return self._end(done)
        code = self._last_code
        trigger: str | None = None
        if code is _DEADLINE_EXCEEDED:
            trigger = "deadline_exceeded"
        elif (plan.retry is not None and plan.retry.is_retryable(code.name)) or code.name in (
            "UNAVAILABLE",
            "RESOURCE_EXHAUSTED",
        ):
            trigger = "retries_exhausted"
        return self._end(self._fallback(trigger, done) if trigger is not None else done)

    def refuse(self, exc: MeshkitError) -> Step:
        """The call is refused before (another attempt is) sent: a fallback, or ``exc``."""
        plan = self.plan
        self._m.failed_before_send.add(1, plan.attrs)
        trigger = _trigger_of(exc)
        span_event("meshkit.rejected", {"reason": trigger})
        return self._end(self._fallback(trigger, Fail.of(exc)))

    def _fallback(self, trigger: str, otherwise: Fail | Finish) -> Step:
        fb = self.plan.fallback
        if fb is None or self.response_stream or not fb.handles(trigger):
            return otherwise
        kind = str(fb.kind)
        if self.request_stream and kind in ("cached", "alternate"):
            return otherwise  # a client stream has no single request to key or resend
        return Serve(kind, trigger, otherwise)

    def served(self, step: Serve) -> None:
        """The fallback of ``step`` answered: count and annotate it."""
        self._m.fallbacks.add(1, self.plan.attrs)
        span_event("meshkit.fallback", {"kind": step.kind, "trigger": step.trigger})

    def _end(self, step: Step) -> Step:
        # A unary call ends with its answer: permits in flight go back (hedges being
        # cancelled get no verdict), and the bulkhead's.
        if not self.response_stream or isinstance(step, Fail):
            if self._inflight:
                for attempt in list(self._inflight):
                    self._drop(attempt)
            self.closed = True
            if self._permit:  # (close(), inline: this is every call's path)
                self._permit = False
                bulkhead = self.plan.bulkhead
                assert bulkhead is not None
                bulkhead.release()
        return step

    def cancel(self) -> None:
        """The caller cancelled (or dropped) the call: the attempt in flight gets no
        verdict, its permits go back."""
        for attempt in list(self._inflight):
            self._drop(attempt)
        self.close()

    def close(self) -> None:
        """Return the bulkhead permit, once (a response stream calls it when it ends)."""
        self.closed = True
        if self._permit:
            self._permit = False
            bulkhead = self.plan.bulkhead
            assert bulkhead is not None
            bulkhead.release()
