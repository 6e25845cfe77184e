"""Injectable clocks: policies ask a clock for the time, so tests never sleep."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """A monotonic time source in seconds."""

    def now(self) -> float:
        """Return monotonic seconds; only differences are meaningful."""
        ...


class SystemClock:
    """The process's monotonic clock."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK: Clock = SystemClock()


class FakeClock:
    """A clock that moves only when told to, for deterministic state-machine tests."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (never backwards)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds})")
        with self._lock:
            self._now += seconds

    def set(self, now: float) -> None:
        """Jump to an absolute time no earlier than the current one."""
        with self._lock:
            if now < self._now:
                raise ValueError(f"a clock cannot go back: {now} < {self._now}")
            self._now = now
