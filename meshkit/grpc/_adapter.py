"""What the sync and asyncio client adapters share: plans, admission to the engine, fallbacks.

The adapters differ only in how they wait (threads or the event loop) and in the call
objects grpcio expects of each; everything else about a call is here or in the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from meshkit import deadline as _deadline
from meshkit.errors import DeadlineExceededError
from meshkit.grpc._engine import Attempts, Serve, Step
from meshkit.grpc._fallback import FallbackSupport, method_types
from meshkit.grpc._plan import ClientPlan, PlanCache, PlanLevel, compile_client
from meshkit.telemetry import instruments

__all__ = ["Admission", "ClientAdapter", "StreamState"]

_log = logging.getLogger("meshkit.grpc")
_DEADLINE = _deadline._DEADLINE
# Module-level aliases: per call, `is` against a global is cheaper than an enum lookup.
_DEADLINE_ONLY = PlanLevel.DEADLINE_ONLY
_RESILIENT = PlanLevel.RESILIENT

ChannelT = TypeVar("ChannelT")

#: ``(plan, engine, timeout, refusal)`` for one call: no engine -> send it as it is with
#: ``timeout``; an engine and a refusal step -> answer with that; else run the engine.
Admission = tuple[ClientPlan, Attempts | None, float | None, Step | None]


class ClientAdapter(Generic[ChannelT]):
    """The state and the decisions both client interceptors hold (``ChannelT``: the
    channel type of ``kind: alternate`` fallbacks).

    ``target`` keys the shared per-target state (breakers, retry budgets, bulkheads);
    several channels to the same target share it. ``client_faults`` /
    ``client_rate_limits`` apply those rules on the client whatever their ``side``.
    ``alternate_channel`` builds the channel for ``kind: alternate`` fallbacks
    (default: an insecure channel of the adapter's flavour).
    """

    flavour = "sync"

    def __init__(
        self,
        policy: Any,
        target: str | None = None,
        *,
        client_faults: bool = False,
        client_rate_limits: bool = False,
        alternate_channel: Callable[[str], ChannelT] | None = None,
    ) -> None:
        self._policy = policy
        self._target = target or "default"
        self._client_faults = client_faults
        self._client_rate_limits = client_rate_limits
        self._plans = PlanCache(self._compile)
        self._m = instruments()
        self._fallbacks = FallbackSupport(
            policy.registry.last_good_cache() if policy is not None else None
        )
        self._alternate_factory = alternate_channel or self._insecure_channel
        self._alternates: dict[str, ChannelT] = {}
        self._lock = threading.Lock()

    def _insecure_channel(self, target: str) -> ChannelT:
        """A channel to a fallback's alternate target; each adapter opens its own kind."""
        raise NotImplementedError(f"{type(self).__name__} must open alternate channels")

    def _compile(self, method: str | bytes) -> ClientPlan:
        name = method.decode() if isinstance(method, bytes) else method
        return compile_client(
            self._policy,
            name,
            self._target,
            client_faults=self._client_faults,
            client_rate_limits=self._client_rate_limits,
            flavour=self.flavour,
        )

    def plan(self, method: str) -> ClientPlan:
        """The compiled plan for ``method`` (for tests and introspection)."""
        plan: ClientPlan = self._plans.get(method)
        return plan

    def _admit(
        self,
        method: str | bytes,
        timeout: float | None,
        metadata: Any,
        request_stream: bool,
        response_stream: bool,
    ) -> Admission:
        """The plan and the engine for one call (see :data:`Admission`)."""
        # (grpc.aio passes the method as bytes; the plans are keyed by either)
        plan: ClientPlan = self._plans.get(method)  # type: ignore[arg-type]
        level = plan.level
        if level is _DEADLINE_ONLY and _DEADLINE.get() is None:
            return plan, None, timeout, None
        try:
            left = _deadline.compute_timeout(timeout, plan.timeout, plan.margin)
        except DeadlineExceededError as exc:
            eng = Attempts(
                plan,
                None,
                request_stream=request_stream,
                response_stream=response_stream,
                metrics=self._m,
            )
            return plan, eng, None, eng.refuse(exc)
        if level is not _RESILIENT:
            return plan, None, left, None
        eng = Attempts(
            plan,
            left,
            metadata,
            request_stream=request_stream,
            response_stream=response_stream,
            metrics=self._m,
        )
        return plan, eng, left, None

    def _remember(self, plan: ClientPlan, request: Any, response: Any) -> None:
        fb = plan.fallback
        if fb is None or str(fb.kind) != "cached":
            return
        try:
            self._fallbacks.remember(plan.method, request, response)
        except Exception:  # caching must never fail the call
            _log.debug("could not cache the response of %s", plan.method, exc_info=True)

    def _local_fallback(self, eng: Attempts, step: Serve, request: Any) -> tuple[bool, Any]:
        """A ``default``/``cached``/``error`` fallback's answer; ``error`` raises
        :class:`~meshkit.grpc._fallback.FallbackError`."""
        fb = eng.plan.fallback
        assert fb is not None
        return self._fallbacks.local_value(fb, eng.plan.method, request)

    def _alternate(self, eng: Attempts, request: Any) -> tuple[Any, float | None] | None:
        """The multicallable for an ``alternate`` fallback and the time left for it, or
        None (no target, or message types unknown)."""
        plan = eng.plan
        target = plan.fallback.target if plan.fallback is not None else None
        if not target:
            return None
        types = method_types(plan.method)
        resp_cls = types[1] if types is not None else self._fallbacks.response_type(plan.method)
        serializer = getattr(type(request), "SerializeToString", None)
        if resp_cls is None or serializer is None:
            _log.warning("alternate fallback for %s: message types unknown", plan.method)
            return None
        with self._lock:
            channel = self._alternates.get(target)
            if channel is None:
                channel = self._alternates[target] = self._alternate_factory(target)
        call = channel.unary_unary(  # type: ignore[attr-defined]
            plan.method, request_serializer=serializer, response_deserializer=resp_cls.FromString
        )
        left = None if eng.deadline is None else max(0.001, eng.deadline - time.monotonic())
        return call, left


class StreamState:
    """A response stream's engine, what each attempt sends, and the attempt in flight.

    Held by the adapters' stream objects (and, on asyncio, by the generator reading the
    stream, so the two need not refer to each other)."""

    __slots__ = ("body", "call", "continuation", "details", "eng", "reading", "replay")

    def __init__(
        self, eng: Attempts, continuation: Any, details: Any, body: Any, replay: Any
    ) -> None:
        self.eng = eng
        self.continuation = continuation
        self.details = details
        self.body = body
        self.replay = replay  # a Replay / AsyncReplay, when the requests may be resent
        self.call: Any = None
        self.reading = False  # someone iterates the stream

    def attempt_body(self) -> Any:
        """The request (or a fresh replay of the request stream) for the next attempt."""
        return self.replay.attempt() if self.replay is not None else self.body

    @property
    def replayable(self) -> bool:
        """The request stream can still be sent again."""
        return self.replay is None or bool(self.replay.replayable)
