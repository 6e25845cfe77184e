"""Status and metadata helpers shared by the sync and asyncio adapters.

Policies name status codes as strings (``"UNAVAILABLE"``); these helpers turn them
into ``grpc.StatusCode`` values, read and write the retry metadata of gRFC A6
(``grpc-retry-pushback-ms``, ``grpc-previous-rpc-attempts``), translate
:mod:`meshkit.errors` exceptions into statuses, and build ``google.rpc.Status``-rich
errors (``grpc-status-details-bin`` with a ``google.rpc.RetryInfo``) so clients in
any language can read the pushback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from meshkit.errors import CallRejectedError, MeshkitError

__all__ = [
    "CODES",
    "DETAILS_KEY",
    "MESHKIT_ATTEMPTS_KEY",
    "PREVIOUS_ATTEMPTS_KEY",
    "PUSHBACK_KEY",
    "STOP",
    "LocalRpcError",
    "code_of",
    "error_status",
    "metadata_value",
    "parse_pushback",
    "pushback_metadata",
    "rich_trailers",
]

PUSHBACK_KEY = "grpc-retry-pushback-ms"
PREVIOUS_ATTEMPTS_KEY = "grpc-previous-rpc-attempts"
#: The same count under a name grpcio servers can read (the C core eats the reserved one).
MESHKIT_ATTEMPTS_KEY = "x-meshkit-previous-attempts"
DETAILS_KEY = "grpc-status-details-bin"

#: ``grpc.StatusCode`` by name: ``CODES["UNAVAILABLE"]``.
CODES: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}

#: :func:`parse_pushback`'s answer when the server says "do not retry".
STOP = -1.0

Metadata = Sequence[tuple[str, str | bytes]]


def code_of(name: str) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` named ``name`` (UNKNOWN for a name grpc does not know)."""
    return CODES.get(name, grpc.StatusCode.UNKNOWN)


def metadata_value(metadata: Iterable[Any] | None, key: str) -> str | bytes | None:
    """The first value of ``key`` in a metadata sequence (tuples or grpc ``_Metadatum``)."""
    if not metadata:
        return None
    for item in metadata:
        if item[0] == key:
            value: str | bytes = item[1]
            return value
    return None


def parse_pushback(metadata: Iterable[Any] | None) -> float | None:
    """Read ``grpc-retry-pushback-ms`` from trailing metadata.

    Returns seconds to wait, None when absent, or :data:`STOP` when the value is
    negative or not an integer: gRFC A6 says such a pushback means "do not retry".
    """
    raw = metadata_value(metadata, PUSHBACK_KEY)
    if raw is None:
        return None
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        millis = int(text.strip())
    except (ValueError, UnicodeDecodeError):
        return STOP
    if millis < 0:
        return STOP
    return millis / 1000.0


def pushback_metadata(seconds: float | None) -> tuple[tuple[str, str], ...]:
    """Trailing metadata carrying a pushback of ``seconds`` (rounded up to whole ms)."""
    if seconds is None:
        return ()
    return ((PUSHBACK_KEY, str(max(0, math.ceil(seconds * 1000.0)))),)


def rich_trailers(
    code: grpc.StatusCode, message: str, *, pushback: float | None = None
) -> tuple[tuple[str, str | bytes], ...]:
    """Trailers for an error: pushback metadata and a ``google.rpc.Status`` with ``RetryInfo``."""
    trailers: list[tuple[str, str | bytes]] = list(pushback_metadata(pushback))
    if pushback is not None:
        try:
            from google.rpc import error_details_pb2, status_pb2
        except ImportError:  # pragma: no cover - googleapis-common-protos is a dependency
            return tuple(trailers)
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(max(0, int(pushback * 1e9)))
        status = status_pb2.Status(code=code.value[0], message=message)
        status.details.add().Pack(info)
        trailers.append((DETAILS_KEY, status.SerializeToString()))
    return tuple(trailers)


def error_status(exc: BaseException) -> tuple[grpc.StatusCode, str, float | None]:
    """The status code, message and pushback (seconds or None) for an exception.

    :class:`meshkit.errors.MeshkitError` carries its code name; anything else is
    INTERNAL with a generic message, so stack traces never reach clients.
    """
    if isinstance(exc, MeshkitError):
        pushback = exc.pushback if isinstance(exc, CallRejectedError) else None
        return code_of(exc.code), exc.message, pushback
    return grpc.StatusCode.INTERNAL, "internal error", None


class LocalRpcError(grpc.RpcError, grpc.Call, grpc.Future):  # type: ignore[misc,type-arg]
    """An RPC error made on the client without a network exchange (a rejected or expired call).

    It is both a ``grpc.Call`` and a ``grpc.Future`` so the sync interceptor can return
    it where grpcio expects the outcome of a call; ``result()`` raises it.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: Metadata = (),
    ) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self._trailing = tuple(trailing_metadata)

    @classmethod
    def from_exception(cls, exc: BaseException) -> LocalRpcError:
        """An error carrying ``exc``'s status (see :func:`error_status`)."""
        code, message, pushback = error_status(exc)
        return cls(code, message, pushback_metadata(pushback))

    def __str__(self) -> str:
        return f"<LocalRpcError {self._code.name}: {self._details}>"

    def initial_metadata(self) -> Metadata:  # type: ignore[override]
        return ()

    def trailing_metadata(self) -> Metadata:  # type: ignore[override]
        return self._trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def debug_error_string(self) -> str:
        return self._details

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False

    def cancelled(self) -> bool:
        return self._code is grpc.StatusCode.CANCELLED

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> BaseException:  # type: ignore[override]
        return self

    def traceback(self, timeout: float | None = None) -> Any:
        return None

    def add_done_callback(self, fn: Any) -> None:
        fn(self)

    # Streaming responses: iterating a failed stream raises at once.
    def __iter__(self) -> LocalRpcError:
        return self

    def __next__(self) -> Any:
        raise self
