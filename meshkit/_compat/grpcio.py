"""grpcio's private internals, used only on the grpcio series they were tested with.

Two fast paths, each with a public fallback giving the same results:

``aio_unary`` (the gateway's unary calls)
    On a grpc.aio channel without interceptors, a unary call goes straight to
    grpc.aio's Cython call object (``cygrpc.AioChannel.call``, positional arguments,
    the multicallable's ``_channel``/``_method``/serializers/registered-call handle).
    The public ``UnaryUnaryMultiCallable`` path builds a ``Metadata`` object, a
    ``UnaryUnaryCall`` and an ``asyncio.Task`` per call, and two more coroutines to
    read the metadata afterwards; measured against the gateway benchmark's backend,
    skipping them saves about 15-20 us of CPU per call, roughly a tenth of a proxied
    request. Status, metadata, deadlines and cancellation behave as on the public
    path (an ``AioRpcError`` for a non-OK status, local cancellation cancels the RPC).
    Off: :func:`aio_unary_invoker` returns None and the caller uses the public call.

``sync_future`` (hedging on the sync client)
    grpcio's sync interceptor continuation blocks until the call ends when the
    application called the stub directly, so attempts cannot be raced or cancelled.
    The multicallable behind it (the intercepted multicallable's ``_thunk(method)``,
    found in the continuation's ``__closure__``) has ``future()``. grpcio's public
    interceptor API offers no way to reach it. Off: :func:`sync_future_invoker`
    returns None and hedges run on threads through the public continuation; the
    winner, the codes and the retries are the same, but a losing attempt is not
    cancelled (it runs to its own timeout, holding a thread).

``future_call`` (the sync client's hedged ``.future()``)
    Whether grpcio's sync continuation comes from ``.future()`` (the caller will not
    wait) rather than from a direct call: the closure's ``__qualname__`` says which
    method of grpcio's intercepted multicallable made it. Off: False, and a hedged
    ``.future()`` races its hedges before returning, as a direct call does.

``AioHalfClose`` (not a fast path: a shape grpc.aio requires)
    grpc.aio's ``write()`` on an intercepted request stream reads the private
    ``_done_writing_flag`` of the call object the interceptor returned
    (``grpc/aio/_interceptor.py``), so every call object meshkit returns for a request
    stream serves it, from what meshkit knows (the request stream has ended). Not gated:
    serving the attribute is harmless on any grpcio, and without it ``write()`` fails.

``TESTED`` names the series; another grpcio version, or ``MESHKIT_COMPAT=off``,
turns both off. Re-test before widening it: tests/unit/test_compat.py fails when the
locked grpcio is outside the gate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc.aio import AioRpcError, Metadata

from meshkit._compat import describe as _describe
from meshkit._compat import gate_open, installed_version, log, log_once

__all__ = [
    "FAST_PATHS",
    "INSTALLED",
    "TESTED",
    "TESTED_GRPCIO",
    "AioHalfClose",
    "MetadataPairs",
    "UnaryInvoker",
    "UnaryResult",
    "active",
    "aio_unary_invoker",
    "describe",
    "future_call",
    "sync_future_invoker",
]

MetadataPairs = Sequence[tuple[str, str | bytes]]
UnaryResult = tuple[Any, Any, Any]
UnaryInvoker = Callable[[Any, MetadataPairs, float | None], Awaitable[UnaryResult]]

#: The grpcio series the private paths below were checked against (version prefixes).
TESTED: tuple[str, ...] = ("1.85.",)
TESTED_GRPCIO = TESTED
#: The installed grpcio.
INSTALLED: str = installed_version("grpcio", grpc.__version__)
_GATE = gate_open(INSTALLED, TESTED)

_CANCELLED = "Locally cancelled by application!"  # grpc.aio's own cancellation details

_AioChannel: Any = None
_census: Callable[[], Any] | None = None
_CODES: dict[Any, grpc.StatusCode] = {}
_interceptor_shape = False
if _GATE:  # imported only inside the gate: another grpcio may lack these modules
    try:
        from grpc import _common
        from grpc._cython import cygrpc  # type: ignore[attr-defined]

        _AioChannel = cygrpc.AioChannel
        _census = cygrpc.build_census_context
        _CODES = dict(_common.CYGRPC_STATUS_CODE_TO_STATUS_CODE)
    except (ImportError, AttributeError):  # pragma: no cover - a layout the gate missed
        _AioChannel = None
    try:
        from grpc import _interceptor

        _interceptor_shape = callable(
            getattr(getattr(_interceptor, "_UnaryUnaryMultiCallable", None), "future", None)
        )
    except ImportError:  # pragma: no cover - a layout the gate missed
        _interceptor_shape = False

#: Each fast path and whether it is on (tests and the first-use log line read it).
FAST_PATHS: dict[str, bool] = {
    "aio_unary": _AioChannel is not None,
    "sync_future": _GATE and _interceptor_shape,
}


def active() -> dict[str, bool]:
    """A copy of :data:`FAST_PATHS`."""
    return dict(FAST_PATHS)


def describe() -> str:
    """One line: which fast paths are on, the installed grpcio and the tested series."""
    return _describe("grpcio", "grpcio", INSTALLED, TESTED, FAST_PATHS)


def aio_unary_invoker(mc: Any, public: UnaryInvoker) -> UnaryInvoker | None:
    """The direct unary invoker for the grpc.aio multicallable ``mc``, or None (fast
    path off, interceptors on the channel, or an unexpected object). ``public`` is
    the caller's public-API invoker: the direct one switches to it for good if
    grpc's call object refuses the call before anything was sent."""
    log_once("grpcio", describe())
    if not FAST_PATHS["aio_unary"] or _census is None:
        return None
    census = _census
    # A channel with interceptors must go through them (the direct call skips them).
    if getattr(mc, "_interceptors", True):
        return None
    try:
        channel = mc._channel
        method: bytes = mc._method
        serialize: Callable[[Any], bytes] = mc._request_serializer
        deserialize: Callable[[bytes], Any] = mc._response_deserializer
        handle: int = mc._registered_call_handle
    except AttributeError:  # pragma: no cover - a layout the gate missed
        return None
    if not isinstance(channel, _AioChannel) or serialize is None or deserialize is None:
        return None

    broken = False

    async def invoke(request: Any, metadata: MetadataPairs, seconds: float | None) -> UnaryResult:
        nonlocal broken
        if broken:
            return await public(request, metadata, seconds)
        deadline = None if seconds is None else time.time() + seconds
        payload = serialize(request)  # a request that does not serialize raises here
        try:
            call = channel.call(method, deadline, None, None, handle)
            sending = call.unary_unary(payload, tuple(metadata), census())
        except (TypeError, AttributeError):
            # Nothing was sent: grpc's internals are not what this module knows (a
            # grpcio the gate let through). The public API serves from now on.
            log.warning("grpc.aio internals differ: unary calls use the public API", exc_info=True)
            broken = True
            return await public(request, metadata, seconds)
        try:
            raw = await sending
        except asyncio.CancelledError:
            if not call.cancelled():
                call.cancel(_CANCELLED)
            raise
        initial = await call.initial_metadata()
        status = await call.status()
        if not call.is_ok():
            if call.is_locally_cancelled():
                raise asyncio.CancelledError()
            raise AioRpcError(
                _CODES.get(status.code(), grpc.StatusCode.UNKNOWN),
                Metadata.from_tuple(initial),
                Metadata.from_tuple(status.trailing_metadata()),
                details=status.details(),
                debug_error_string=status.debug_error_string(),
            )
        return deserialize(raw), initial, status.trailing_metadata()

    return invoke


