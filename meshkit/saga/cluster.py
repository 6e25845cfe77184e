"""Running on a JetStream cluster: one replicas setting, one retry window.

Replicas
    Every stream and KV bucket meshkit creates (saga streams, event stores,
    snapshot and tracker buckets, the dead-letter stream, the orchestrator's
    stream and bucket) takes its replicas from its spec when the spec names them,
    else from ``MESHKIT_NATS_REPLICAS`` (1 to 5; 1 when unset), read each time a
    spec is turned into a server config. So ``MESHKIT_NATS_REPLICAS=3`` in every
    service's environment makes the whole deployment R3 with no code change.
    :func:`replicas` resolves a spec's value.

Retry window
    While a cluster elects a stream or meta leader (a node died), JetStream
    answers 503, "no responders" or nothing at all for a few seconds. Publishes,
    event-store appends and reads, stream/consumer/bucket creation and lookups,
    and tracker waits retry such answers with backoff for up to
    ``MESHKIT_NATS_RETRY_WINDOW`` seconds (default 15), then raise
    :class:`JetStreamUnavailable` saying what failed and how. :func:`retrying`
    is that loop. See docs/operations.md for the measured stall on a node loss.

Stalled sources
    A replicated stream that sources another (an ``EventStoreSource``; the shop's
    ``SHOP`` did until its order store moved into it) can stop copying for ~45 s after its leader dies: the new
    leader asks the source stream for a consumer, and when that request is lost
    in the same election nats-server waits 30 s for the answer and then backs
    off 10 s more. :class:`SourceWatch` (started by ``EventBus.ensure_stream``
    for a replicated stream with sources) sees such a source in stream info and
    asks the leader to step down; the next one sets its sources up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from meshkit.errors import ConfigError, MeshkitError

__all__ = [
    "DEFAULT_RETRY_WINDOW",
    "DEFAULT_SOURCE_STALL",
    "REPLICAS_ENV",
    "RETRY_WINDOW_ENV",
    "SOURCE_STALL_ENV",
    "TRANSIENT",
    "JetStreamAPIError",
    "JetStreamUnavailable",
    "SourceWatch",
    "add_stream",
    "api_error",
    "check_replicas",
    "default_replicas",
    "describe",
    "ensure_key_value",
    "replicas",
    "replicas_target",
    "retry_window",
    "retrying",
    "retrying_after",
    "source_stall",
    "stream_info_existing",
    "stream_info_or_none",
    "update_stream",
]

log = logging.getLogger("meshkit.saga.cluster")

REPLICAS_ENV = "MESHKIT_NATS_REPLICAS"
RETRY_WINDOW_ENV = "MESHKIT_NATS_RETRY_WINDOW"
#: Seconds: longer than the elections measured on a 3-node loopback cluster after
#: a SIGKILL (docs/operations.md), with room for a loaded machine.
DEFAULT_RETRY_WINDOW = 15.0
SOURCE_STALL_ENV = "MESHKIT_NATS_SOURCE_STALL"
#: Seconds a stream's source may stay inactive under one leader before
#: :class:`SourceWatch` nudges it. A healthy source hears a heartbeat every second,
#: and a new leader sets its sources up within ~2 s.
DEFAULT_SOURCE_STALL = 6.0

#: What a cluster answers while a leader is being elected, or a node restarts.
TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
)

T = TypeVar("T")


class JetStreamUnavailable(MeshkitError, TimeoutError):
    """JetStream did not answer within the retry window (an election that did not
    end, a lost quorum, or no server at all). A ``TimeoutError``."""

    code = "UNAVAILABLE"


class JetStreamAPIError(MeshkitError):
    """JetStream refused a request (placement, limits, a bad config): the server's
    description and error code, and what meshkit asked for."""

    code = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, err_code: int | None = None) -> None:
        super().__init__(message)
        self.err_code = err_code


def default_replicas() -> int:
    """``MESHKIT_NATS_REPLICAS`` (1 when unset); raises :class:`ConfigError` naming
    the variable when it is not an integer from 1 to 5."""
    raw = os.environ.get(REPLICAS_ENV, "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 5 or str(value) != raw.lstrip("+"):
        raise ConfigError(
            REPLICAS_ENV, f"{raw!r}: expected an integer from 1 to 5 (JetStream's replica limit)"
        )
    return value


def replicas(value: int | None) -> int:
    """A spec's replicas: ``value`` when it names them, else :func:`default_replicas`."""
    return default_replicas() if value is None else value


