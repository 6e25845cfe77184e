"""Upstreams: named sets of gRPC endpoints, each with a channel.

An :class:`Upstream` owns its target list and opens its grpc.aio channel
lazily, on the event loop that first needs it (grpc.aio channels belong to one
loop; every worker process builds its own). The gateway only asks
``upstream.channel(scope)``, so balancing and canary routing can be added by
subclassing :class:`Upstream` or replacing :class:`UpstreamRegistry`'s lookup
without touching transcoding.

All channels are made by :func:`make_channel`, the one place that decides
which client interceptors (meshkit's policy chain) upstream calls go through.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import grpc

from meshkit.errors import ConfigError

log = logging.getLogger("meshkit.gateway")

_LOOP_KEYS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()
_loop_numbers = itertools.count(1)


def loop_key(loop: asyncio.AbstractEventLoop | None = None) -> int:
    """A number naming ``loop`` (default: the running one) that no later loop gets.

    Channels belong to the loop that made them. ``id(loop)`` is not a safe key: a new
    loop can be allocated at a closed one's address and would be handed its channels.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    key = _LOOP_KEYS.get(loop)
    if key is None:
        key = _LOOP_KEYS[loop] = next(_loop_numbers)
    return key


DEFAULT = "default"

_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
)


def make_channel(target: str, policy: Any = None) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to ``target``.

    With a policy (a ``meshkit.config.Policy``, or its mapping form, which builds a
    Policy of its own and so shares no breaker with anything), every call
    goes through ``meshkit.grpc.aio.client_interceptors(policy, target=...)``:
    deadline propagation, retries, breakers, as the policy says. Without one
    the channel is plain: grpc.aio's interceptor machinery costs a task and
    more per call, and the gateway already turns the HTTP deadline into the
    call's timeout itself.
    """
    if policy is None:
        return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
    from meshkit.config import Policy
    from meshkit.grpc import aio as mk_aio

    if isinstance(policy, Mapping):
        policy = Policy.from_dict(policy)
    interceptors = mk_aio.client_interceptors(policy, target=target)
    return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS, interceptors=interceptors)


class Upstream:
    """A named set of endpoints, used round-robin (one channel per endpoint and event
    loop). :class:`~meshkit.gateway.upstream.balancing.BalancedUpstream` adds health checks
    and switching; any subclass may choose differently by overriding :meth:`channel`."""

    def __init__(self, name: str, targets: Sequence[str], *, policy: Any = None) -> None:
        if not targets:
            raise ConfigError(f"upstreams.{name}", "needs at least one HOST:PORT target")
        for t in targets:
            check_target(t, f"upstreams.{name}")
        self.name = name
        self.targets = tuple(targets)
        self.policy = policy
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}
        self._next = itertools.count()

    def channel(self, scope: MutableMapping[str, Any] | None = None) -> grpc.aio.Channel:
        """The channel for a request (``scope`` is the ASGI scope, for routing decisions):
        the next target in turn, so ``a:1,b:2`` spreads requests over both."""
        targets = self.targets
        target = targets[next(self._next) % len(targets)] if len(targets) > 1 else targets[0]
        key = (target, loop_key())
        ch = self._channels.get(key)
        if ch is None:
            ch = make_channel(target, self.policy)
            self._channels[key] = ch
        return ch

    async def close(self, grace: float | None = None) -> None:
        """Close every channel this upstream opened on the running loop."""
        loop_id = loop_key()
        for key, ch in list(self._channels.items()):
            if key[1] == loop_id:
                del self._channels[key]
                await ch.close(grace)

    def __repr__(self) -> str:
        return f"Upstream({self.name!r}, {list(self.targets)!r})"


def check_target(target: str, path: str) -> None:
    """Refuse a target that is neither ``HOST:PORT`` nor a gRPC ``unix:``/``dns:``/
    ``ipv4:``/``ipv6:`` URI (the ConfigError names ``path``)."""
    host, sep, port = target.rpartition(":")
    valid = bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
    if not valid and not target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        raise ConfigError(path, f"expected HOST:PORT, got {target!r}")


class UpstreamRegistry:
    """Service full name -> :class:`Upstream`, with a ``default`` for the rest."""

    def __init__(self, upstreams: Mapping[str, Upstream], routes: Mapping[str, str]) -> None:
        self.upstreams = dict(upstreams)
        self.routes = dict(routes)
        for svc, up in self.routes.items():
            if up not in self.upstreams:
                raise ConfigError(f"upstreams.{svc}", f"names unknown upstream {up!r}")

    @classmethod
    def from_specs(
        cls, specs: Sequence[str] | Mapping[str, str], *, policy: Any = None
    ) -> UpstreamRegistry:
        """From CLI-style specs: ``HOST:PORT`` (default) or ``SERVICE=HOST:PORT``;
        a mapping form ``{service_or_default: target}`` is accepted too. Several
        targets for one service may be comma-separated."""
        pairs: list[tuple[str, str]] = []
        if isinstance(specs, Mapping):
            pairs = [(str(k), str(v)) for k, v in specs.items()]
        else:
            for spec in specs:
                name, sep, target = spec.partition("=")
                pairs.append((name, target) if sep else (DEFAULT, spec))
        ups: dict[str, Upstream] = {}
        routes: dict[str, str] = {}
        for name, target in pairs:
            if name in ups:
                raise ConfigError(f"upstreams.{name}", "given twice")
            ups[name] = Upstream(
                name, [t.strip() for t in target.split(",") if t.strip()], policy=policy
            )
            routes[name] = name
        return cls(ups, routes)

    def for_service(self, service: str) -> Upstream | None:
        """The upstream serving ``service`` (or the default), None if there is none."""
        name = self.routes.get(service)
        if name is None:
            name = self.routes.get(DEFAULT)
            if name is None:
                return None
        return self.upstreams[name]

    async def close(self, grace: float | None = None) -> None:
        """Close all channels opened on the running loop."""
        for up in self.upstreams.values():
            await up.close(grace)
