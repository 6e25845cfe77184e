"""gRPC status code names, without importing grpc.

Policies name codes as strings (the names of ``grpc.StatusCode`` members) so that
nothing under :mod:`meshkit.resilience` depends on a transport.
"""

from __future__ import annotations

#: The 17 gRPC status codes, indexed by their numeric value.
STATUS_CODES: tuple[str, ...] = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)

STATUS_CODE_SET: frozenset[str] = frozenset(STATUS_CODES)

#: Codes that must never be retried or hedged: the caller's or the business's
#: errors, which a second attempt cannot fix. ``ABORTED`` is here
#: because it reports a concurrency conflict: the fix is to re-read and retry at a
#: higher level, not to resend the same request. ``OK`` and ``CANCELLED`` are not
#: failures of the server at all.
NEVER_RETRYABLE: dict[str, str] = {
    "OK": "OK is a success",
    "CANCELLED": "the caller cancelled the call",
    "INVALID_ARGUMENT": "a caller error: the same request fails again",
    "NOT_FOUND": "a caller error: the same request fails again",
    "ALREADY_EXISTS": "a business error: the same request fails again",
    "PERMISSION_DENIED": "a caller error: the same request fails again",
    "UNAUTHENTICATED": "a caller error: the same request fails again",
    "FAILED_PRECONDITION": "a business error: the system is not in a state to accept it",
    "ABORTED": "a concurrency conflict: retry at a higher level (re-read, then write)",
    "OUT_OF_RANGE": "a caller error: the same request fails again",
    "UNIMPLEMENTED": "the method does not exist on the server",
    "DATA_LOSS": "unrecoverable data loss: resending does not repair it",
}

#: Codes a retry policy may list: transient failures of the server or the network.
RETRYABLE_ALLOWED: frozenset[str] = STATUS_CODE_SET - frozenset(NEVER_RETRYABLE)

#: The default codes a circuit breaker counts as failures.
DEFAULT_FAILURE_CODES: frozenset[str] = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"}
)


def code_from_number(number: int) -> str:
    """Map a numeric gRPC status to its name; unknown numbers become ``UNKNOWN``."""
    if 0 <= number < len(STATUS_CODES):
        return STATUS_CODES[number]
    return "UNKNOWN"


def code_from_http_status(status: int) -> str:
    """Map an HTTP status to a gRPC code as gRPC's HTTP-to-gRPC mapping does."""
    return {
        400: "INTERNAL",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "UNIMPLEMENTED",
        429: "UNAVAILABLE",
        502: "UNAVAILABLE",
        503: "UNAVAILABLE",
        504: "UNAVAILABLE",
    }.get(status, "UNKNOWN")
