"""The NATS client the saga bus connects with: nats-py's, with a cheaper hot path.

Every event is a publish with a dozen headers, a stream ack, a delivery and an
ack, and nats-py's pure-Python header parsing and encoding and its request
helper are a measurable share of a participant's CPU. Here the header block is
decoded once and names are checked with one regex; headers are encoded with one
join (:func:`parse_header_lines`, :func:`encode_headers`: nats-py's results for
every input, malformed ones included, as tests/unit/test_saga_client.py checks).
They replace nats-py's private methods only through :mod:`meshkit._compat.nats`,
on the nats-py series that was tested; elsewhere :data:`Client` is nats-py's own.
JetStream publishes and batched reads share one reply subscription per connection
(:class:`Replies`, public API only).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as _NatsClient
from nats.aio.msg import Msg
from nats.js import api

from meshkit._compat import nats as _nats_compat

__all__ = ["Client", "Replies", "connect", "encode_headers", "parse_header_lines", "replies"]

# What bytes.strip() strips; str.strip() would also strip non-ASCII spaces.
_ASCII_SPACE = " \t\n\r\x0b\x0c"
# A name nats-py rejects: any character str.isspace() accepts, or one outside ASCII.
_BAD_NAME = re.compile(r"[\s\x1c-\x1f]|[^\x00-\x7f]")


# Names seen before that needed no stripping and passed _BAD_NAME: the same dozen
# names come with every event, and checking each again was most of the parse.
_good_names: set[str] = set()


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """``Name: Value`` lines (CRLF-separated) into a dict, as nats-py parses them."""
    out: dict[str, str] = {}
    good = _good_names
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            if name in good:
                out[name] = value.strip(_ASCII_SPACE)
                continue
            key = name.strip(_ASCII_SPACE)
            if _BAD_NAME.search(key) is None:
                out[key] = value.strip(_ASCII_SPACE)
                if key == name and len(good) < 4096:
                    good.add(name)
    return out


# nats-py's own header check and newline folding (nats/aio/client.py), on each key once.
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_good_keys: set[str] = set()


def encode_headers(headers: dict[str, Any]) -> bytes:
    """The ``NATS/1.0`` header block for ``headers``, byte for byte as nats-py writes it."""
    lines = ["NATS/1.0\r\n"]
    for k, v in headers.items():
        key = k.strip()
        if not key:
            continue
        if key not in _good_keys:
            if not _HEADER_KEY.fullmatch(key):
                raise nats.errors.BadHeaderError(key)
            if len(_good_keys) < 4096:
                _good_keys.add(key)
        value = v.strip()
        if "\r" in value or "\n" in value:
            value = value.translate(_VALUE_NEWLINES)
        lines.append(f"{key}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


#: The client class :func:`connect` makes: nats-py's ``Client`` with meshkit's header
#: encoder and parser on the tested nats-py series (``meshkit._compat.nats``), nats-py's
#: own ``Client`` otherwise.
Client: type[_NatsClient] = _nats_compat.client_class(encode_headers, parse_header_lines)


async def connect(servers: str | list[str], **options: object) -> _NatsClient:
    """Like :func:`nats.connect`, returning a :data:`Client`; ``servers`` may be one
    comma-separated string (``NATS_URL`` naming a cluster), which nats-py refuses."""
    from meshkit.nats import split_servers

    nc = Client()
    await nc.connect(split_servers(servers), **options)  # type: ignore[arg-type]
    return nc


class Replies:
    """The saga layer's requests on one connection: one wildcard reply subscription.

    nats-py's request costs a random token from the OS, a second future and
    ``wait_for`` per call; a JetStream publish then builds its ``PubAck`` through
    dataclass introspection. On the path every event takes (publish and wait for
    the stream's ack) that is a fifth of a participant's CPU. Here a request is a
    counter token, one future and one timer.
    """

    def __init__(self, nc: _NatsClient) -> None:
        # Weakly: the connection maps to its Replies in a WeakKeyDictionary, which a
        # strong reference back (this one, or the Subscription's) would keep alive.
        self._nc = weakref.ref(nc)
        self.prefix = nc.new_inbox()
        self._waiting: dict[str, Callable[[Msg], None]] = {}
        self._next = 0
        self._subscribed = False
        self._subscribing: asyncio.Future[None] | None = None
        # The connection's loop, taken when subscribing: asking for the running loop
        # on every request costs a getpid() system call (Python 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def nc(self) -> _NatsClient:
        """The connection (raises nats' ConnectionClosedError once it is gone)."""
        nc = self._nc()
        if nc is None:
            raise nats.errors.ConnectionClosedError
        return nc

    async def ready(self) -> None:
        """Subscribe once (concurrent first callers wait for the same subscription)."""
        if self._subscribed:
            return
        if self._subscribing is not None:
            await asyncio.shield(self._subscribing)
            return
        self._loop = asyncio.get_running_loop()
        self._subscribing = self._loop.create_future()
        try:
            nc = self.nc
            sub = await nc.subscribe(f"{self.prefix}.*", cb=self._on_msg, pending_msgs_limit=-1)
            # Where nats-py allows (meshkit._compat.nats), answers skip the
            # subscription's queue and task: settling a future needs neither.
            _nats_compat.dispatch_directly(nc, sub, self._dispatch)
        except BaseException as exc:
            self._subscribing.set_exception(exc)
            self._subscribing.exception()  # retrieved here: the next caller retries
            self._subscribing = None
            raise
        self._subscribed = True
        self._subscribing.set_result(None)

    def listen(self, on_msg: Callable[[Msg], None]) -> str:
        """A reply subject whose messages go to ``on_msg`` until :meth:`forget`."""
        self._next += 1
        subject = f"{self.prefix}.{self._next:x}"
        self._waiting[subject] = on_msg
        return subject

    def forget(self, subject: str) -> None:
        self._waiting.pop(subject, None)

    def _dispatch(self, msg: Msg) -> None:
        on_msg = self._waiting.get(msg.subject)
        if on_msg is not None:
            on_msg(msg)

    async def _on_msg(self, msg: Msg) -> None:
        self._dispatch(msg)

    async def request(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None,
        within: float,
    ) -> Msg:
        """The first reply, like ``nc.request``, within ``within`` seconds; raises
        nats' TimeoutError and NoRespondersError as it does."""
        if not self._subscribed:  # awaiting ready() each time was a coroutine per request
            await self.ready()
        loop = self._loop
        assert loop is not None  # set by ready()
        future: asyncio.Future[Msg] = loop.create_future()
        # A partial, not a closure: one object fewer for the collector per request.
        reply = self.listen(functools.partial(_settle, future))
        timer = loop.call_later(within, _expire, future)
        try:
            await self.nc.publish(subject, payload, reply=reply, headers=headers)
            msg = await future
        finally:
            timer.cancel()
            del self._waiting[reply]
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            raise nats.errors.NoRespondersError
        return msg

    async def jetstream_publish(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None,
        within: float,
    ) -> api.PubAck:
        """``js.publish``: store the message and return the stream's ack; raises the
        same errors (``NoStreamResponseError``, ``APIError`` subclasses, TimeoutError)."""
        try:
            msg = await self.request(subject, payload, headers, within)
        except nats.errors.NoRespondersError:
            raise nats.js.errors.NoStreamResponseError from None
        return _pub_ack(msg)

    async def jetstream_publish_many(
        self,
        messages: Sequence[tuple[str, bytes, dict[str, str] | None]],
        within: float,
    ) -> list[Exception | None]:
        """:meth:`jetstream_publish` for each of ``messages``, all sent before the first
        ack is awaited. For each, in order: None once the stream has it (stored, or
        a duplicate it dropped), or the error :meth:`jetstream_publish` would raise."""
        await self.ready()
        loop = self._loop
        assert loop is not None  # set by ready()
        nc = self.nc
        waiting: list[tuple[asyncio.Future[Msg], str]] = []
        unsent: Exception | None = None
        for subject, payload, headers in messages:
            future: asyncio.Future[Msg] = loop.create_future()
            reply = self.listen(functools.partial(_settle, future))
            waiting.append((future, reply))
            if unsent is None:
                try:
                    await nc.publish(subject, payload, reply=reply, headers=headers)
                except Exception as exc:  # disconnected: this one and the rest are not sent
                    unsent = exc
            if unsent is not None:
                future.set_exception(unsent)
        timer = loop.call_later(within, _expire_all, [f for f, _ in waiting])
        results: list[Exception | None] = []
        try:
            for future, _ in waiting:
                try:
                    msg = await future
                except nats.errors.Error as exc:
                    results.append(exc)
                    continue
                results.append(_stored(msg))
        finally:
            timer.cancel()
            for _, reply in waiting:
                self._waiting.pop(reply, None)
        return results


def _stored(msg: Msg) -> Exception | None:
    """None when ``msg`` is a stream's ack, else the error a publish raises for it.

    Only an answer that names an error (or is no JSON object) is decoded: an ack's
    stream and sequence are not needed here, and decoding them was a tenth of a
    participant's time per event.
    """
    data = msg.data
    if not data:
        if msg.headers and msg.headers.get("Status") == "503":
            return nats.js.errors.NoStreamResponseError()
        return ValueError("an empty answer to a JetStream publish")
    if data[:1] == b"{" and b'"error"' not in data:
        return None
    try:
        _pub_ack(msg)
    except (nats.errors.Error, ValueError, KeyError, TypeError) as exc:
        return exc
    return None


def _pub_ack(msg: Msg) -> api.PubAck:
    """The stream's answer to a publish: its ack, or the APIError it reports."""
    resp = json.loads(msg.data)
    if "error" in resp:
        raise nats.js.errors.APIError.from_error(resp["error"])
    return api.PubAck(
        stream=resp["stream"],
        seq=resp["seq"],
        domain=resp.get("domain"),
        duplicate=resp.get("duplicate"),
    )


def _settle(future: asyncio.Future[Msg], msg: Msg) -> None:
    if not future.done():
        future.set_result(msg)


def _expire_all(futures: list[asyncio.Future[Msg]]) -> None:
    for future in futures:
        _expire(future)


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


# Each connection's Replies, for as long as the connection lives (Replies refers back
# to it only weakly, so the entry goes with the connection).
_REPLIES: weakref.WeakKeyDictionary[_NatsClient, Replies] = weakref.WeakKeyDictionary()


def replies(nc: _NatsClient) -> Replies:
    """The connection's :class:`Replies`, made on first use."""
    found = _REPLIES.get(nc)
    if found is None:
        found = _REPLIES[nc] = Replies(nc)
    return found
