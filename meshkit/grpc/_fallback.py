"""Fallback responses for the client adapters.

The client interceptor never sees the method's serializers (generated stubs hand
them to the channel, not to interceptors), so the response type of a method comes
from the default protobuf descriptor pool, where every imported ``_pb2`` module
registers its services: ``/shop.v1.PaymentService/Charge`` -> the ``Charge`` method's
output descriptor -> a message class. The ``default`` kind parses the policy's
proto3 JSON into it; ``cached`` restores the last good response's bytes into it (or
into the type seen on the last success).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from meshkit.errors import MeshkitError
from meshkit.resilience.fallback import FallbackKind, FallbackPolicy, LastGoodCache

__all__ = ["FallbackSupport", "method_types", "serialize_request"]

_log = logging.getLogger("meshkit.grpc")


def method_types(method: str) -> tuple[type[Message], type[Message]] | None:
    """The (request, response) message classes of ``/pkg.Svc/M`` from the default pool."""
    service, _, name = method.lstrip("/").partition("/")
    try:
        desc = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        return None
    return (
        message_factory.GetMessageClass(desc.input_type),
        message_factory.GetMessageClass(desc.output_type),
    )


def serialize_request(request: Any) -> bytes | None:
    """A request's bytes for the last-good cache key (None: not cacheable)."""
    if isinstance(request, Message):
        return request.SerializeToString(deterministic=True)
    if isinstance(request, bytes):
        return request
    return None


class FallbackError(MeshkitError):
    """The ``error`` fallback kind: a clear status chosen by the policy."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FallbackSupport:
    """Per-interceptor fallback state: the last-good cache and learned response types."""

    def __init__(self, cache: LastGoodCache | None = None) -> None:
        self.cache = cache if cache is not None else LastGoodCache()
        self._types: dict[str, type[Message]] = {}
        self._lock = threading.Lock()

    def remember(self, method: str, request: Any, response: Any) -> None:
        """Store a good response for the ``cached`` kind."""
        if not isinstance(response, Message):
            return
        key = serialize_request(request)
        if key is None:
            return
        if method not in self._types:
            with self._lock:
                self._types[method] = type(response)
        self.cache.put(method, key, response.SerializeToString())

    def response_type(self, method: str) -> type[Message] | None:
        known = self._types.get(method)
        if known is not None:
            return known
        types = method_types(method)
        return types[1] if types is not None else None

    def local_value(self, fb: FallbackPolicy, method: str, request: Any) -> tuple[bool, Any]:
        """A response for ``default``/``cached``/``error`` kinds: ``(True, value)``.

        ``(False, None)`` when the fallback cannot answer (no cached entry, unknown
        type); an ``error`` kind raises :class:`FallbackError`.
        """
        kind = fb.kind
        if kind is FallbackKind.ERROR:
            raise FallbackError(fb.code, fb.message)
        if kind is FallbackKind.DEFAULT:
            cls = self.response_type(method)
            if cls is None:
                _log.warning(
                    "fallback for %s: the response type is not in the descriptor pool "
                    "(import the method's _pb2 module)",
                    method,
                )
                return False, None
            msg = cls()
            json_format.ParseDict(fb.value or {}, msg, ignore_unknown_fields=False)
            return True, msg
        if kind is FallbackKind.CACHED:
            key = serialize_request(request)
            cls = self.response_type(method)
            if key is None or cls is None:
                return False, None
            raw = self.cache.get(method, key, fb.cache_ttl)
            if raw is None:
                return False, None
            return True, cls.FromString(raw)
        return False, None
