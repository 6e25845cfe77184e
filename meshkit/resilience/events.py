"""Events emitted by the resilience state machines, for telemetry and logs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

_log = logging.getLogger("meshkit.resilience")


@dataclass(frozen=True, slots=True)
class Event:
    """Something a state machine did that telemetry may count.

    ``kind`` is one of:

    * ``"state_transition"`` (circuit breaker; ``from_state``/``to_state`` set),
    * ``"not_permitted"`` (circuit breaker rejected a call),
    * ``"rejected"`` (bulkhead, adaptive limiter or rate limiter refused a permit),
    * ``"budget_exhausted"`` (retry budget refused a retry),
    * ``"limit_changed"`` (adaptive limiter; ``value`` is the new limit).

    ``source`` names the pattern (``"circuit_breaker"``, ``"bulkhead"``,
    ``"adaptive_limit"``, ``"rate_limit"``, ``"retry_budget"``); ``name`` the
    instance (the registry key); ``at`` is the clock's time.
    """

    kind: str
    source: str
    name: str
    at: float
    from_state: str | None = None
    to_state: str | None = None
    value: float | None = None


Listener = Callable[[Event], None]


class EventEmitter:
    """A small listener list. Listeners run on the caller's thread, outside locks.

    A failing listener is logged and never breaks the call that emitted.
    """

    __slots__ = ("_listeners", "_listeners_lock")

    def __init__(self) -> None:
        self._listeners: tuple[Listener, ...] = ()
        self._listeners_lock = threading.Lock()

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every event from now on."""
        with self._listeners_lock:
            self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        with self._listeners_lock:
            self._listeners = tuple(x for x in self._listeners if x != listener)

    def _emit(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                _log.exception("a resilience event listener failed on %s", event)
