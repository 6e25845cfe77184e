"""DisconnectGuard: a client leaving cancels the awaited call, through the server's
``meshkit.disconnect`` hook or, without one, a watch of ``receive()`` that begins only
once the call has run about WATCH_AFTER seconds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from meshkit.gateway.core import _disconnect
from meshkit.gateway.core._disconnect import DISCONNECT_EXTENSION, WATCH_AFTER, DisconnectGuard

pytestmark = pytest.mark.unit


class Hook:
    """A server's side of the extension: holds the callback it would call on a lost connection."""

    def __init__(self) -> None:
        self.callback: Callable[[], object] | None = None
        self.calls: list[object] = []

    def __call__(self, callback: Callable[[], object] | None) -> None:
        self.calls.append(callback)
        self.callback = callback


class Client:
    """An ASGI ``receive`` for a request without a body, whose client leaves on ``leave()``."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.calls = 0

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        if self.calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def _no_receive() -> dict[str, Any]:
    raise AssertionError("receive() must not be called when the server has the hook")


async def _call_until_cancelled(started: asyncio.Event) -> None:
    started.set()
    await asyncio.Event().wait()


async def _guarded(scope: dict[str, Any], receive: Any, call: Any) -> tuple[str, int]:
    """What the unary handler does: arm, await the call, release. Returns how it ended
    and the task's remaining cancellation requests."""
    guard = DisconnectGuard(scope, receive)
    task = asyncio.current_task()
    assert task is not None
    try:
        await call
    except asyncio.CancelledError:
        if guard.release():
            return "client gone", task.cancelling()
        raise
    return ("client gone" if guard.release() else "answered"), task.cancelling()


async def test_hook_cancels_the_call_when_the_connection_is_lost() -> None:
    hook = Hook()
    started = asyncio.Event()
    scope = {"extensions": {DISCONNECT_EXTENSION: hook}}
    handler = asyncio.create_task(_guarded(scope, _no_receive, _call_until_cancelled(started)))
    await asyncio.wait_for(started.wait(), 5)
    assert hook.callback is not None
    hook.callback()  # connection_lost
    assert await asyncio.wait_for(handler, 5) == ("client gone", 0)  # cancellation withdrawn
    assert hook.calls[-1] is None  # and the callback withdrawn


async def test_hook_registration_is_withdrawn_after_an_answer() -> None:
    hook = Hook()
    scope = {"extensions": {DISCONNECT_EXTENSION: hook}}
    assert await _guarded(scope, _no_receive, asyncio.sleep(0)) == ("answered", 0)
    assert len(hook.calls) == 2 and hook.calls[0] is not None and hook.calls[1] is None


async def test_other_cancellations_still_propagate() -> None:
    # The client leaves while the server is also shutting the request down: the
    # server's cancellation must not be swallowed with the guard's.
    hook = Hook()
    started = asyncio.Event()
    scope = {"extensions": {DISCONNECT_EXTENSION: hook}}
    handler = asyncio.create_task(_guarded(scope, _no_receive, _call_until_cancelled(started)))
    await asyncio.wait_for(started.wait(), 5)
    assert hook.callback is not None
    hook.callback()
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(handler, 5)


async def test_without_the_hook_a_watch_of_receive_cancels_a_long_call() -> None:
    client = Client()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    handler = asyncio.create_task(_guarded({}, client.receive, _call_until_cancelled(started)))
    await asyncio.wait_for(started.wait(), 5)
    client.gone.set()  # the client leaves at once; the watch notices once it begins
    assert await asyncio.wait_for(handler, 5) == ("client gone", 0)
    assert loop.time() - t0 >= WATCH_AFTER / 2  # not watched from the start
    assert client.calls == 2  # the request message, then the disconnect


async def test_without_the_hook_a_short_call_never_reads_receive() -> None:
    client = Client()
    assert await _guarded({}, client.receive, asyncio.sleep(0)) == ("answered", 0)
    sweeper = _disconnect._sweepers[asyncio.get_running_loop()]
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while sweeper.timer is not None:  # the sweeps run out once nothing is in flight
        assert loop.time() < end
        await asyncio.sleep(0.01)
    assert client.calls == 0 and not sweeper.pending


async def test_a_receive_that_never_reports_the_disconnect_is_not_polled() -> None:
    # A non-conforming receive() that answers http.request forever: watched twice, then
    # left alone (no busy loop), and the call is not cancelled.
    calls = 0

    async def chatty() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    async def long_call() -> str:
        while calls < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # time for a busy loop to show
        return "done"

    assert await asyncio.wait_for(_guarded({}, chatty, long_call()), 5) == ("answered", 0)
    assert calls == 2
