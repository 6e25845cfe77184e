"""A semaphore bulkhead: at most ``max_concurrent`` calls at once.

Use one instance from threads (:meth:`Bulkhead.acquire`) or from one asyncio event
loop (:meth:`Bulkhead.acquire_async`), not both: asyncio waiters are woken on their
loop and a thread blocked in :meth:`~Bulkhead.acquire` is not woken by the loop's
hand-off order. :meth:`~Bulkhead.try_acquire` and :meth:`~Bulkhead.release` are
thread-safe and never block, so they are safe anywhere. The registry in
:class:`meshkit.config.Policy` hands out separate instances per key, so adapters
include the flavour (sync or aio) in the key when both run in one process.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass
from enum import StrEnum

from meshkit.resilience.clock import SYSTEM_CLOCK, Clock
from meshkit.resilience.events import Event, EventEmitter


class Side(StrEnum):
    """Where a server-or-client policy applies."""

    CLIENT = "client"
    SERVER = "server"
    BOTH = "both"


class LimitScope(StrEnum):
    """Which calls share one bulkhead, limiter or rate limit."""

    SERVICE = "service"
    METHOD = "method"


@dataclass(frozen=True, slots=True)
class BulkheadConfig:
    """``max_concurrent`` permits; a caller waits at most ``max_wait`` for one.

    ``scope``: one bulkhead per service (so a slow service cannot starve the others) or per
    method. ``side``: apply in client interceptors, server interceptors or both.
    """

    max_concurrent: int = 10
    max_wait: float = 0.0
    scope: LimitScope = LimitScope.SERVICE
    side: Side = Side.BOTH

    def applies_to(self, side: str) -> bool:
        """Whether the adapter on ``side`` (``"client"``/``"server"``) applies it."""
        return self.side is Side.BOTH or self.side.value == side


class Bulkhead(EventEmitter):
    """Counts calls in flight and refuses the one past ``max_concurrent``.

    ``in_flight`` and ``rejected`` are plain counters for telemetry gauges.
    A refusal emits an event of kind ``"rejected"``.
    """

    def __init__(
        self,
        config: BulkheadConfig | None = None,
        *,
        name: str = "",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else BulkheadConfig()
        self._max = self.config.max_concurrent  # the config is frozen; read per call
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._thread_waiters = 0
        self._in_flight = 0
        self._rejected = 0
        self._async_waiters: collections.deque[asyncio.Future[bool]] = collections.deque()

    @property
    def in_flight(self) -> int:
        """Permits currently held."""
        return self._in_flight

    @property
    def rejected(self) -> int:
        """Calls refused since creation."""
        return self._rejected

    @property
    def available(self) -> int:
        """Permits free right now."""
        return max(0, self.config.max_concurrent - self._in_flight)

    def try_acquire(self) -> bool:
        """Take a permit if one is free now; never waits."""
        with self._lock:
            # Queued asyncio waiters go first (FIFO fairness).
            if self._in_flight < self._max and not self._async_waiters:
                self._in_flight += 1
                return True
            self._rejected += 1
        self._reject()
        return False

    def acquire(self, timeout: float | None = None) -> bool:
        """Take a permit, blocking the thread up to ``min(timeout, max_wait)`` seconds.

        ``timeout`` is typically the call's remaining deadline. Returns ``False`` (and
        counts a rejection) when no permit came in time.
        """
        wait = self._wait_for(timeout)
        with self._lock:
            if self._in_flight < self.config.max_concurrent:
                self._in_flight += 1
                return True
            if wait > 0:
                self._thread_waiters += 1
                try:
                    got = self._cond.wait_for(
                        lambda: self._in_flight < self.config.max_concurrent, timeout=wait
                    )
                finally:
                    self._thread_waiters -= 1
                if got:
                    self._in_flight += 1
                    return True
            self._rejected += 1
        self._reject()
        return False

    async def acquire_async(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Take a permit, waiting on the event loop up to ``min(timeout, max_wait)``.

        Waiters are served first come, first served. Cancelling the waiting task
        gives nothing away: a permit handed over during cancellation is released.
        """
        wait = self._wait_for(timeout)
        with self._lock:
            if self._in_flight < self.config.max_concurrent and not self._async_waiters:
                self._in_flight += 1
                return True
            if wait <= 0:
                self._rejected += 1
                fut = None
            else:
                fut = asyncio.get_running_loop().create_future()
                self._async_waiters.append(fut)
        if fut is None:
            self._reject()
            return False
        try:
            await asyncio.wait_for(asyncio.shield(fut), wait)
            return True
        except TimeoutError:
            pass
        except BaseException:
            if self._abandon(fut):
                self.release()
            raise
        if self._abandon(fut):
            # The permit arrived just as the wait ended: keep it.
            return True
        with self._lock:
            self._rejected += 1
        self._reject()
        return False

    def release(self) -> None:
        """Return a permit; hands it straight to the oldest asyncio waiter, if any."""
        with self._lock:
            while self._async_waiters:
                fut = self._async_waiters.popleft()
                if not fut.done():
                    # The permit moves to the waiter: in_flight is unchanged.
                    self._wake(fut)
                    return
            if self._in_flight > 0:
                self._in_flight -= 1
            if self._thread_waiters:
                self._cond.notify()

    def _abandon(self, fut: asyncio.Future[bool]) -> bool:
        """Stop waiting on ``fut``. True if a permit had already been handed to it."""
        with self._lock:
            try:
                self._async_waiters.remove(fut)
            except ValueError:
                pass
            granted = fut.done() and not fut.cancelled()
            if not fut.done():
                fut.cancel()
        return granted

    def _wait_for(self, timeout: float | None) -> float:
        wait = self.config.max_wait
        if timeout is not None:
            wait = min(wait, timeout)
        return max(0.0, wait)

    def _reject(self) -> None:
        self._emit(Event("rejected", "bulkhead", self.name, self._clock.now()))

    def _wake(self, fut: asyncio.Future[bool]) -> None:
        loop = fut.get_loop()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fut.set_result(True)
        else:
            loop.call_soon_threadsafe(self._hand_over, fut)

    def _hand_over(self, fut: asyncio.Future[bool]) -> None:
        if fut.done():
            # The waiter gave up before the permit reached it: pass it on.
            self.release()
        else:
            fut.set_result(True)
