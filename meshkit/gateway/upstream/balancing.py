"""Balanced, health-checked upstreams with endpoint switching (blue-green).

:class:`BalancedUpstream` extends the gateway's :class:`~meshkit.gateway.upstream.upstreams.Upstream`
(so the transcoder still only calls ``upstream.channel(scope)``):

* round-robin over the endpoints currently healthy (when none is, over all of
  them: failing open beats refusing every request on a health-check hiccup);
* ``grpc.health.v1`` checks on a plain channel every ``interval``; an endpoint
  that answers anything but SERVING (or does not answer) leaves the rotation and
  comes back when it serves again;
* :meth:`set_targets` switches the endpoint list atomically: new requests use the
  new endpoints at once, calls in flight finish on the old channels, which
  close after ``drain`` seconds. That is the blue-green switch.
* readiness (:meth:`BalancedUpstream.not_ready`): a health-checked upstream is ready
  when its last checks found an endpoint SERVING; one without a health check when the
  channel to some endpoint is connected, which the probe finds out by asking the
  channel (connecting an idle one, waiting a bounded time for one that is connecting).

Channels are made by the gateway's :func:`~meshkit.gateway.upstream.upstreams.make_channel`,
so every call goes through meshkit's client policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshkit._sections import get_duration, get_list, get_str, section
from meshkit.config import Policy, compile_policy
from meshkit.errors import ConfigError
from meshkit.gateway._asgi import notes
from meshkit.gateway.upstream.upstreams import Upstream, loop_key, make_channel

log = logging.getLogger("meshkit.gateway.upstreams")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """grpc.health.v1 probing: ``service`` ("" = the whole server), ``interval``, ``timeout``."""

    service: str = ""
    interval: float = 2.0
    timeout: float = 1.0

    @classmethod
    def from_mapping(cls, raw: object, path: str) -> HealthCheck:
        """From ``{service: "", interval: 2s, timeout: 1s}``."""
        m = section(raw, path, ("service", "interval", "timeout"))
        return cls(
            service=get_str(m, "service", path, ""),
            interval=get_duration(m, "interval", path, 2.0),
            timeout=get_duration(m, "timeout", path, 1.0),
        )


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """A named endpoint set as configured."""

    name: str
    targets: tuple[str, ...]
    health_check: HealthCheck | None = None
    drain: float = 5.0
    #: This upstream's own client policy (compiled at load), instead of the document's.
    policy: Policy | None = None

    @classmethod
    def from_mapping(cls, name: str, raw: object, path: str) -> UpstreamSpec:
        """From ``{targets: [h:p, ...], health_check: {...}, drain: 5s}`` or a bare list/string."""
        if isinstance(raw, str):
            raw = {"targets": [t.strip() for t in raw.split(",")]}
        elif isinstance(raw, list):
            raw = {"targets": raw}
        m = section(raw, path, ("targets", "health_check", "drain", "policy"))
        targets = get_list(m, "targets", path)
        if not targets or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"{path}.targets", "expected a non-empty list of HOST:PORT")
        hc = m.get("health_check")
        policy = compile_policy(m.get("policy"), f"{path}.policy")
        return cls(
            name,
            tuple(targets),
            HealthCheck.from_mapping(hc, f"{path}.health_check") if hc is not None else None,
            get_duration(m, "drain", path, 5.0),
            policy,
        )


class BalancedUpstream(Upstream):
    """Round-robin over healthy endpoints, health-checked, switchable at run time."""

    def __init__(
        self,
        name: str,
        targets: Sequence[str],
        *,
        policy: Policy | Mapping[str, Any] | None = None,
        health_check: HealthCheck | None = None,
        drain: float = 5.0,
    ) -> None:
        super().__init__(name, targets, policy=policy)
        self.health_check = health_check
        self.drain = drain
        self.healthy: dict[str, bool] = {t: True for t in self.targets}
        self._rotation: tuple[str, ...] = self.targets
        self._rr = itertools.count()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._changed: asyncio.Event | None = None
        self._connect_probes: dict[int, asyncio.Task[bool]] = {}
        self.checks = 0

    # ---- selection

    def _recompute(self) -> None:
        live = tuple(t for t in self.targets if self.healthy.get(t, True))
        self._rotation = live or self.targets

    def pick(self) -> str:
        """The next endpoint in the rotation."""
        rot = self._rotation
        return rot[next(self._rr) % len(rot)]

    def channel(self, scope: MutableMapping[str, Any] | None = None) -> grpc.aio.Channel:
        """A channel to the next healthy endpoint (starts health checks on first use)."""
        loop = asyncio.get_running_loop()
        if self.health_check is not None and loop_key(loop) not in self._tasks:
            self.start_health_checks()
        target = self.pick()
        if scope is not None:
            notes(scope)["upstream"] = f"{self.name}/{target}"
        return self._channel_to(target, loop_key(loop))

    def _channel_to(self, target: str, loop_id: int) -> grpc.aio.Channel:
        key = (target, loop_id)
        ch = self._channels.get(key)
        if ch is None:
            ch = make_channel(target, self.policy)
            self._channels[key] = ch
        return ch

    # ---- switching

    async def set_targets(self, targets: Sequence[str], *, probe: bool = True) -> None:
        """Switch to ``targets``. With ``probe`` (and a health check configured) the new
        endpoints are checked first, so the switch lands on endpoints already known
        healthy. Channels of removed endpoints close after ``drain`` seconds."""
        if not targets:
            raise ConfigError(f"upstreams.{self.name}", "needs at least one HOST:PORT target")
        Upstream(self.name, targets)  # validates HOST:PORT the gateway's way
        new = tuple(targets)
        if new == self.targets:
            return
        health = {t: self.healthy.get(t, True) for t in new}
        if probe and self.health_check is not None:
            results = await asyncio.gather(*(self._check(t) for t in new if t not in self.targets))
            for t, ok in zip([t for t in new if t not in self.targets], results, strict=True):
                health[t] = ok
        removed = set(self.targets) - set(new)
        self.targets = new
        self.healthy = health
        self._recompute()
        log.info("upstream %s switched to %s", self.name, ", ".join(new))
        loop_id = loop_key()
        old = [(k, ch) for k, ch in self._channels.items() if k[0] in removed and k[1] == loop_id]
        for k, _ in old:
            del self._channels[k]
        if old:
            asyncio.get_running_loop().create_task(self._close_later([ch for _, ch in old]))

    def set_policy(self, policy: Policy | None) -> None:
        """Use ``policy`` from now on. A channel's interceptors hold the policy it was
        made with, so this loop's channels are replaced: new calls get new channels,
        calls in flight finish on the old ones, closed after ``drain`` seconds."""
        if policy is self.policy:
            return
        self.policy = policy
        loop_id = loop_key()
        old = [(k, ch) for k, ch in self._channels.items() if k[1] == loop_id]
        for k, _ in old:
            del self._channels[k]
        if old:
            asyncio.get_running_loop().create_task(self._close_later([ch for _, ch in old]))

    async def _close_later(self, channels: list[grpc.aio.Channel]) -> None:
        await asyncio.sleep(self.drain)
        for ch in channels:
            await ch.close(grace=self.drain)

    # ---- health

    def start_health_checks(self) -> None:
        """Start probing on the running loop (idempotent)."""
        loop = asyncio.get_running_loop()
        if loop_key(loop) in self._tasks or self.health_check is None:
            return
        self._tasks[loop_key(loop)] = loop.create_task(
            self._health_loop(), name=f"health:{self.name}"
        )

    async def _check(self, target: str) -> bool:
        hc = self.health_check or HealthCheck()
        ch = grpc.aio.insecure_channel(target)
        try:
            stub = health_pb2_grpc.HealthStub(ch)
            resp = await stub.Check(
                health_pb2.HealthCheckRequest(service=hc.service), timeout=hc.timeout
            )
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
        except (TimeoutError, grpc.aio.AioRpcError):
            return False
        finally:
            await ch.close(None)

    async def check_now(self) -> dict[str, bool]:
        """Probe every endpoint once and update the rotation."""
        targets = self.targets
        results = await asyncio.gather(*(self._check(t) for t in targets))
        changed = False
        for t, ok in zip(targets, results, strict=True):
            if t in self.targets and self.healthy.get(t) != ok:
                log.warning(
                    "upstream %s endpoint %s is %s",
                    self.name,
                    t,
                    "SERVING" if ok else "NOT SERVING",
                )
                self.healthy[t] = ok
                changed = True
        self.checks += 1
        if changed:
            self._recompute()
        return dict(self.healthy)

    async def _health_loop(self) -> None:
        assert self.health_check is not None
        while True:
            try:
                await self.check_now()
            except asyncio.CancelledError:
                raise
            except Exception:  # a probe bug must not stop probing
                log.exception("health check of %s failed", self.name)
            await asyncio.sleep(self.health_check.interval)

    @property
    def ready(self) -> bool:
        """Whether at least one endpoint reported SERVING to the last health checks (always
        true without a health check: :meth:`not_ready` also probes connectivity)."""
        return any(self.healthy.get(t, True) for t in self.targets)

    # ---- readiness

    #: The longest a readiness probe waits for channels that are still connecting.
    connect_timeout: float = 0.5

    async def not_ready(self) -> str | None:
        """Why this upstream cannot take calls now, or None when it can.

        With a health check: the last checks' results (no probe here). Without one: the
        channels requests use, one per endpoint on the running loop. A READY one means
        ready, and asking an idle channel starts its connection. When none is READY but
        some are connecting, the probe waits at most :attr:`connect_timeout` for one to
        get there. Concurrent probes on one loop share that wait.
        """
        if self.health_check is not None:
            return None if self.ready else "no endpoint reports SERVING"
        loop = asyncio.get_running_loop()
        pending = []
        for target in self.targets:
            ch = self._channel_to(target, loop_key(loop))
            state = ch.get_state(try_to_connect=True)
            if state is grpc.ChannelConnectivity.READY:
                return None
            if state in _CONNECTING:
                pending.append((ch, state))
        if pending:
            probe = self._connect_probes.get(loop_key(loop))
            if probe is None or probe.done():
                probe = loop.create_task(_first_ready(pending, self.connect_timeout))
                self._connect_probes[loop_key(loop)] = probe
            # Shielded: a /readyz client that leaves must not cancel the wait others share.
            if await asyncio.shield(probe):
                return None
        return "no endpoint accepts connections"

    async def close(self, grace: float | None = None) -> None:
        """Stop probing and close channels on the running loop."""
        probe = self._connect_probes.pop(loop_key(), None)
        if probe is not None and not probe.done():
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        task = self._tasks.pop(loop_key(), None)
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await super().close(grace)


_CONNECTING = (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)


async def _first_ready(
    channels: Sequence[tuple[grpc.aio.Channel, grpc.ChannelConnectivity]], within: float
) -> bool:
    """Whether one of ``channels`` (each with the state last seen) gets READY within
    ``within`` seconds; a channel that fails to connect drops out at once, not at the timeout."""

    async def settle(ch: grpc.aio.Channel, state: grpc.ChannelConnectivity) -> bool:
        try:
            while state in _CONNECTING:
                await ch.wait_for_state_change(state)
                state = ch.get_state(try_to_connect=True)
        except Exception:  # a broken channel is not a connected one; /readyz must answer
            log.debug("readiness probe of a channel failed", exc_info=True)
            return False
        return state is grpc.ChannelConnectivity.READY

    tasks = [asyncio.ensure_future(settle(ch, st)) for ch, st in channels]
    try:
        for next_done in asyncio.as_completed(tasks, timeout=within):
            if await next_done:
                return True
        return False
    except TimeoutError:
        return False
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
