"""A response cache for GET routes: TTL per route, LRU bounded by bytes, ETags.

* Key: path, query string, the route's chosen request headers, and the caller's
  identity when authentication ran (one user's cached answer is never another's).
  A request with credentials the gateway did not verify (``Authorization``, or
  ``Grpc-Metadata-Authorization``) is never served from or stored in the cache.
* Only complete 2xx responses are stored; streaming responses are never cached.
* A client ``Cache-Control: no-cache`` (or ``no-store``) skips the lookup and
  refreshes the entry; ``If-None-Match`` matching the entry's ``ETag`` gets 304.
* :meth:`ResponseCache.clear` drops everything; the edge calls it on reload.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from meshkit._sections import get_duration, get_str_list, section
from meshkit.gateway._asgi import (
    PRINCIPAL_KEY,
    ASGIApp,
    Receive,
    Scope,
    Send,
    header,
    is_streaming_type,
    notes,
)
from meshkit.gateway.edge._responses import BufferedResponse
from meshkit.resilience.clock import SYSTEM_CLOCK, Clock

_HOP = {
    b"content-length",
    b"connection",
    b"transfer-encoding",
    b"date",
    b"x-request-id",
    b"grpc-metadata-x-request-id",
}


@dataclass(frozen=True, slots=True)
class CacheRule:
    """A route's caching: ``ttl`` seconds, keyed also by ``vary`` request headers."""

    ttl: float
    vary: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, raw: object, path: str) -> CacheRule:
        """From ``{ttl: 30s, vary: [accept-language]}``."""
        m = section(raw, path, ("ttl", "vary"))
        return cls(
            ttl=get_duration(m, "ttl", path),
            vary=tuple(h.lower() for h in get_str_list(m, "vary", path)),
        )


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A stored response."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    etag: bytes
    expires: float
    stored: float

    @property
    def size(self) -> int:
        """Bytes counted against the cache's bound."""
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 64


class ResponseCache:
    """An LRU of responses bounded by total bytes. Thread-safe."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self._items: collections.OrderedDict[bytes, CachedResponse] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def size_bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> CachedResponse | None:
        """The live entry for ``key`` (expired entries are dropped)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item.expires <= self.clock.now():
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return item

    def put(self, key: bytes, item: CachedResponse) -> None:
        """Store ``item``, evicting least recently used entries past ``max_bytes``."""
        if item.size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key] = item
            self._bytes += item.size
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._items))
                self._drop(oldest)

    def _drop(self, key: bytes) -> None:
        item = self._items.pop(key)
        self._bytes -= item.size

    def clear(self) -> None:
        """Forget everything (config reload)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0


def make_etag(body: bytes) -> bytes:
    """A strong ETag from the body's SHA-256."""
    return b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'


def _etag_matches(if_none_match: bytes | None, etag: bytes) -> bool:
    if not if_none_match:
        return False
    for tag in if_none_match.split(b","):
        tag = tag.strip()
        if tag == b"*" or tag == etag or tag.removeprefix(b"W/") == etag:
            return True
    return False


class CacheMiddleware:
    """ASGI middleware caching GET responses of one route per :class:`CacheRule`."""

    def __init__(
        self,
        app: ASGIApp,
        rule: CacheRule,
        cache: ResponseCache,
        *,
        name: str = "",
        on_result: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.app = app
        self.rule = rule
        self.cache = cache
        self.name = name
        self.on_result = on_result
        self._vary = tuple(h.encode() for h in rule.vary)
        self._name = name.encode()

    def key(self, scope: Scope) -> bytes:
        """The cache key for a request."""
        parts = [
            self._name,
            scope.get("raw_path") or scope["path"].encode(),
            scope.get("query_string", b""),
        ]
        for h in self._vary:
            parts.append(header(scope, h) or b"")
        p = scope.get(PRINCIPAL_KEY)
        if p is not None:
            parts.append(f"{p.kind}:{p.subject}".encode())
        return b"\x00".join(parts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        if scope.get(PRINCIPAL_KEY) is None and (
            header(scope, b"authorization") is not None
            or header(scope, b"grpc-metadata-authorization") is not None
        ):
            # Credentials the gateway did not verify reach the upstream, whose answer may be
            # that caller's own: a shared cache must not store it (RFC 9111 section 3.5).
            notes(scope)["cache"] = "bypass"
            await self.app(scope, receive, send)
            return
        key = self.key(scope)
        cc = (header(scope, b"cache-control") or b"").lower()
        bypass = (
            b"no-cache" in cc
            or b"no-store" in cc
            or (header(scope, b"pragma") or b"") == b"no-cache"
        )
        inm = header(scope, b"if-none-match")
        if not bypass:
            item = self.cache.get(key)
            if item is not None:
                self.cache.hits += 1
                notes(scope)["cache"] = "hit"
                if self.on_result:
                    self.on_result(self.name, True)
                await self._answer(send, item, inm, b"HIT")
                return
        self.cache.misses += 1
        notes(scope)["cache"] = "bypass" if bypass else "miss"
        if self.on_result:
            self.on_result(self.name, False)
        buf = BufferedResponse(stream_to=send)  # streams pass through, never cached
        await self.app(scope, receive, buf)
        if not buf.started or buf.passed:
            return
        ctype = buf.header(b"content-type")
        if is_streaming_type(ctype) or not buf.complete or not 200 <= buf.status < 300:
            await buf.replay(send)
            return
        body = buf.body
        now = self.cache.clock.now()
        headers = tuple(
            (k, v) for k, v in buf.headers if k.lower() not in _HOP and k.lower() != b"etag"
        )
        item = CachedResponse(buf.status, headers, body, make_etag(body), now + self.rule.ttl, now)
        if b"no-store" not in cc:
            self.cache.put(key, item)
        extra = [(k, v) for k, v in buf.headers if k.lower() in (b"x-request-id",)]
        await self._answer(send, item, inm, b"MISS", extra)

    async def _answer(
        self,
        send: Send,
        item: CachedResponse,
        inm: bytes | None,
        state: bytes,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        age = max(0, int(self.cache.clock.now() - item.stored))
        common = [
            (b"etag", item.etag),
            (b"x-cache", state),
            (b"age", str(age).encode()),
            (b"cache-control", f"max-age={int(self.rule.ttl)}".encode()),
            *(extra or []),
        ]
        if _etag_matches(inm, item.etag):
            await send({"type": "http.response.start", "status": 304, "headers": common})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [*item.headers, *common, (b"content-length", str(len(item.body)).encode())]
        await send({"type": "http.response.start", "status": item.status, "headers": headers})
        await send({"type": "http.response.body", "body": item.body})
