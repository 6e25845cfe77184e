"""Fallbacks: what to answer when a policy refuses or gives up.

:class:`FallbackPolicy` is a value; the adapter builds the response. The
:class:`LastGoodCache` keeps serialized responses of successful calls so that the
``cached`` kind can answer with the last good one for the same method and request.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from meshkit.resilience.clock import SYSTEM_CLOCK, Clock


class FallbackTrigger(StrEnum):
    """The failures that may trigger a fallback."""

    CIRCUIT_OPEN = "circuit_open"
    BULKHEAD_FULL = "bulkhead_full"
    RATE_LIMITED = "rate_limited"
    RETRIES_EXHAUSTED = "retries_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class FallbackKind(StrEnum):
    """How to answer instead: a fixed message, the last good response, another
    target, or a clear error."""

    DEFAULT = "default"
    CACHED = "cached"
    ALTERNATE = "alternate"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    """A validated fallback.

    ``on``: the triggers. ``kind``: see :class:`FallbackKind`. ``value_json``: the
    response message in proto3 JSON (``kind: default``; ``"{}"`` is the empty
    message), kept as canonical text so the policy stays immutable; :attr:`value`
    parses it. ``target``: the alternate address (``kind: alternate``). ``code`` and
    ``message``: the status to answer with (``kind: error``). ``cache_ttl``: the
    oldest cached response ``kind: cached`` may serve (``None``: any age). When the
    cache has nothing, ``kind: cached`` fails with the original error.
    """

    on: frozenset[FallbackTrigger] = frozenset(
        {
            FallbackTrigger.CIRCUIT_OPEN,
            FallbackTrigger.BULKHEAD_FULL,
            FallbackTrigger.RETRIES_EXHAUSTED,
        }
    )
    kind: FallbackKind = FallbackKind.DEFAULT
    value_json: str | None = "{}"
    target: str | None = None
    code: str = "UNAVAILABLE"
    message: str = "service temporarily unavailable"
    cache_ttl: float | None = None

    @property
    def value(self) -> dict[str, Any] | None:
        """A fresh dict of the default response (``None`` for other kinds)."""
        if self.value_json is None:
            return None
        parsed: dict[str, Any] = json.loads(self.value_json)
        return parsed

    def handles(self, trigger: str) -> bool:
        """Whether ``trigger`` (a :class:`FallbackTrigger` value) runs this fallback."""
        return trigger in self.on


class LastGoodCache:
    """Serialized last good responses per (method, request bytes). Thread-safe, bounded.

    Bounded by ``max_entries`` and ``max_bytes`` (least recently used evicted first).
    Requests are keyed by a BLAKE2b digest, so large requests cost little memory.
    """

    def __init__(
        self,
        *,
        max_entries: int = 1000,
        max_bytes: int = 16 << 20,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[str, bytes], tuple[float, bytes]] = (
            collections.OrderedDict()
        )
        self._bytes = 0

    @staticmethod
    def _key(method: str, request: bytes) -> tuple[str, bytes]:
        return method, hashlib.blake2b(request, digest_size=16).digest()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Bytes of responses held."""
        return self._bytes

    def put(self, method: str, request: bytes, response: bytes) -> None:
        """Remember ``response`` as the last good answer to ``request``."""
        if len(response) > self.max_bytes:
            return
        key = self._key(method, request)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1])
            self._entries[key] = (self._clock.now(), response)
            self._bytes += len(response)
            while self._entries and (
                len(self._entries) > self.max_entries or self._bytes > self.max_bytes
            ):
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= len(dropped)

    def get(self, method: str, request: bytes, max_age: float | None = None) -> bytes | None:
        """The last good response to ``request``, if any and no older than ``max_age``."""
        key = self._key(method, request)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            stored, response = entry
            if max_age is not None and self._clock.now() - stored > max_age:
                return None
            self._entries.move_to_end(key)
            return response

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
