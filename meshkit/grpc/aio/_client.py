"""The fused asyncio client interceptor (grpc.aio): the attempt engine's steps, waited
for on the event loop. As :mod:`meshkit.grpc._client`; every decision is
:class:`~meshkit.grpc._engine.Attempts`'."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
import grpc.aio

from meshkit._compat.grpcio import AioHalfClose
from meshkit.grpc._adapter import ClientAdapter, StreamState
from meshkit.grpc._engine import (
    FINISHED,
    Acquire,
    Attempts,
    Await,
    Fail,
    Finish,
    Send,
    Serve,
    Sleep,
    Step,
)
from meshkit.grpc._fallback import FallbackError
from meshkit.grpc._plan import ClientPlan
from meshkit.grpc._replay import AsyncReplay
from meshkit.grpc._status import code_of, pushback_metadata

__all__ = ["AioClientInterceptor", "arity_views"]

_log = logging.getLogger("meshkit.grpc")
_monotonic = time.monotonic
_OK = grpc.StatusCode.OK
_Details = grpc.aio.ClientCallDetails
AioRpcError = grpc.aio.AioRpcError
_SUCall = grpc.aio.StreamUnaryCall
_EOF: Any = getattr(grpc.aio, "EOF", None)
Requests = AsyncIterable[Any] | Iterable[Any]
#: grpc.aio's continuation: sends the call (a request or a request stream) and returns
#: grpc.aio's call object for it.
Continuation = Callable[[_Details, Any], Awaitable[Any]]


def _details(d: _Details, timeout: float | None, metadata: Any = None) -> _Details:
    return _Details(
        d.method,
        timeout,
        d.metadata if metadata is None else metadata,
        d.credentials,
        d.wait_for_ready,
    )


def _for_attempt(d: _Details, step: Send) -> _Details:
    if step.metadata is None:
        return d if step.timeout == d.timeout else _details(d, step.timeout)
    return _details(d, step.timeout, grpc.aio.Metadata(*step.metadata))


def _error(code: grpc.StatusCode, message: str, trailers: Any = ()) -> AioRpcError:
    return AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), message, None)


def _failure(step: Fail) -> AioRpcError:
    return _error(step.code, step.message, pushback_metadata(step.pushback))


async def _wait(eng: Attempts, step: Sleep | Acquire) -> Step:
    """Wait out a ``Sleep`` or an ``Acquire``; the engine's next step."""
    if isinstance(step, Sleep):
        await asyncio.sleep(step.seconds)
        return eng.resume()
    bulkhead = eng.plan.bulkhead
    assert bulkhead is not None
    return eng.acquired(await bulkhead.acquire_async(step.max_wait))


