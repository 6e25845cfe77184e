"""Rate limits at the edge: token buckets per route, API key, JWT subject or client IP.

The buckets are :mod:`meshkit.resilience.ratelimit`'s :class:`KeyedRateLimiter`
(no second implementation here); this module only extracts the key from the
request and answers a refusal with 429, ``Retry-After`` and a
``RESOURCE_EXHAUSTED`` ``google.rpc.Status`` body carrying a ``RetryInfo``.

Limits live in the gateway process. With ``--workers N`` each worker has its own
buckets, so a limit of R per second admits up to N*R across the host (and M*N*R
across M instances). Configure ``rate`` per process accordingly
(``docs/edge.md``). A shared store (NATS KV) is deliberately not offered: a KV
compare-and-set round trip per request costs more than the transcoded call
itself and serializes hot keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from meshkit._sections import get_str, section
from meshkit.auth import ApiKey, Principal, RateSpec
from meshkit.errors import ConfigError
from meshkit.gateway._asgi import PRINCIPAL_KEY, ASGIApp, Receive, Scope, Send, client_ip, notes
from meshkit.gateway.core.errors import GatewayError
from meshkit.gateway.edge._responses import send_error
from meshkit.resilience.clock import SYSTEM_CLOCK, Clock
from meshkit.resilience.ratelimit import KeyedRateLimiter, RateLimitConfig

KEY_KINDS = ("route", "api_key", "subject", "ip")


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """A route's limit: ``limit`` shared per value of ``key`` (route, api_key, subject, ip).

    Callers without an API key or subject share the bucket of their IP address.
    """

    limit: RateSpec
    key: str = "route"

    @classmethod
    def from_mapping(cls, raw: object, path: str) -> RateLimitRule:
        """From ``{rate: 100, per: 1s, burst: 100, key: ip}``."""
        m = section(raw, path, ("rate", "per", "burst", "key"))
        key = get_str(m, "key", path, "route")
        if key not in KEY_KINDS:
            raise ConfigError(f"{path}.key", f"expected one of {', '.join(KEY_KINDS)}; got {key!r}")
        spec = RateSpec.from_mapping({k: v for k, v in m.items() if k != "key"}, path)
        return cls(spec, key)


def make_limiter(spec: RateSpec, name: str, clock: Clock = SYSTEM_CLOCK) -> KeyedRateLimiter:
    """A keyed limiter for ``spec``."""
    return KeyedRateLimiter(
        RateLimitConfig(rate=spec.rate, per=spec.per, burst=spec.effective_burst),
        name=name,
        clock=clock,
    )


class ApiKeyLimits:
    """One bucket per API key that has its own limit, shared by every route of a profile."""

    def __init__(self, keys: tuple[ApiKey, ...], clock: Clock = SYSTEM_CLOCK) -> None:
        self._limiters = {
            k.name: make_limiter(k.rate_limit, f"api_key:{k.name}", clock)
            for k in keys
            if k.rate_limit is not None
        }

    def __bool__(self) -> bool:
        """Whether any key has a limit (routes skip the check entirely otherwise)."""
        return bool(self._limiters)

    def try_acquire(self, key_name: str) -> float:
        """0.0 if admitted, else the seconds to wait."""
        lim = self._limiters.get(key_name)
        return lim.try_acquire("") if lim is not None else 0.0


def _caller_key(kind: str, scope: Scope) -> str:
    if kind == "route":
        return ""
    p: Principal | None = scope.get(PRINCIPAL_KEY)
    if kind == "api_key" and p is not None and p.kind == "api_key":
        return "k:" + p.subject
    if kind == "subject" and p is not None and p.subject:
        return "s:" + p.subject
    return "ip:" + client_ip(scope)


def too_many(wait: float, what: str) -> GatewayError:
    """The 429 answer: ``Retry-After`` in whole seconds (at least 1) and a RetryInfo detail."""
    secs = 1 if math.isinf(wait) else max(1, math.ceil(wait))
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(
            seconds=int(wait) if not math.isinf(wait) else 1,
            nanos=int((wait % 1) * 1e9) if not math.isinf(wait) else 0,
        )
    )
    return GatewayError(
        "RESOURCE_EXHAUSTED",
        f"rate limit exceeded for {what}",
        details=[info],
        headers=[(b"retry-after", str(secs).encode())],
    )


class RateLimitMiddleware:
    """ASGI middleware: the route's rule (if any), then the caller's API key limit (if any)."""

    def __init__(
        self,
        app: ASGIApp,
        rule: RateLimitRule | None = None,
        *,
        api_key_limits: ApiKeyLimits | None = None,
        name: str = "route",
        clock: Clock = SYSTEM_CLOCK,
        on_reject: Callable[[Scope, str], None] | None = None,
    ) -> None:
        self.app = app
        self.rule = rule
        self.limiter = make_limiter(rule.limit, name, clock) if rule is not None else None
        self.api_key_limits = api_key_limits
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.limiter is not None and self.rule is not None:
            key = _caller_key(self.rule.key, scope)
            wait = self.limiter.try_acquire(key)
            if wait > 0:
                await self._reject(scope, send, wait, self.rule.key)
                return
        if self.api_key_limits is not None:
            p: Principal | None = scope.get(PRINCIPAL_KEY)
            if p is not None and p.kind == "api_key":
                wait = self.api_key_limits.try_acquire(p.subject)
                if wait > 0:
                    await self._reject(scope, send, wait, f"API key {p.subject!r}")
                    return
        await self.app(scope, receive, send)

    async def _reject(self, scope: Scope, send: Send, wait: float, what: str) -> None:
        notes(scope)["rate_limited"] = True
        if self.on_reject is not None:
            self.on_reject(scope, what)
        await send_error(send, too_many(wait, what))
