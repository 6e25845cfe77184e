"""The durable pull consumer every participant, tracker and projection runs on.

It speaks JetStream's pull protocol itself rather than looping on ``fetch()``: it
keeps a window of outstanding pull requests with idle heartbeats, hands each message
to the handler as soon as it arrives, and when heartbeats stop (a server restart
silently loses pull requests, the known nats-py weak spot) or the client reconnects,
it re-creates the consumer if needed and pulls again.

A handler takes one message, or (``batch_handler``) every message that arrived in
one read from the socket: a participant then handles them in one inbox
transaction, publishes all their outputs before awaiting the first stream ack,
and acknowledges them together, with no task per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from meshkit._compat import nats as _nats_compat
from meshkit.errors import ConfigError
from meshkit.saga import cluster
from meshkit.saga.streams import _NAME, ConsumerSpec, StreamSpec

if TYPE_CHECKING:
    from meshkit.saga.bus import BatchHandler, EventBus, MessageHandler

__all__ = ["ConsumerStats", "PullConsumer"]

log = logging.getLogger("meshkit.saga")


@dataclass
class ConsumerStats:
    """Counters of one pull consumer (for tests, the CLI and the bench)."""

    delivered: int = 0
    handled: int = 0
    errors: int = 0
    pulls: int = 0
    backoffs: int = 0
    recoveries: int = 0
    last_error: str = ""


class PullConsumer:
    """A durable JetStream pull consumer with a window of in-flight messages.

    See the module docstring for how it survives server restarts.
    """

    def __init__(
        self,
        bus: EventBus,
        stream: str,
        durable: str,
        handler: MessageHandler | None,
        filter_subjects: tuple[str, ...],
        spec: ConsumerSpec,
        *,
        batch_handler: BatchHandler | None = None,
    ) -> None:
        if (handler is None) == (batch_handler is None):
            raise ValueError("give a consumer either a handler or a batch_handler")
        if not _NAME.match(durable):
            raise ConfigError("consumer.durable", f"{durable!r} must match [A-Za-z0-9_-]+")
        self.bus = bus
        self.stream = stream
        # Known when built from a StreamSpec: a stream lost with a memory-storage
        # server is then declared again on recovery.
        self.stream_spec: StreamSpec | None = None
        self.durable = durable
        self.handler = handler
        self.batch_handler = batch_handler
        # Messages delivered and not yet in a batch (batch_handler only). A batch starts
        # on the next loop turn (taking the rest of the socket read) or, while one
        # runs, when it ends, with every message that arrived meanwhile: fewer, larger
        # batches, as a hand-written fetch-handle-ack loop makes. A batch running
        # spec.batch_overlap seconds lets the next start beside it.
        self._arrived: list[Msg] = []
        self._runners = 0
        self._starting = False  # a runner is started and has not taken its batch yet
        self._overlap_timer: asyncio.TimerHandle | None = None
        self._batch_started = 0.0
        self.filter_subjects = filter_subjects
        self.spec = spec
        self.stats = ConsumerStats()
        self._credits = 0
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None
        self._inbox = ""
        self._stopping = False
        self._started = False
        self._last_activity = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._recovering: asyncio.Task[None] | None = None
        self._remove_listener: Callable[[], None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # After a pull ends with an error status (503 while the consumer's leader is
        # elected, 409s), the next pull waits: doubling from 50 ms to 2 s, reset by
        # the next delivered message. Without it every 503 starts the next pull at
        # once (thousands of pulls and log lines a second).
        self._backoff = 0.0
        self._not_before = 0.0
        self._retry_handle: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _config(self) -> api.ConsumerConfig:
        subjects = list(self.filter_subjects)
        return api.ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.spec.ack_wait,
            max_deliver=self.spec.max_deliver,
            max_ack_pending=max(self.spec.max_ack_pending, self.spec.max_in_flight),
            deliver_policy=api.DeliverPolicy.NEW
            if self.spec.deliver_new
            else api.DeliverPolicy.ALL,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
        )

    async def ensure(self, *, window: float | None = 0.0) -> None:
        """Create or update the durable consumer on the server.

        ``window``: how long to ride out an election (None: the library's window,
        :func:`meshkit.saga.cluster.retry_window`; 0: one try). A refusal is a
        :class:`~meshkit.saga.cluster.JetStreamAPIError` with the server's description,
        except a missing stream (nats' ``NotFoundError``, which recovery handles).
        """
        what = f"creating consumer {self.durable} on stream {self.stream}"
        try:
            await cluster.retrying(
                what,
                lambda: self.bus.js.add_consumer(self.stream, self._config()),
                window=window,
            )
        except nats.js.errors.APIError as exc:
            if isinstance(exc, (nats.js.errors.NotFoundError, *cluster.TRANSIENT)):
                raise
            raise cluster.api_error(what, exc) from None

    async def start(self) -> PullConsumer:
        """Create the consumer if needed and start pulling."""
        if self._started:
            return self
        await self.ensure(window=None)
        self._inbox = self.bus.nc.new_inbox()
        nc = self.bus.nc
        self._sub = await nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=-1)
        # Where nats-py allows (meshkit._compat.nats), deliveries skip the
        # subscription's queue and task: a batch is started, not awaited, here.
        _nats_compat.dispatch_directly(nc, self._sub, self._deliver)
        self._remove_listener = self.bus.on_reconnect(self._on_reconnect)
        self._started = True
        self._last_activity = time.monotonic()
        await self._pull()
        self._watchdog = asyncio.create_task(self._watch(), name=f"meshkit-watch-{self.durable}")
        log.debug("consumer %s on %s started", self.durable, self.stream)
        return self

    async def _pull(self) -> None:
        if self._stopping or not self._started or time.monotonic() < self._not_before:
            return
        limit = self.spec.max_in_flight
        want = limit - self._credits - self._in_flight
        # Ask in chunks of at least half the window, so requests stay few.
        if want <= 0 or (self._credits > 0 and want < max(1, limit // 2)):
            return
        request = {
            "batch": want,
            "expires": int(self.spec.pull_expires * 1e9),
            "idle_heartbeat": int(self.spec.idle_heartbeat * 1e9),
        }
        self._credits += want
        self.stats.pulls += 1
        try:
            await self.bus.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
                json.dumps(request).encode(),
                reply=self._inbox,
            )
        except Exception as exc:  # disconnected: the watchdog pulls again
            self._credits -= want
            log.debug("pull for %s failed: %r", self.durable, exc)

    async def _on_msg(self, msg: Msg) -> None:
        """nats-py's callback, where the message was not dispatched directly."""
        self._deliver(msg)

    def _deliver(self, msg: Msg) -> None:
        self._last_activity = time.monotonic()
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status:
            if status == "100":  # idle heartbeat
                return
            pending = headers.get("Nats-Pending-Messages") if headers else None
            if status in ("404", "408") and pending:
                self._credits = max(0, self._credits - int(pending))
            else:
                self._credits = 0
                if status not in ("404", "408"):
                    # Once per series of failed pulls: a leaderless consumer answers
                    # every pull at once, and each would be a log line.
                    log.log(
                        logging.DEBUG if self._backoff else logging.INFO,
                        "consumer %s: pull ended with %s %s",
                        self.durable,
                        status,
                        headers.get("Description", "") if headers else "",
                    )
                    if status == "409" and headers and "Deleted" in headers.get("Description", ""):
                        self._schedule_recover()
                        return
                    self._back_off()
                    return
            self._spawn(self._pull())
            return
        self._backoff = 0.0
        self._credits = max(0, self._credits - 1)
        self.stats.delivered += 1
        if self._stopping:
            # Hand it back at once so another instance (or our next start) gets it.
            self._spawn(_nak_quietly(msg))
            return
        self._in_flight += 1
        self._idle.clear()
        if self.batch_handler is not None:
            self._arrived.append(msg)
            if not self._starting:
                self._dispatch()
            return
        task = asyncio.create_task(self._run(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _dispatch(self) -> None:
        """Start a batch for the waiting messages now, or when the running one has run
        ``batch_overlap`` seconds, whichever a runner ending does not do first."""
        if self._runners:
            wait = self._batch_started + self.spec.batch_overlap - time.monotonic()
            if wait > 0:
                if self._overlap_timer is None:
                    self._overlap_timer = asyncio.get_running_loop().call_later(
                        wait, self._overlap_due
                    )
                return
        self._starting = True
        self._runners += 1
        task = asyncio.create_task(self._run_batch())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _overlap_due(self) -> None:
        self._overlap_timer = None
        if self._arrived and not self._starting and not self._stopping:
            self._dispatch()

    async def _run_batch(self) -> None:
        """Run batches until no message is waiting: each takes every message that
        arrived while the one before it ran."""
        try:
            while self._arrived:
                msgs, self._arrived = self._arrived, []
                self._starting = False
                self._batch_started = time.monotonic()
                await self._one_batch(msgs)
        finally:
            self._runners -= 1

    async def _one_batch(self, msgs: list[Msg]) -> None:
        assert self.batch_handler is not None
        try:
            await self.batch_handler(msgs)
            self.stats.handled += len(msgs)
        except Exception as exc:
            # A batch handler settles each message itself; one that raises leaves them
            # to redelivery (after the nak's backoff, or the ack wait).
            self.stats.errors += 1
            self.stats.last_error = repr(exc)
            log.error("consumer %s: batch handler failed: %r", self.durable, exc)
            for msg in msgs:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=self.spec.nak_delay(msg.metadata.num_delivered))
        finally:
            self._in_flight -= len(msgs)
            if self._in_flight == 0:
                self._idle.set()
            await self._pull()

    async def _run(self, msg: Msg) -> None:
        assert self.handler is not None
        try:
            await self.handler(msg)
            self.stats.handled += 1
        except Exception as exc:
            self.stats.errors += 1
            self.stats.last_error = repr(exc)
            deliveries = 1
            with contextlib.suppress(Exception):
                deliveries = msg.metadata.num_delivered
            if deliveries >= self.spec.max_deliver:
                # The server will not deliver it again: say so loudly. Handlers that
                # must not lose a message dead-letter it themselves (participants do).
                log.error(
                    "consumer %s: handler failed on the last of %d deliveries of %s; "
                    "the message is dropped: %r",
                    self.durable,
                    deliveries,
                    msg.subject,
                    exc,
                )
            else:
                log.warning("consumer %s: handler failed: %r", self.durable, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.spec.nak_delay(deliveries))
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            await self._pull()

    def _back_off(self) -> None:
        """Pull again later, not at once (see ``_backoff``)."""
        self._backoff = min(self._backoff * 2 if self._backoff else 0.05, 2.0)
        self.stats.backoffs += 1
        self._not_before = time.monotonic() + self._backoff
        if self._retry_handle is None and not self._stopping:
            self._retry_handle = asyncio.get_running_loop().call_later(
                self._backoff, self._pull_later
            )

    def _pull_later(self) -> None:
        self._retry_handle = None
        if self._stopping:
            return
        task = asyncio.create_task(self._pull())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_reconnect(self) -> None:
        self._schedule_recover()

    def _schedule_recover(self) -> None:
        if self._stopping or (self._recovering is not None and not self._recovering.done()):
            return
        self._recovering = asyncio.create_task(self._recover())

    async def _recover(self) -> None:
        """Pull requests do not survive a server restart: re-create the consumer and pull again."""
        self.stats.recoveries += 1
        self._credits = 0
        try:
            try:
                await self.ensure()
            except nats.js.errors.NotFoundError:
                if self.stream_spec is None:
                    raise
                self.bus._ensured.discard(self.stream_spec.name)
                await self.bus.ensure_stream(self.stream_spec)
                await self.ensure()
        except Exception as exc:
            log.info("consumer %s: cannot re-create yet (%r); will retry", self.durable, exc)
            self._last_activity = time.monotonic()
            return
        self._last_activity = time.monotonic()
        await self._pull()

    async def _watch(self) -> None:
        hb = self.spec.idle_heartbeat
        while not self._stopping:
            await asyncio.sleep(hb)
            if self._stopping:
                return
            if self._credits == 0:
                await self._pull()
                continue
            if time.monotonic() - self._last_activity > 3 * hb:
                log.info(
                    "consumer %s: no heartbeat for %.1fs; re-issuing its pull", self.durable, 3 * hb
                )
                await self._recover()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop pulling, finish in-flight messages (up to ``grace`` seconds), unsubscribe."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        if self._overlap_timer is not None:
            self._overlap_timer.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._recovering is not None:
            self._recovering.cancel()
        if self._remove_listener is not None:
            self._remove_listener()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self._tasks:
            for task in list(self._tasks):
                task.cancel()
        with contextlib.suppress(Exception):
            await self.bus.nc.flush(timeout=2)  # the acks of drained work leave now
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            _nats_compat.release(self.bus.nc, self._sub)
        with contextlib.suppress(ValueError):
            self.bus._consumers.remove(self)
        log.debug("consumer %s stopped", self.durable)


async def _nak_quietly(msg: Msg) -> None:
    with contextlib.suppress(Exception):
        await msg.nak()
