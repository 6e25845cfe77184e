"""Deadline propagation: the deadline of the call being served, for the calls it makes.

grpcio does not carry a server handler's deadline into the client calls the
handler makes (Go's and Java's contexts do). meshkit's server interceptors record
the incoming deadline here, in a :class:`contextvars.ContextVar`, for the whole
run of the handler (thread-pool and asyncio servers alike); meshkit's client
interceptors read it and shrink each outgoing call's timeout to what is left.

The deadline is stored as an absolute time on the monotonic clock, so it keeps
shrinking while the handler works::

    import meshkit.deadline
    left = meshkit.deadline.remaining()   # seconds, or None outside a deadline
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

from meshkit.errors import DeadlineExceededError

__all__ = [
    "DeadlineExceededError",
    "absolute",
    "clear",
    "compute_timeout",
    "remaining",
    "reset",
    "scope",
    "set_absolute",
    "set_remaining",
]

# A deadline further away than this is "no deadline": grpcio reports an infinite
# deadline as a huge number of seconds rather than None.
_INFINITE = 10.0 * 365 * 24 * 3600

_monotonic = time.monotonic

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "meshkit_deadline", default=None
)


def absolute() -> float | None:
    """The propagated deadline as a ``time.monotonic()`` instant, or None."""
    return _DEADLINE.get()


def remaining() -> float | None:
    """Seconds left of the propagated deadline (never negative), or None when there is none."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return None
    left = deadline - _monotonic()
    return left if left > 0.0 else 0.0


def set_remaining(seconds: float | None) -> contextvars.Token[float | None]:
    """Record a deadline ``seconds`` from now (None: no deadline); returns a token for :func:`reset`.

    A deadline further away than ten years counts as none (grpcio's "infinite").
    """
    if seconds is None or seconds > _INFINITE:
        return _DEADLINE.set(None)
    return _DEADLINE.set(_monotonic() + seconds)


def set_absolute(deadline: float | None) -> contextvars.Token[float | None]:
    """Record an absolute monotonic deadline; returns a token for :func:`reset`."""
    return _DEADLINE.set(deadline)


def reset(token: contextvars.Token[float | None]) -> None:
    """Undo a :func:`set_remaining` / :func:`set_absolute`."""
    _DEADLINE.reset(token)


def clear() -> contextvars.Token[float | None]:
    """Forget the deadline in this context (e.g. for work that must outlive the call)."""
    return _DEADLINE.set(None)


@contextmanager
def scope(seconds: float | None) -> Iterator[None]:
    """Run a block under a deadline ``seconds`` from now, never later than the current one.

    Useful in tests, scripts and background jobs that start a chain of calls::

        with meshkit.deadline.scope(2.0):
            stub.Charge(request)   # timeout <= 2s, minus the policy's margin
    """
    current = _DEADLINE.get()
    if seconds is None:
        token = _DEADLINE.set(current)
    else:
        proposed = _monotonic() + seconds
        token = _DEADLINE.set(proposed if current is None or proposed < current else current)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def compute_timeout(
    explicit: float | None,
    configured: float | None,
    margin: float = 0.0,
    *,
    now: float | None = None,
) -> float | None:
    """The timeout for an outgoing call: ``min(explicit, remaining - margin, configured)``.

    Any of the three may be absent (None). Raises :class:`DeadlineExceededError` when the
    propagated deadline leaves nothing (after the margin), so the call is never sent.
    """
    timeout = explicit
    if configured is not None and (timeout is None or configured < timeout):
        timeout = configured
    deadline = _DEADLINE.get()
    if deadline is not None:
        left = deadline - (_monotonic() if now is None else now) - margin
        if left <= 0.0:
            raise DeadlineExceededError(
                f"the propagated deadline is spent ({left + margin:.3f}s left, "
                f"margin {margin:.3f}s); the call was not sent"
            )
        if timeout is None or left < timeout:
            timeout = left
    if timeout is not None and timeout <= 0.0:
        raise DeadlineExceededError("the call's timeout is not positive; the call was not sent")
    return timeout