class AioClientInterceptor(
    ClientAdapter[grpc.aio.Channel],
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """One grpc.aio client interceptor applying a :class:`~meshkit.Policy`.

    As :class:`meshkit.grpc.ClientInterceptor`; waits happen on the event loop
    (arguments: see :class:`~meshkit.grpc._adapter.ClientAdapter`).
    """

    flavour = "aio"

    def _insecure_channel(self, target: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(target)

    def _engine(
        self, details: _Details, request_stream: bool, response_stream: bool
    ) -> tuple[ClientPlan, Attempts | None, _Details, Step]:
        """The plan, the engine of a call that needs one (None: send the returned details
        as they are) and its first step. A refusal without a fallback raises."""
        plan, eng, timeout, refusal = self._admit(
            details.method, details.timeout, details.metadata, request_stream, response_stream
        )
        if isinstance(refusal, Fail):
            raise _failure(refusal)
        if eng is None:
            if timeout != details.timeout:
                details = _details(details, timeout)
            return plan, None, details, FINISHED
        return plan, eng, details, refusal if refusal is not None else eng.start()

    # -- unary responses ---------------------------------------------------------------

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: _Details, request: Any
    ) -> Any:
        _plan, eng, details, step = self._engine(client_call_details, False, False)
        if eng is None:
            return await continuation(details, request)
        return await self._run(eng, step, continuation, details, request, None)

    async def intercept_stream_unary(
        self, continuation: Continuation, client_call_details: _Details, request_iterator: Requests
    ) -> Any:
        plan, eng, details, step = self._engine(client_call_details, True, False)
        if eng is None:
            return await continuation(details, request_iterator)
        # Always through a replay (limit 0 without retries): never hedged, never cached.
        limit = plan.retry.max_buffer_bytes if plan.retry is not None else 0
        replay = AsyncReplay(request_iterator, limit)
        # Return a call at once: grpc.aio feeds ``call.write()`` messages to the request
        # iterator only after the interceptor returned, so waiting here for the response
        # would wait for writes that cannot come. The attempts run on a task.
        task = asyncio.ensure_future(self._run(eng, step, continuation, details, None, replay))
        return _AioUnaryCall(task, replay)

    async def _run(
        self,
        eng: Attempts,
        step: Step,
        continuation: Continuation,
        details: _Details,
        request: Any,
        replay: AsyncReplay | None,
    ) -> Any:
        """Run the engine's steps to the answer: the last attempt's call, a fallback
        value, or an ``AioRpcError`` raised."""
        call: Any = None
        while True:
            if isinstance(step, Send):
                if eng.hedging:
                    return await self._hedged(eng, step, continuation, details, request)
                try:
                    call = await continuation(
                        _for_attempt(details, step),
                        replay.attempt() if replay is not None else request,
                    )
                    try:
                        response = await call
                    except AioRpcError as err:
                        step = eng.outcome(
                            err.code(),
                            err.trailing_metadata(),
                            replayable=replay is None or replay.replayable,
                        )
                    else:
                        step = eng.outcome(_OK)
                        if replay is None and eng.plan.fallback is not None:
                            self._remember(eng.plan, request, response)
                except BaseException:  # cancelled, or nothing could be sent
                    eng.cancel()
                    raise
            elif isinstance(step, Sleep | Acquire):
                step = await _wait(eng, step)
            elif isinstance(step, Finish):
                return call  # (the common answer, without another coroutine)
            else:
                return await self._answer(eng, step, call, details, request)

    async def _hedged(
        self, eng: Attempts, step: Step, continuation: Continuation, details: _Details, request: Any
    ) -> Any:
        """Race the engine's hedges as tasks; the losers are cancelled."""
        tasks: dict[asyncio.Task[tuple[Any, grpc.StatusCode, Any]], int] = {}
        calls: dict[int, Any] = {}

        async def attempt(send: Send) -> tuple[Any, grpc.StatusCode, Any]:
            call = calls[send.attempt] = await continuation(_for_attempt(details, send), request)
            try:
                response = await call
            except AioRpcError as err:
                return call, err.code(), err.trailing_metadata()
            self._remember(eng.plan, request, response)
            return call, _OK, None

        try:
            while True:
                if isinstance(step, Send):
                    tasks[asyncio.ensure_future(attempt(step))] = step.attempt
                    step = eng.tick()
                elif isinstance(step, Await):
                    pending = {t for t in tasks if tasks[t] > 0}
                    wait = None if step.until is None else max(0.0, step.until - _monotonic())
                    done: set[Any] = set()
                    if pending:
                        done, _ = await asyncio.wait(
                            pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                        )
                    elif wait:
                        await asyncio.sleep(wait)
                    if not done:
                        step = eng.tick()
                        continue
                    task = done.pop()  # one at a time: the rest are seen on the next turn
                    number, tasks[task] = tasks[task], 0
                    _call, code, trailers = task.result()
                    step = eng.outcome(code, trailers, attempt=number)
                else:
                    break
        except BaseException:
            eng.cancel()
            raise
        finally:
            for task in tasks:
                task.cancel()
            for call in calls.values():
                if not call.done():
                    call.cancel()
        last = step.otherwise if isinstance(step, Serve) else step
        call = calls.get(last.attempt) if isinstance(last, Finish) else None
        return await self._answer(eng, step, call, details, request)

    async def _answer(
        self, eng: Attempts, step: Step, call: Any, details: _Details, request: Any
    ) -> Any:
        if isinstance(step, Serve):
            found, value = await self._serve(eng, step, request, details)
            if found:
                return value
            step = step.otherwise
        if isinstance(step, Fail):
            raise _failure(step)
        return call

    async def _serve(
        self, eng: Attempts, step: Serve, request: Any, details: _Details
    ) -> tuple[bool, Any]:
        try:
            if step.kind == "alternate":
                alternate = self._alternate(eng, request)
                if alternate is None:
                    return False, None
                call, left = alternate
                value = await call(request, timeout=left, metadata=details.metadata)
            else:
                found, value = self._local_fallback(eng, step, request)
                if not found:
                    return False, None
        except FallbackError as exc:
            eng.served(step)
            raise _error(code_of(exc.code), exc.message) from None
        eng.served(step)
        return True, value

    async def close(self) -> None:
        """Close the channels opened for alternate-target fallbacks."""
        for channel in self._alternates.values():
            await channel.close(None)
        self._alternates.clear()

    # -- streaming responses -------------------------------------------------------------
    # (``continuation: Any``: grpc-stubs declare these continuations as returning the call,
    # but grpc.aio's are coroutines, as for the other arities.)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: _Details, request: Any
    ) -> Any:
        return await self._stream(continuation, client_call_details, request, None)

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: _Details, request_iterator: Requests
    ) -> Any:
        return await self._stream(continuation, client_call_details, None, request_iterator)

    async def _stream(
        self,
        continuation: Continuation,
        details: _Details,
        request: Any,
        request_iterator: Requests | None,
    ) -> Any:
        body = request if request_iterator is None else request_iterator
        plan, eng, details, step = self._engine(details, request_iterator is not None, True)
        if eng is None:
            return await continuation(details, body)
        # A request stream always goes through a replay (limit 0 without retries): it
        # also tells when the stream has ended (grpc.aio's ``write()`` asks).
        replay = None
        if request_iterator is not None:
            limit = plan.retry.max_buffer_bytes if plan.retry is not None else 0
            replay = AsyncReplay(request_iterator, limit)
        state = _StreamState(eng, continuation, details, body, replay)
        step = await state.advance(step)
        if isinstance(step, Fail):
            raise _failure(step)
        return _AioStream(state, _stream_gen(state))


