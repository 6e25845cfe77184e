"""A circuit breaker after Resilience4j's: a state machine apart from the call.

The adapter asks :meth:`CircuitBreaker.try_acquire` before a call, then reports
exactly one of :meth:`~CircuitBreaker.on_result` (with the call's duration and
status code name) or :meth:`~CircuitBreaker.release` (the call ended without an
outcome, e.g. the caller cancelled it). Nothing here blocks or sleeps: OPEN turns
into HALF_OPEN lazily, when the breaker is next consulted after ``open_duration``.

States: CLOSED (calls pass, outcomes recorded in a sliding window), OPEN (calls
rejected), HALF_OPEN (exactly ``half_open_calls`` probes pass; any failing probe
reopens at once; when all have reported successfully the breaker closes unless the
probes' slow-call rate reaches the threshold), DISABLED (always permits, records
nothing) and FORCED_OPEN (always rejects). Only :meth:`~CircuitBreaker.reset` and
the explicit ``transition_to_*`` methods leave DISABLED and FORCED_OPEN.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from enum import StrEnum

from meshkit.resilience.clock import SYSTEM_CLOCK, Clock
from meshkit.resilience.codes import DEFAULT_FAILURE_CODES
from meshkit.resilience.events import Event, EventEmitter


class BreakerState(StrEnum):
    """The states of a circuit breaker."""

    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"
    DISABLED = "DISABLED"
    FORCED_OPEN = "FORCED_OPEN"


class WindowType(StrEnum):
    """A sliding window over the last ``size`` calls or the last ``size`` seconds."""

    COUNT = "count"
    TIME = "time"


class BreakerScope(StrEnum):
    """Which calls share one breaker: per target, per target and service, per method."""

    TARGET = "target"
    SERVICE = "service"
    METHOD = "method"


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """A validated breaker configuration (see docs/policy.md for every key).

    Rates are fractions in ``(0, 1]``: the breaker opens when, over at least
    ``minimum_calls`` recorded calls, the failure rate or the slow-call rate is at or
    above its threshold. With a count window ``minimum_calls`` is capped at the
    window size. Codes outside ``failure_codes`` count as successes.
    """

    window_type: WindowType = WindowType.COUNT
    window_size: int = 10
    failure_rate_threshold: float = 0.5
    minimum_calls: int = 10
    slow_call_duration: float = 60.0
    slow_call_rate_threshold: float = 1.0
    open_duration: float = 30.0
    open_duration_multiplier: float = 1.0
    max_open_duration: float | None = None
    half_open_calls: int = 5
    failure_codes: frozenset[str] = DEFAULT_FAILURE_CODES
    scope: BreakerScope = BreakerScope.TARGET
    automatic_transition: bool = True

    @property
    def effective_minimum_calls(self) -> int:
        """``minimum_calls``, capped at the window size for count windows."""
        if self.window_type is WindowType.COUNT:
            return min(self.minimum_calls, self.window_size)
        return self.minimum_calls

    def open_duration_for(self, consecutive_opens: int) -> float:
        """How long the ``consecutive_opens``-th open in a row lasts (1 = the first)."""
        n = max(1, consecutive_opens) - 1
        try:
            d = self.open_duration * self.open_duration_multiplier**n
        except OverflowError:
            d = math.inf
        cap = self.max_open_duration if self.max_open_duration is not None else math.inf
        return min(d, cap)


@dataclass(frozen=True, slots=True)
class BreakerMetrics:
    """A snapshot of a breaker's window.

    Rates are ``None`` until ``minimum_calls`` calls are recorded (in HALF_OPEN the
    counts are the probes').
    """

    state: BreakerState
    calls: int
    failed_calls: int
    slow_calls: int
    failure_rate: float | None
    slow_call_rate: float | None
    not_permitted_calls: int
    consecutive_opens: int


_FAILED = 1
_SLOW = 2

# Module-level aliases: an enum attribute lookup costs more than the whole fast path.
_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN
_DISABLED = BreakerState.DISABLED


class _CountWindow:
    """A ring of the last ``size`` outcomes (-1: empty slot); totals kept aside."""

    __slots__ = ("_i", "_ring", "calls", "failed", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self._ring = [-1] * size
        self._i = 0
        self.calls = self.failed = self.slow = 0

    def record(self, now: float, outcome: int) -> None:
        ring = self._ring
        i = self._i
        old = ring[i]
        ring[i] = outcome
        i += 1
        self._i = 0 if i == self.size else i
        if old < 0:
            self.calls += 1
        elif old:
            self.failed -= old & _FAILED
            self.slow -= old >> 1
        if outcome:
            self.failed += outcome & _FAILED
            self.slow += outcome >> 1

    def roll(self, now: float) -> None:
        """Count windows do not age."""


class _TimeWindow:
    """``size`` one-second buckets; totals kept aside so reads are O(1)."""

    __slots__ = ("_calls", "_epoch", "_failed", "_slow", "calls", "failed", "size", "slow")

    def __init__(self, size: int, now: float) -> None:
        self.size = size
        self._calls = [0] * size
        self._failed = [0] * size
        self._slow = [0] * size
        self._epoch = math.floor(now)
        self.calls = self.failed = self.slow = 0

    def roll(self, now: float) -> None:
        epoch = math.floor(now)
        gap = epoch - self._epoch
        if gap <= 0:
            return
        for i in range(1, min(gap, self.size) + 1):
            slot = (self._epoch + i) % self.size
            self.calls -= self._calls[slot]
            self.failed -= self._failed[slot]
            self.slow -= self._slow[slot]
            self._calls[slot] = self._failed[slot] = self._slow[slot] = 0
        self._epoch = epoch

    def record(self, now: float, outcome: int) -> None:
        self.roll(now)
        slot = self._epoch % self.size
        failed = outcome & _FAILED
        slow = (outcome & _SLOW) >> 1
        self._calls[slot] += 1
        self._failed[slot] += failed
        self._slow[slot] += slow
        self.calls += 1
        self.failed += failed
        self.slow += slow


class CircuitBreaker(EventEmitter):
    """One circuit breaker. Thread-safe (one lock, short sections); never blocks.

    Safe to call from asyncio code: no method waits.
    """

    def __init__(
        self,
        config: CircuitBreakerConfig | None = None,
        *,
        name: str = "",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else CircuitBreakerConfig()
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._window: _CountWindow | _TimeWindow = self._new_window()
        self._open_until = 0.0
        self._consecutive_opens = 0
        self._not_permitted = 0
        self._probe_in_flight = 0
        self._probe_reported = 0
        self._probe_slow = 0
        cfg = self.config
        self._failure_codes = cfg.failure_codes
        self._slow_after = cfg.slow_call_duration
        self._min_calls = max(1, cfg.effective_minimum_calls)
        self._failure_threshold = cfg.failure_rate_threshold
        self._slow_threshold = cfg.slow_call_rate_threshold
        self._timed = cfg.window_type is WindowType.TIME

    # -- reading -----------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state (OPEN turns HALF_OPEN here when automatic_transition)."""
        events: list[Event] = []
        with self._lock:
            if (
                self._state is BreakerState.OPEN
                and self.config.automatic_transition
                and self._clock.now() >= self._open_until
            ):
                self._to(BreakerState.HALF_OPEN, events)
            state = self._state
        self._flush(events)
        return state

    @property
    def metrics(self) -> BreakerMetrics:
        """A consistent snapshot of the counts and rates."""
        with self._lock:
            now = self._clock.now()
            if self._state is BreakerState.HALF_OPEN:
                calls = self._probe_reported
                slow = self._probe_slow
                failed = 0
                enough = calls >= self.config.half_open_calls
            else:
                self._window.roll(now)
                calls, failed, slow = self._window.calls, self._window.failed, self._window.slow
                enough = calls >= self.config.effective_minimum_calls and calls > 0
            return BreakerMetrics(
                state=self._state,
                calls=calls,
                failed_calls=failed,
                slow_calls=slow,
                failure_rate=failed / calls if enough else None,
                slow_call_rate=slow / calls if enough else None,
                not_permitted_calls=self._not_permitted,
                consecutive_opens=self._consecutive_opens,
            )

    def remaining_open_time(self) -> float:
        """Seconds until an OPEN breaker lets probes through (0.0 in other states).

        Adapters send it as pushback (``grpc-retry-pushback-ms``, ``Retry-After``).
        """
        with self._lock:
            if self._state is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self._open_until - self._clock.now())

    # -- the call protocol ---------------------------------------------------------

    def try_acquire(self) -> bool:
        """Ask permission for one call. ``False``: reject it (fail fast or fall back)."""
        state = self._state
        if state is _CLOSED or state is _DISABLED:
            # An unlocked read: a call that races a transition to OPEN is one that
            # arrived a moment earlier, which the window tolerates by design.
            return True
        events: list[Event] = []
        with self._lock:
            state = self._state
            if state is _CLOSED or state is _DISABLED:
                return True
            permitted = False
            if state is _OPEN and self._clock.now() >= self._open_until:
                self._to(_HALF_OPEN, events)
                state = _HALF_OPEN
            if state is _HALF_OPEN:
                free = self.config.half_open_calls - self._probe_reported - self._probe_in_flight
                if free > 0:
                    self._probe_in_flight += 1
                    permitted = True
            if not permitted:
                self._not_permitted += 1
                events.append(
                    Event(
                        "not_permitted",
                        "circuit_breaker",
                        self.name,
                        self._clock.now(),
                        to_state=str(self._state),
                    )
                )
        self._flush(events)
        return permitted

    def on_result(self, duration: float, code: str) -> None:
        """Record the outcome of a permitted call: its duration (s) and status code name.

        ``code`` outside ``failure_codes`` (``"OK"``, caller errors) is a success;
        a call lasting ``slow_call_duration`` or longer is slow.
        """
        outcome = (_FAILED if code in self._failure_codes else 0) | (
            _SLOW if duration >= self._slow_after else 0
        )
        events: list[Event] | None = None
        with self._lock:
            state = self._state
            if state is _CLOSED:
                w = self._window
                w.record(self._clock.now() if self._timed else 0.0, outcome)
                calls = w.calls
                if calls >= self._min_calls and (
                    w.failed / calls >= self._failure_threshold
                    or w.slow / calls >= self._slow_threshold
                ):
                    events = []
                    self._to(_OPEN, events)
            elif state is _HALF_OPEN:
                events = []
                self._on_probe(outcome, events)
            # OPEN, FORCED_OPEN, DISABLED: a late outcome changes nothing.
        if events:
            self._flush(events)

    def _on_probe(self, outcome: int, events: list[Event]) -> None:
        if self._probe_in_flight > 0:
            self._probe_in_flight -= 1
        self._probe_reported += 1
        if outcome & _FAILED:
            self._to(_OPEN, events)
            return
        if outcome & _SLOW:
            self._probe_slow += 1
        if self._probe_reported >= self.config.half_open_calls:
            if self._probe_slow / self._probe_reported >= self._slow_threshold:
                self._to(_OPEN, events)
            else:
                self._to(_CLOSED, events)

    def release(self) -> None:
        """Give back a permit whose call ended without an outcome (e.g. cancelled).

        In HALF_OPEN the probe slot is freed for another call; otherwise a no-op.
        """
        with self._lock:
            if self._state is BreakerState.HALF_OPEN and self._probe_in_flight > 0:
                self._probe_in_flight -= 1

    # -- administration --------------------------------------------------------------

    def transition_to_forced_open(self) -> None:
        """Reject every call until :meth:`reset` or another explicit transition."""
        self._explicit(BreakerState.FORCED_OPEN)

    def disable(self) -> None:
        """Permit every call and record nothing until :meth:`reset`."""
        self._explicit(BreakerState.DISABLED)

    def transition_to_open(self) -> None:
        """Open now, as if the threshold had been crossed."""
        self._explicit(BreakerState.OPEN)

    def transition_to_half_open(self) -> None:
        """Start probing now."""
        self._explicit(BreakerState.HALF_OPEN)

    def transition_to_closed(self) -> None:
        """Close now with an empty window."""
        self._explicit(BreakerState.CLOSED)

    def reset(self) -> None:
        """Back to CLOSED with empty metrics and no open history."""
        events: list[Event] = []
        with self._lock:
            if self._state is not BreakerState.CLOSED:
                self._to(BreakerState.CLOSED, events)
            self._window = self._new_window()
            self._consecutive_opens = 0
            self._not_permitted = 0
        self._flush(events)

    # -- internals -------------------------------------------------------------------

    def _explicit(self, target: BreakerState) -> None:
        events: list[Event] = []
        with self._lock:
            if self._state is not target:
                self._to(target, events)
        self._flush(events)

    def _new_window(self) -> _CountWindow | _TimeWindow:
        if self.config.window_type is WindowType.COUNT:
            return _CountWindow(self.config.window_size)
        return _TimeWindow(self.config.window_size, self._clock.now())

    def _to(self, target: BreakerState, events: list[Event]) -> None:
        """Change state; the caller holds the lock and flushes ``events`` after."""
        now = self._clock.now()
        source = self._state
        self._state = target
        self._probe_in_flight = self._probe_reported = self._probe_slow = 0
        if target is BreakerState.OPEN:
            self._consecutive_opens = (
                self._consecutive_opens + 1 if source is BreakerState.HALF_OPEN else 1
            )
            self._open_until = now + self.config.open_duration_for(self._consecutive_opens)
        elif target is BreakerState.CLOSED:
            self._window = self._new_window()
            self._consecutive_opens = 0
        events.append(
            Event(
                "state_transition",
                "circuit_breaker",
                self.name,
                now,
                from_state=str(source),
                to_state=str(target),
            )
        )

    def _flush(self, events: list[Event]) -> None:
        for event in events:
            self._emit(event)

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self.name!r}, state={self._state.value})"
