"""What the event store raises: :class:`EventStoreError`, its
:class:`EventStoreUnavailable` (JetStream did not answer; retried through elections
first, by :func:`_riding`), and :class:`AggregateConflict` (another writer won).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from meshkit.errors import ConcurrencyError, MeshkitError
from meshkit.saga import cluster

T = TypeVar("T")


class EventStoreError(MeshkitError):
    """The event store could not read or write (the message says what and where)."""

    code = "INTERNAL"


class EventStoreUnavailable(EventStoreError):
    """JetStream did not answer (no responders, no answer in time, 503): a leader
    election, a restarting server, or no stream for the subjects. Appends and reads
    retry it within :func:`meshkit.saga.cluster.retry_window` before raising it."""

    code = "UNAVAILABLE"


_UNAVAILABLE: tuple[type[BaseException], ...] = (EventStoreUnavailable, *cluster.TRANSIENT)


async def _riding(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` retried through elections (:func:`meshkit.saga.cluster.retrying`);
    an :class:`EventStoreUnavailable` saying what failed and for how long after that."""
    try:
        return await cluster.retrying(what, call, transient=_UNAVAILABLE)
    except cluster.JetStreamUnavailable as exc:
        raise EventStoreUnavailable(str(exc)) from exc.__cause__


async def _riding_after(
    what: str, call: Callable[[], Awaitable[T]], start: float, first: BaseException
) -> T:
    """:func:`_riding` for a caller that made the first try itself, at loop time
    ``start``, and caught ``first`` (one of ``_UNAVAILABLE``): the tries after it."""
    try:
        return await cluster.retrying_after(what, call, start, first, transient=_UNAVAILABLE)
    except cluster.JetStreamUnavailable as exc:
        raise EventStoreUnavailable(str(exc)) from exc.__cause__


class AggregateConflict(ConcurrencyError):
    """Another writer appended to the aggregate first; reload and retry."""

    def __init__(self, aggregate: str, expected: int, actual: int) -> None:
        super().__init__(
            f"aggregate {aggregate}: expected version {expected}, found version {actual}"
        )
        self.aggregate = aggregate
        self.expected = expected
        self.actual = actual