class _StreamState(StreamState):
    """A response stream's state (:class:`~meshkit.grpc._adapter.StreamState`), shared by
    the stream object and its generator, so neither refers to the other and a dropped
    stream is finalised at once (no reference cycle to wait for)."""

    __slots__ = ()

    async def advance(self, step: Step) -> Step:
        """Run the engine's steps until an attempt is sent (then ``Send``) or the end."""
        eng = self.eng
        while True:
            if isinstance(step, Sleep | Acquire):
                step = await _wait(eng, step)
                if eng.closed:  # cancelled (or past its deadline) during the backoff
                    raise asyncio.CancelledError()
            elif isinstance(step, Send):
                try:
                    self.call = await self.continuation(
                        _for_attempt(self.details, step), self.attempt_body()
                    )
                except BaseException:
                    eng.unsent()
                    raise
                self.call.add_done_callback(self.on_done)
                return step
            else:
                return step

    def on_done(self, call: Any) -> None:
        # The call is over and will not be retried (committed streams never are, nor are
        # cancelled ones, nor any past the deadline): its permits go back even if nobody
        # reads the rest of it. grpc.aio keeps an unread call alive until it ends.
        eng = self.eng
        if call is not self.call or eng.closed:
            return
        if eng.committed or call.cancelled():
            eng.cancel()
            return
        # (grpc core may fire the deadline a hair before our clock reads it)
        if eng.deadline is not None and _monotonic() >= eng.deadline - 0.01:
            # A reader that waited out the deadline for a first message saw a hung server: a
            # failure for the breaker. An unread stream says nothing about the server.
            if self.reading:
                eng.report(grpc.StatusCode.DEADLINE_EXCEEDED)
            eng.cancel()


