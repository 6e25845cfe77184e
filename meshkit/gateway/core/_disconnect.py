"""Cancelling a unary upstream call when its HTTP client goes away.

ASGI reports a disconnect only as an ``http.disconnect`` message from ``receive()``, so
noticing one while the upstream call is in flight would take a second task blocked on
``receive()``: a task created, scheduled and cancelled per request, on the hot path the
gateway benchmark measures. Instead:

* A server can offer the scope extension ``"meshkit.disconnect"``: a callable taking a
  zero-argument callback (or ``None`` to withdraw it) that the server calls once if the
  connection is lost before the response is complete. The CLI's protocol
  (:mod:`meshkit.gateway.serve._http`) does; registering costs two calls per request.
* Under any other server, a task watching ``receive()`` starts only once the call has
  run for about :data:`WATCH_AFTER` seconds. Calls are not timed one by one (a timer per
  call costs most of what a task does under uvloop): one timer per event loop sweeps the
  calls in flight twice per :data:`WATCH_AFTER`, so a call answered sooner (nearly all
  of them) costs a dict insertion and removal, and a client that leaves a longer call
  cancels it at most :data:`WATCH_AFTER` after the watch begins.

Either way the request's task is cancelled while it awaits the call, which cancels the
gRPC call (the upstream sees CANCELLED), and the handler returns without answering.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

#: The scope extension (``scope["extensions"][DISCONNECT_EXTENSION]``) described above.
DISCONNECT_EXTENSION = "meshkit.disconnect"
#: Without the extension, a task watches for the disconnect once a call has run between
#: half this and this many seconds.
WATCH_AFTER = 0.1

DisconnectHook = Callable[[Callable[[], object] | None], None]


class _Sweeper:
    """One per event loop: while calls are in flight, a timer every ``WATCH_AFTER / 2``
    seconds starts the watch of each call armed two sweeps ago or earlier."""

    __slots__ = ("pending", "tick", "timer")

    def __init__(self) -> None:
        self.pending: dict[DisconnectGuard, int] = {}  # guard -> the tick it was armed in
        self.tick = 0
        self.timer: asyncio.TimerHandle | None = None

    def add(self, guard: DisconnectGuard, loop: asyncio.AbstractEventLoop) -> None:
        self.pending[guard] = self.tick
        if self.timer is None:
            self.timer = loop.call_later(WATCH_AFTER / 2, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self.tick = tick = self.tick + 1
        due = [g for g, armed in self.pending.items() if tick - armed >= 2]
        for guard in due:
            del self.pending[guard]
            guard._watch(loop)
        self.timer = loop.call_later(WATCH_AFTER / 2, self._sweep, loop) if self.pending else None


# The sweeper holds no reference to its loop, so an entry goes when the loop does.
_sweepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweeper] = (
    weakref.WeakKeyDictionary()
)


class DisconnectGuard:
    """Cancels the current task if the HTTP client leaves while the guard is armed.

    Arm it right before awaiting the upstream call and :meth:`release` it right after,
    with no other await in between: the cancellation can then only land in that call.
    """

    __slots__ = ("_hook", "_receive", "_sweeper", "_task", "_watcher", "fired")

    def __init__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    ) -> None:
        self.fired = False
        self._task = task = asyncio.current_task()
        self._receive = receive
        self._sweeper: _Sweeper | None = None
        self._watcher: asyncio.Task[None] | None = None
        ext = scope.get("extensions")
        hook: DisconnectHook | None = ext.get(DISCONNECT_EXTENSION) if ext else None
        self._hook = hook
        if task is None:
            return
        if hook is not None:
            hook(self._fire)
            return
        loop = task.get_loop()
        sweeper = _sweepers.get(loop)
        if sweeper is None:
            sweeper = _sweepers[loop] = _Sweeper()
        sweeper.add(self, loop)
        self._sweeper = sweeper

    def _fire(self) -> None:
        task = self._task
        if task is not None and not self.fired:
            self.fired = True
            task.cancel()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = None
        if self._task is not None:
            self._watcher = loop.create_task(self._read())

    async def _read(self) -> None:
        receive = self._receive
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                self._fire()
                return
            if not msg.get("more_body", False):
                break
        # The body is complete: a conforming server's next message is the disconnect. A
        # receive() that keeps answering otherwise is not watched further (no busy loop).
        if (await receive())["type"] == "http.disconnect":
            self._fire()

    def release(self) -> bool:
        """Disarm; True when the client has gone (the cancellation this guard caused is
        withdrawn, and the caller should return without answering)."""
        task = self._task
        self._task = None
        if self._hook is not None:
            self._hook(None)
        elif self._sweeper is not None:
            del self._sweeper.pending[self]
            self._sweeper = None
        elif self._watcher is not None:
            self._watcher.cancel()
        if not self.fired or task is None:
            return False
        # Undo this guard's cancel() so the task is not left marked as being cancelled;
        # a cancellation from elsewhere (server shutdown) still propagates.
        return task.uncancel() == 0