def sync_future_invoker(continuation: Any) -> Callable[[Any, Any], Any] | None:
    """A function sending one attempt as a cancellable ``grpc.Future`` through the
    multicallable behind grpcio's sync ``continuation``, or None (fast path off, or
    the continuation is not grpcio's own: another interceptor's, say)."""
    log_once("grpcio", describe())
    if not FAST_PATHS["sync_future"]:
        return None
    code = getattr(continuation, "__code__", None)
    cells = getattr(continuation, "__closure__", None)
    if code is None or not cells:
        return None
    owner = None
    for name, cell in zip(code.co_freevars, cells, strict=False):
        if name == "self":
            owner = cell.cell_contents
    thunk = getattr(owner, "_thunk", None)
    if thunk is None:
        return None

    def invoke(d: Any, request: Any) -> Any:
        return thunk(d.method).future(
            request,
            timeout=d.timeout,
            metadata=d.metadata,
            credentials=d.credentials,
            wait_for_ready=d.wait_for_ready,
            compression=d.compression,
        )

    return invoke


def future_call(continuation: Any) -> bool:
    """Whether the sync ``continuation`` was made by grpcio's ``.future()`` (see the
    module docstring); False when the fast path is off or the shape is unknown."""
    if not FAST_PATHS["sync_future"]:
        return False
    name = getattr(continuation, "__qualname__", "")
    return isinstance(name, str) and name.endswith(".future.<locals>.continuation")


class AioHalfClose:
    """Serves grpc.aio's ``_done_writing_flag`` on a call object of ours (see the module
    docstring): True once :meth:`half_closed` says the request stream has ended."""

    __slots__ = ()

    def half_closed(self) -> bool:
        """Whether the caller's request stream has ended (``done_writing()`` or its end)."""
        raise NotImplementedError(f"{type(self).__name__} must say when its requests end")

    @property
    def _done_writing_flag(self) -> bool:
        return self.half_closed()