async def _stream_gen(state: _StreamState) -> AsyncIterator[Any]:
    eng = state.eng
    state.reading = True
    try:
        while True:
            try:
                async for message in state.call:
                    eng.commit()
                    yield message
                eng.stream_outcome(_OK)
                return
            except AioRpcError as err:
                step = eng.stream_outcome(
                    err.code(), err.trailing_metadata(), replayable=state.replayable
                )
                if not isinstance(step, Sleep):
                    raise
                failed = err
            step = await state.advance(step)
            if isinstance(step, Fail):
                raise _failure(step) from failed
            if not isinstance(step, Send):
                raise failed
    finally:
        call = state.call
        if call is not None and not call.done():
            call.cancel()
        eng.cancel()


class _AioStream(AioHalfClose, grpc.aio.UnaryStreamCall, grpc.aio.StreamStreamCall):  # type: ignore[misc,type-arg]
    """A response stream retried until committed; the call methods follow the current attempt."""

    def __init__(self, state: _StreamState, gen: AsyncIterator[Any]) -> None:
        self._state = state
        self._gen = gen

    @property
    def _call(self) -> Any:
        return self._state.call

    def __del__(self) -> None:
        state = self._state
        if not state.eng.closed:
            with contextlib.suppress(Exception):  # e.g. the loop is already gone
                state.call.cancel()
            state.eng.cancel()

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

    def half_closed(self) -> bool:
        replay = self._state.replay
        return replay is not None and bool(replay.source_done)

    async def write(self, request: Any) -> None:
        await self._call.write(request)

    async def done_writing(self) -> None:
        await self._call.done_writing()

    def cancel(self) -> bool:
        state = self._state
        if state.eng.closed:
            return False
        # The attempt in flight is cancelled, or the retry waiting out its backoff is dropped.
        state.call.cancel()
        state.eng.cancel()
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


class _AioUnaryCall(AioHalfClose, grpc.aio.StreamUnaryCall):  # type: ignore[misc,type-arg]
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

    def half_closed(self) -> bool:
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

    async def write(self, request: Any) -> None:
        # grpc.aio hands the caller its own wrapper, whose write() feeds our request
        # iterator: nothing reaches this object's write() through the public API.
        raise RuntimeError("write() belongs to the call grpc.aio returned, not to this view")

    async def done_writing(self) -> None:
        raise RuntimeError("done_writing() belongs to the call grpc.aio returned, not to this view")


def _arity_view(arity: type[Any], name: str) -> type[Any]:
    """A view of the fused interceptor filed under one more arity.

    grpc.aio files each interceptor under ONE arity (an ``elif`` chain on its type), so
    the fused interceptor is registered once per arity through these views. A call still
    runs through exactly one interceptor: the view's method is the core's own."""

    def __init__(self: Any, core: AioClientInterceptor) -> None:
        self.core = core
        setattr(self, name, getattr(core, name))  # no forwarding frame per call

    async def forward(self: Any, continuation: Continuation, details: Any, body: Any) -> Any:
        return await getattr(self.core, name)(continuation, details, body)  # pragma: no cover

    return type(f"_{arity.__name__}View", (arity,), {"__init__": __init__, name: forward})


_VIEWS = (
    _arity_view(grpc.aio.UnaryStreamClientInterceptor, "intercept_unary_stream"),
    _arity_view(grpc.aio.StreamUnaryClientInterceptor, "intercept_stream_unary"),
    _arity_view(grpc.aio.StreamStreamClientInterceptor, "intercept_stream_stream"),
)


def arity_views(core: AioClientInterceptor) -> list[Any]:
    """``core`` (filed as unary-unary) plus its views for the other three arities."""
    return [core, *(view(core) for view in _VIEWS)]