def check_replicas(value: object, path: str) -> None:
    """Raise :class:`ConfigError` at ``path`` unless ``value`` is None or 1 to 5."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
        raise ConfigError(path, f"{value!r}: expected 1 to 5 (or unset: {REPLICAS_ENV})")


def retry_window() -> float:
    """``MESHKIT_NATS_RETRY_WINDOW`` in seconds (``15``, ``20s``, ``1m``), default 15."""
    raw = os.environ.get(RETRY_WINDOW_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_WINDOW
    from meshkit.config import parse_duration

    value = parse_duration(raw, RETRY_WINDOW_ENV)
    if not value > 0:
        raise ConfigError(RETRY_WINDOW_ENV, f"{raw!r}: must be > 0 seconds")
    return float(value)


def describe(exc: BaseException) -> str:
    """An error as a person reads it: the server's description and codes for a
    JetStream API error (nats-py's repr of those is a bare ``NotFoundError()``)."""
    if isinstance(exc, nats.js.errors.APIError):
        parts = [f"code {exc.code}"] if exc.code else []
        if exc.err_code:
            parts.append(f"err_code {exc.err_code}")
        text = exc.description or type(exc).__name__
        return f"{text} ({', '.join(parts)})" if parts else text
    if isinstance(exc, nats.errors.NoRespondersError):
        return "no responders (no JetStream leader answering)"
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer (timeout)"
    return repr(exc)


def api_error(what: str, exc: nats.js.errors.APIError) -> JetStreamAPIError:
    """``exc`` as a :class:`JetStreamAPIError` saying what was asked (``what``)."""
    return JetStreamAPIError(f"{what}: {describe(exc)}", err_code=exc.err_code)


async def retrying(
    what: str,
    call: Callable[[], Awaitable[T]],
    *,
    window: float | None = None,
    transient: tuple[type[BaseException], ...] = TRANSIENT,
) -> T:
    """``await call()``, again with backoff (50 ms doubling to 1 s, jittered) while it
    raises a ``transient`` error, for up to ``window`` seconds (default:
    :func:`retry_window`); then :class:`JetStreamUnavailable` naming ``what``, how
    long and the last error. Only calls that are safe to repeat belong here."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        return await call()  # the usual case: no window to look up, no loop to enter
    except transient as exc:
        first: BaseException = exc
    return await _retrying(what, call, window, transient, loop, start, first)


async def retrying_after(
    what: str,
    call: Callable[[], Awaitable[T]],
    start: float,
    first: BaseException,
    *,
    window: float | None = None,
    transient: tuple[type[BaseException], ...] = TRANSIENT,
) -> T:
    """:func:`retrying` for a caller that made the first try itself (a hot path that
    cannot afford the extra coroutines): that try started at loop time ``start`` and
    raised ``first``, one of ``transient``; the tries after it, in the same window."""
    loop = asyncio.get_running_loop()
    return await _retrying(what, call, window, transient, loop, start, first)


async def _retrying(
    what: str,
    call: Callable[[], Awaitable[T]],
    window: float | None,
    transient: tuple[type[BaseException], ...],
    loop: asyncio.AbstractEventLoop,
    start: float,
    first: BaseException,
) -> T:
    """:func:`retrying` after its first try failed with ``first``."""
    limit = retry_window() if window is None else window
    delay = 0.05
    tries = 0
    failed: BaseException | None = first
    while True:
        try:
            if failed is not None:
                raise failed
            return await call()
        except transient as exc:
            failed = None
            tries += 1
            left = start + limit - loop.time()
            if left <= 0:
                raise JetStreamUnavailable(
                    f"{what}: JetStream did not answer within {limit:g}s "
                    f"({tries} tries; last: {describe(exc)}): a leader election that did "
                    f"not end, a lost quorum, or no server; the window is {RETRY_WINDOW_ENV}"
                ) from exc
            if tries == 1:
                log.info("%s: %s; retrying for up to %.0fs", what, describe(exc), left)
            await asyncio.sleep(min(left, delay * random.uniform(0.7, 1.3)))
            delay = min(delay * 2, 1.0)


# -- streams and buckets --------------------------------------------------------

#: "stream name already in use with a different configuration": someone created it first.
STREAM_NAME_IN_USE = 10058


def replicas_target(what: str, current: int, wanted: int | None) -> int | None:
    """The replicas to update ``what`` to, or None to leave it at ``current``.

    Replicas only go up: a spec that leaves them to the default (``wanted`` None)
    raises them to :func:`default_replicas` and leaves a higher value alone; an
    explicit lower value is a mismatch, logged as a WARNING and not applied (the
    first service to start with an old spec must not scale a stream down).
    """
    target = replicas(wanted)
    if target > current:
        return target
    if wanted is not None and wanted < current:
        log.warning(
            "%s: replicas is %d on the server, the spec wants %d; left at %d "
            "(meshkit never lowers replicas: change them on the server if you mean it)",
            what,
            current,
            wanted,
            current,
        )
    return None


async def stream_info_or_none(js: JetStreamContext, stream: str) -> api.StreamInfo | None:
    """The stream's info (retried through elections), or None when it does not exist."""
    try:
        return await retrying(f"looking up stream {stream}", lambda: js.stream_info(stream))
    except nats.js.errors.NotFoundError:
        return None


#: What a lookup of a stream the server has just said exists may answer for a moment:
#: right after an R3 stream is created (by us or by another process at the same
#: time), before its Raft group has a leader, stream info can say 10059 "stream not
#: found". Retried like an election, but only for a stream known to exist.
JUST_CREATED: tuple[type[BaseException], ...] = (*TRANSIENT, nats.js.errors.NotFoundError)


async def stream_info_existing(
    js: JetStreamContext, stream: str, *, window: float | None = None
) -> api.StreamInfo:
    """The info of a stream known to exist (just created, or a create refused because
    it exists): "not found" is retried with elections' answers (:data:`JUST_CREATED`)
    within ``window`` (default :func:`retry_window`), then :class:`JetStreamUnavailable`."""
    return await retrying(
        f"looking up stream {stream} (just created)",
        lambda: js.stream_info(stream),
        window=window,
        transient=JUST_CREATED,
    )


async def ensure_key_value(
    js: JetStreamContext,
    bucket: str,
    *,
    history: int = 1,
    storage: str = "file",
    replicas_: int | None = None,
) -> KeyValue:
    """The KV bucket, created when missing with ``replicas_`` (None: the default);
    an existing bucket's replicas are raised to that, never lowered.

    Lookups and creation ride out elections (:func:`retrying`); a refusal (no
    placement for the replicas, say) raises :class:`JetStreamAPIError` with the
    server's description.
    """
    info = await stream_info_or_none(js, f"KV_{bucket}")
    if info is None:
        n = replicas(replicas_)
        config = api.KeyValueConfig(
            bucket=bucket, history=history, storage=api.StorageType(storage), replicas=n
        )
        try:
            return await retrying(
                f"creating KV bucket {bucket}", lambda: js.create_key_value(config)
            )
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise api_error(f"creating KV bucket {bucket} (replicas {n})", exc) from None
            # Created by another process between our lookup and our create.
    else:
        target = replicas_target(f"KV bucket {bucket}", info.config.num_replicas or 1, replicas_)
        if target is not None:
            await update_stream(
                js,
                dataclasses.replace(info.config, num_replicas=target),
                f"raising the replicas of KV bucket {bucket} to {target}",
            )
    # The bucket exists now: "not found" is a just-created R3 bucket without a leader yet.
    return await retrying(
        f"opening KV bucket {bucket}", lambda: js.key_value(bucket), transient=JUST_CREATED
    )


async def update_stream(js: JetStreamContext, config: api.StreamConfig, what: str) -> None:
    """``js.update_stream`` through elections; a refusal is a :class:`JetStreamAPIError`."""
    try:
        await retrying(what, lambda: js.update_stream(config))
    except nats.js.errors.APIError as exc:
        if isinstance(exc, TRANSIENT):
            raise
        raise api_error(what, exc) from None
    log.info("%s", what)


async def add_stream(js: JetStreamContext, config: api.StreamConfig) -> bool:
    """Create the stream through elections: True when created (or already there with
    this very config), False when it exists with another config (someone else made
    it first). A refusal is a :class:`JetStreamAPIError` naming the stream, its
    replicas and the server's description (e.g. no suitable peers for placement)."""
    try:
        await retrying(f"creating stream {config.name}", lambda: js.add_stream(config))
        return True
    except nats.js.errors.APIError as exc:
        if isinstance(exc, TRANSIENT):
            raise
        if exc.err_code == STREAM_NAME_IN_USE:
            return False
        raise api_error(
            f"creating stream {config.name} (replicas {config.num_replicas or 1})", exc
        ) from None


# -- stalled sources ------------------------------------------------------------


def source_stall() -> float:
    """``MESHKIT_NATS_SOURCE_STALL`` in seconds (``6``, ``10s``; ``0`` turns
    :class:`SourceWatch` off), default :data:`DEFAULT_SOURCE_STALL`."""
    raw = os.environ.get(SOURCE_STALL_ENV, "").strip()
    if not raw:
        return DEFAULT_SOURCE_STALL
    from meshkit.config import parse_duration

    value = parse_duration(raw, SOURCE_STALL_ENV)
    if value < 0:
        raise ConfigError(SOURCE_STALL_ENV, f"{raw!r}: must be >= 0 seconds (0: off)")
    return float(value)


class SourceWatch:
    """Watches a replicated stream's sources; nudges one that stays inactive.

    Why: when a stream's leader changes, the new leader asks each source stream for
    a consumer. If that request is lost (the JetStream meta leader died with the
    stream leader and no one answers until a new one is elected), nats-server waits
    30 s for the answer, then backs off another 10 s: the stream copies nothing for
    ~45 s while its sources keep taking events (measured: 1 run in 6 of the shop's
    leader-kill run, docs/operations.md). Stream info shows such a source with
    ``active`` -1 (nothing heard since this leader took over); a healthy source
    hears a heartbeat every second.

    What: every ``interval`` s (jittered) the watch reads the stream's info. A source
    whose ``active`` is -1, or older than ``stalled_after``, for ``stalled_after`` s
    under one leader is stalled: the watch checks once more and asks the leader to
    step down (``$JS.API.STREAM.LEADER.STEPDOWN``); the next leader sets its sources
    up anew, from where the stream's copy stands (nothing is copied twice: sourced
    messages are deduplicated by the server's source sequence tracking). Then it
    stays quiet for ``stalled_after`` s. Several processes may watch one stream: a
    leader change resets every watch's clock, so one nudge is normally all.
    """

    def __init__(
        self,
        nc: Any,
        stream: str,
        *,
        stalled_after: float | None = None,
        interval: float = 1.0,
        timeout: float = 2.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.stalled_after = source_stall() if stalled_after is None else stalled_after
        self.interval = interval
        self.timeout = timeout
        self._clock = clock
        self._since: dict[str, tuple[str, float]] = {}  # source -> (leader, idle since)
        self._quiet_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self.nudges = 0
        self.checks = 0

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def _info(self) -> dict[str, Any] | None:
        try:
            msg = await self.nc.request(f"$JS.API.STREAM.INFO.{self.stream}", b"", self.timeout)
            info = json.loads(msg.data)
        except Exception:  # an election, a reconnect: nothing to judge by
            return None
        return None if not isinstance(info, dict) or "error" in info else info

    def _stalled(self, info: dict[str, Any]) -> list[str]:
        """The sources stalled for ``stalled_after`` s under the info's leader."""
        leader = str((info.get("cluster") or {}).get("leader") or "")
        now = self._now()
        out: list[str] = []
        seen: set[str] = set()
        for src in info.get("sources") or []:
            name = str(src.get("name") or "")
            seen.add(name)
            active = src.get("active")
            idle = (
                not leader
                or active is None
                or int(active) < 0
                or int(active) / 1e9 >= self.stalled_after
            )
            if not idle:
                self._since.pop(name, None)
                continue
            since = self._since.get(name)
            if since is None or since[0] != leader:
                self._since[name] = (leader, now)
            elif leader and now - since[1] >= self.stalled_after:
                out.append(name)
        for name in set(self._since) - seen:
            del self._since[name]
        return out

    async def check(self) -> list[str]:
        """One look; returns the sources it nudged for (the leader was asked to step down)."""
        if self.stalled_after <= 0:
            return []
        self.checks += 1
        info = await self._info()
        if info is None:
            return []
        stalled = self._stalled(info)
        if not stalled or self._now() < self._quiet_until:
            return []
        # Once more: another watch may just have nudged (a new leader resets the clock).
        again = await self._info()
        if again is None or not (stalled := [s for s in self._stalled(again) if s in stalled]):
            return []
        leader = str((again.get("cluster") or {}).get("leader") or "")
        log.warning(
            "stream %s: source %s has copied nothing for %.0fs under leader %s (a source "
            "consumer request lost in an election; nats-server would wait ~45s); asking "
            "the leader to step down so the next one sets its sources up again",
            self.stream,
            ", ".join(stalled),
            self.stalled_after,
            leader,
        )
        try:
            msg = await self.nc.request(
                f"$JS.API.STREAM.LEADER.STEPDOWN.{self.stream}", b"", self.timeout
            )
            answer = json.loads(msg.data)
            if isinstance(answer, dict) and "error" in answer:
                log.warning("stream %s: step down refused: %s", self.stream, answer["error"])
        except Exception as exc:
            log.warning("stream %s: step down request failed: %s", self.stream, describe(exc))
        self.nudges += 1
        self._since.clear()
        self._quiet_until = self._now() + self.stalled_after
        return stalled

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval * random.uniform(0.8, 1.2))
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a watch never takes its process down
                log.exception("stream %s: watching its sources failed", self.stream)

    def start(self) -> SourceWatch:
        """Run :meth:`check` in the background until :meth:`stop` (no-op when off)."""
        if self._task is None and self.stalled_after > 0:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"meshkit-source-watch-{self.stream}"
            )
        return self

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
