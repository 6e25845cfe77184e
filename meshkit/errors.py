"""meshkit's exception hierarchy.

Every exception carries the name of the gRPC status code it maps to, so the
adapters (gRPC interceptors, the gateway, saga consumers) translate it the same
way everywhere. Policies stay transport-free: they name codes as strings such
as ``"UNAVAILABLE"``, the names of ``grpc.StatusCode`` members.
"""

from __future__ import annotations


class MeshkitError(Exception):
    """Base of every error meshkit raises on purpose."""

    code: str = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(MeshkitError, ValueError):
    """A configuration document is invalid.

    ``path`` is the key path (``rules[0].retry.max_attempts``); the message
    names the bad value and what was expected.
    """

    code = "FAILED_PRECONDITION"

    def __init__(self, path: str, message: str, *, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {message}" if path else f"{where}{message}")
        self.path = path
        self.source = source
        #: The message without the source and path prefixes: what to say again when
        #: re-raising the error under another path or source.
        self.reason = message


class CallRejectedError(MeshkitError):
    """A policy refused a call before it was sent. ``pushback`` is a hint in seconds."""

    code = "UNAVAILABLE"

    def __init__(self, message: str, *, pushback: float | None = None) -> None:
        super().__init__(message)
        self.pushback = pushback


class CircuitOpenError(CallRejectedError):
    """The circuit breaker guarding the call is open."""

    code = "UNAVAILABLE"


class BulkheadFullError(CallRejectedError):
    """No concurrency permit was free within the bulkhead's wait."""

    code = "RESOURCE_EXHAUSTED"


class RateLimitedError(CallRejectedError):
    """The caller is over its rate limit."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(MeshkitError):
    """The propagated deadline was spent before the call could be sent."""

    code = "DEADLINE_EXCEEDED"


class ConcurrencyError(MeshkitError):
    """An optimistic-concurrency check failed (an aggregate or saga changed underneath)."""

    code = "ABORTED"
