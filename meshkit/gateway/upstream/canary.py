"""Canary routing: split a service's calls by weight between a stable and a canary upstream.

* ``weight`` is the canary's share in percent (``10`` sends 10% to the canary).
* ``sticky`` keeps a client on one side: ``header:<name>`` (for example a user id
  header), ``subject`` (the verified JWT subject or API key name) or ``ip``.
  The key is hashed (BLAKE2b) into 10,000 buckets, so changing the weight moves
  only the clients between the old and the new threshold.
* ``x-canary: always`` / ``never`` on a request pins it (the header name is
  configurable; pinning can be turned off for public profiles).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import grpc

from meshkit._sections import get_bool, get_number, get_str, section
from meshkit.errors import ConfigError
from meshkit.gateway._asgi import PRINCIPAL_KEY, client_ip, header, notes
from meshkit.gateway.upstream.upstreams import Upstream


@dataclass(frozen=True, slots=True)
class CanarySpec:
    """``stable`` and ``canary`` upstream names, canary ``weight`` percent, ``sticky`` key."""

    stable: str
    canary: str
    weight: float
    sticky: str | None = None
    pin_header: str = "x-canary"
    allow_pin: bool = True

    @classmethod
    def from_mapping(cls, raw: object, path: str) -> CanarySpec:
        """From ``{stable: a, canary: b, weight: 10, sticky: header:x-user-id}``."""
        m = section(raw, path, ("stable", "canary", "weight", "sticky", "pin_header", "allow_pin"))
        weight = get_number(m, "weight", path)
        if weight > 100:
            raise ConfigError(f"{path}.weight", f"expected a percentage 0..100, got {weight}")
        sticky = get_str(m, "sticky", path, None)
        if sticky is not None and not (sticky in ("ip", "subject") or sticky.startswith("header:")):
            raise ConfigError(
                f"{path}.sticky", f"expected ip, subject or header:<name>; got {sticky!r}"
            )
        return cls(
            get_str(m, "stable", path),
            get_str(m, "canary", path),
            weight,
            sticky,
            get_str(m, "pin_header", path, "x-canary").lower(),
            get_bool(m, "allow_pin", path, True),
        )


def bucket_of(key: str) -> int:
    """A stable bucket 0..9999 for a sticky key."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 10_000


class CanaryUpstream(Upstream):
    """An :class:`Upstream` that picks the stable or the canary upstream per request."""

    def __init__(
        self,
        name: str,
        stable: Upstream,
        canary: Upstream,
        spec: CanarySpec,
        *,
        rng: random.Random | None = None,
    ) -> None:
        # Not a target set of its own: the base class's checks need one placeholder.
        super().__init__(name, [*stable.targets[:1]])
        self.stable = stable
        self.canary = canary
        self.spec = spec
        self._threshold = round(spec.weight * 100)
        self._rng = rng or random.Random()
        self._sticky_header = (
            spec.sticky[len("header:") :].lower().encode()
            if spec.sticky and spec.sticky.startswith("header:")
            else None
        )
        self._pin = spec.pin_header.encode()

    def choose(self, scope: MutableMapping[str, Any] | None) -> Upstream:
        """Which side serves this request."""
        if scope is not None:
            if self.spec.allow_pin:
                pin = header(scope, self._pin)
                if pin is not None:
                    p = pin.strip().lower()
                    if p == b"always":
                        return self.canary
                    if p == b"never":
                        return self.stable
            key = self._sticky_key(scope)
            if key is not None:
                return self.canary if bucket_of(key) < self._threshold else self.stable
        return self.canary if self._rng.randrange(10_000) < self._threshold else self.stable

    def _sticky_key(self, scope: MutableMapping[str, Any]) -> str | None:
        s = self.spec.sticky
        if s is None:
            return None
        if self._sticky_header is not None:
            v = header(scope, self._sticky_header)
            return v.decode("latin-1") if v else None
        if s == "subject":
            p = scope.get(PRINCIPAL_KEY)
            return f"{p.kind}:{p.subject}" if p is not None else None
        return client_ip(scope) or None

    def channel(self, scope: MutableMapping[str, Any] | None = None) -> grpc.aio.Channel:
        """The chosen side's channel."""
        side = self.choose(scope)
        if scope is not None:
            notes(scope)["canary"] = "canary" if side is self.canary else "stable"
        return side.channel(scope)

    async def close(self, grace: float | None = None) -> None:
        """The sides are closed by their own registry entries."""
