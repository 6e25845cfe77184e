"""nats-py's private internals, used only on the nats-py series they were tested with.

Every saga event is a publish with a dozen headers, a stream ack, a delivery and an
ack; nats-py's pure-Python header encoding and parsing are a measurable share of a
participant's CPU. Three fast paths override private methods of
``nats.aio.client.Client`` in a subclass:

``publish``
    ``_send_publish`` builds the ``HPUB`` header block with one string join (meshkit's
    ``encode_headers``, byte for byte nats-py's encoding) instead of a bytearray
    extended four times per header, then queues it as nats-py does
    (``nats.protocol.command``, ``_send_command``, ``_flush_queue``, ``_flush_pending``).
``parse_headers``
    ``_parse_header_lines`` decodes the header block once and checks names with one
    regex (meshkit's ``parse_header_lines``, nats-py's result for every input).
``direct_dispatch``
    ``_process_msg`` hands a message for a subscription registered with
    :func:`dispatch_directly` to its plain callback in the read loop (headers parsed
    and the message built as nats-py does), not through the subscription's queue and
    task: a stream's ack to a publish is one queue put, one task wake-up and one
    coroutine cheaper. Every other message takes nats-py's own path.

Off (another nats-py series, or ``MESHKIT_COMPAT=off``), :func:`client_class` returns
nats-py's own ``Client``: the same bytes on the wire and the same parsed headers, as
tests/unit/test_saga_client.py checks for the two pure functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient

from meshkit._compat import describe as _describe
from meshkit._compat import gate_open, installed_version, log_once

__all__ = [
    "FAST_PATHS",
    "INSTALLED",
    "TESTED",
    "TESTED_NATS_PY",
    "active",
    "client_class",
    "describe",
    "dispatch_directly",
    "release",
]

#: The nats-py series the overrides below were checked against (version prefixes).
TESTED: tuple[str, ...] = ("2.16.",)
TESTED_NATS_PY = TESTED
#: The installed nats-py.
INSTALLED: str = installed_version("nats-py")
_GATE = gate_open(INSTALLED, TESTED)
log = logging.getLogger("meshkit.compat")

_command: Any = None
if _GATE:  # imported only inside the gate: another nats-py may lay it out differently
    try:
        from nats.protocol import command as _command
    except ImportError:  # pragma: no cover - a layout the gate missed
        _command = None

#: Each fast path and whether it is on (tests and the first-use log line read it).
FAST_PATHS: dict[str, bool] = {
    "publish": _command is not None
    and callable(getattr(NatsClient, "_send_publish", None))
    and callable(getattr(_command, "hpub_cmd", None)),
    "parse_headers": _GATE and callable(getattr(NatsClient, "_parse_header_lines", None)),
    "direct_dispatch": _GATE
    and all(
        callable(getattr(NatsClient, name, None))
        for name in ("_process_msg", "_process_headers", "_build_message")
    ),
}


def active() -> dict[str, bool]:
    """A copy of :data:`FAST_PATHS`."""
    return dict(FAST_PATHS)


def describe() -> str:
    """One line: which fast paths are on, the installed nats-py and the tested series."""
    return _describe("nats", "nats-py", INSTALLED, TESTED, FAST_PATHS)


def client_class(
    encode_headers: Callable[[dict[str, Any]], bytes],
    parse_header_lines: Callable[[bytes], dict[str, str]],
) -> type[NatsClient]:
    """The client class for the fast paths now on in :data:`FAST_PATHS`: nats-py's
    ``Client`` itself when none is, else a subclass using ``encode_headers`` and
    ``parse_header_lines`` (pure functions that must give nats-py's results)."""
    log_once("nats", describe())
    publish, parse = FAST_PATHS["publish"], FAST_PATHS["parse_headers"]
    direct = FAST_PATHS["direct_dispatch"]
    if not (publish or parse or direct):
        return NatsClient
    namespace: dict[str, Any] = {
        "__doc__": "nats-py's client with meshkit's fast paths "
        "(meshkit._compat.nats: " + ", ".join(k for k, v in FAST_PATHS.items() if v) + ").",
        "__module__": __name__,
    }
    if parse:
        namespace["_parse_header_lines"] = staticmethod(parse_header_lines)
    if publish:
        command = _command

        async def _send_publish(
            self: Any,
            subject: str,
            reply: str,
            payload: bytes,
            payload_size: int,
            headers: dict[str, Any] | None,
        ) -> None:
            # nats-py 2.16's _send_publish, with the header block from encode_headers.
            if subject == "":
                raise nats.errors.BadSubjectError
            if headers is None:
                cmd = command.pub_cmd(subject, reply, payload)
            else:
                cmd = command.hpub_cmd(subject, reply, encode_headers(headers), payload)
            self.stats["out_msgs"] += 1
            self.stats["out_bytes"] += payload_size
            await self._send_command(cmd)
            if self._flush_queue is not None and self._flush_queue.empty():
                await self._flush_pending()

        namespace["_send_publish"] = _send_publish
    if direct:
        namespace["_meshkit_direct"] = None

        async def _process_msg(
            self: Any, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
        ) -> None:
            # nats-py 2.16's _process_msg up to building the message, for the
            # subscriptions dispatch_directly registered; the rest as nats-py does.
            direct_subs = self._meshkit_direct
            on_msg = direct_subs.get(sid) if direct_subs else None
            if on_msg is None or sid not in self._subs:
                await NatsClient._process_msg(self, sid, subject, reply, data, headers)
                return
            self.stats["in_msgs"] += 1
            self.stats["in_bytes"] += len(data)
            msg = self._build_message(
                sid, subject, reply, data, await self._process_headers(headers)
            )
            if msg:
                try:
                    on_msg(msg)
                except Exception:  # the read loop must go on, as with a failing callback
                    log.exception("direct callback for %s failed", msg.subject)

        namespace["_process_msg"] = _process_msg
    return type("Client", (NatsClient,), namespace)


def dispatch_directly(nc: Any, subscription: Any, on_msg: Callable[[Any], None]) -> bool:
    """Hand ``subscription``'s messages to ``on_msg`` (a plain function, run in the read
    loop: it must not block) instead of its ``cb``, when the ``direct_dispatch`` fast
    path is on for ``nc``; returns whether it is. Off, ``cb`` keeps receiving them."""
    if not FAST_PATHS["direct_dispatch"] or not hasattr(type(nc), "_meshkit_direct"):
        return False
    if nc._meshkit_direct is None:
        nc._meshkit_direct = {}
    nc._meshkit_direct[subscription._id] = on_msg
    return True


def release(nc: Any, subscription: Any) -> None:
    """Undo :func:`dispatch_directly` (a stopped consumer is not kept by the client)."""
    direct = getattr(nc, "_meshkit_direct", None)
    if direct:
        direct.pop(subscription._id, None)
