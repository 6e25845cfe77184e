"""HTTP request headers -> gRPC metadata and deadline.

Forwarded: ``Authorization``, ``X-Request-Id`` (generated when absent),
``traceparent``/``tracestate``, ``Grpc-Metadata-<key>`` (``-Bin`` keys
base64-decoded) and ``X-Forwarded-For`` with the client address appended.
Everything else, hop-by-hop headers included, stays at the edge.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from meshkit.gateway.core.errors import bad_request

_PREFIX = b"grpc-metadata-"
_PLEN = len(_PREFIX)
_KEY = re.compile(rb"[0-9a-z_.\-]+\Z")
_VALUE = re.compile(rb"[\x20-\x7e]*\Z")
# A request id the gateway passes on as it came: short, and only characters that are
# safe in a header, in gRPC metadata and in a log line (anything else is replaced).
_SANE_ID = re.compile(rb"[A-Za-z0-9._\-]{1,128}\Z")
_TIMEOUT = re.compile(rb"(\d{1,8})([HMSmun])\Z")
_UNIT = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "user-agent",
    }
)
_PASS = {
    b"authorization": "authorization",
    b"traceparent": "traceparent",
    b"tracestate": "tracestate",
    b"baggage": "baggage",
}


_IDS: list[str] = []
# A forked child must not hand out the parent's remaining ids.
os.register_at_fork(after_in_child=_IDS.clear)


def _new_request_id() -> str:
    """32 random hex digits; one getrandom syscall per 64 ids instead of one per request."""
    while True:
        try:
            return _IDS.pop()
        except IndexError:  # empty (or emptied by another thread since)
            raw = os.urandom(16 * 64).hex()
            _IDS.extend([raw[i : i + 32] for i in range(0, len(raw), 32)])


@dataclass(slots=True)
class RequestHeaders:
    """What the gateway takes from a request's headers."""

    metadata: list[tuple[str, str | bytes]]
    request_id: str
    timeout: float | None
    content_type: str
    accept: bytes


def accepts_trailers(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's ``TE`` header lists ``trailers``: a server sends trailer fields
    only to a client that says it takes them (RFC 9110 section 6.5.1)."""
    for name, value in headers:
        if name == b"te" and any(
            t.split(b";")[0].strip() == b"trailers" for t in value.lower().split(b",")
        ):
            return True
    return False


# Standard and URL-safe alphabets (gRPC accepts both), without padding; a padded value
# is checked after its ``=`` are stripped, and may have at most two of them.
_B64 = re.compile(rb"[A-Za-z0-9+/\-_]*\Z")
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def decode_base64(value: bytes) -> bytes | None:
    """``value`` decoded as gRPC decodes ``-bin`` metadata: either alphabet, padded to a
    multiple of 4 or not padded at all; None for anything else. (``b64decode`` without
    ``validate`` drops stray characters, so ``!!!`` would pass as empty bytes.)"""
    data = value.rstrip(b"=")
    pad = len(value) - len(data)
    if pad > 2 or (pad and len(value) % 4) or len(data) % 4 == 1 or not _B64.match(data):
        return None
    try:
        return base64.b64decode(data.translate(_URLSAFE) + b"=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError):  # pragma: no cover - excluded by the checks above
        return None


def _title(name: bytes) -> str:
    """A header name as clients usually write it (``Grpc-Metadata-Blob-Bin``)."""
    return "-".join(p.capitalize() for p in name.decode("latin-1").split("-"))


def parse_timeout(value: bytes) -> float:
    """``Grpc-Timeout`` (``<1-8 digits><H|M|S|m|u|n>``) in seconds; 400 if malformed."""
    m = _TIMEOUT.match(value.strip())
    if m is None:
        raise bad_request(
            f"invalid Grpc-Timeout {value.decode('latin-1')!r}: expected 1-8 digits and a unit "
            "H, M, S, m, u or n",
            "Grpc-Timeout",
        )
    return int(m.group(1)) * _UNIT[m.group(2)]


def read_headers(
    headers: Iterable[tuple[bytes, bytes]],
    client: tuple[str, int] | list[object] | None,
    *,
    generate_request_id: bool = True,
) -> RequestHeaders:
    """Turn ASGI headers (lower-case names) into metadata; 400 on invalid metadata."""
    md: list[tuple[str, str | bytes]] = []
    request_id = ""
    timeout: float | None = None
    content_type = ""
    accept = b""
    xff = ""
    for name, value in headers:
        passed = _PASS.get(name)
        if passed is not None:
            md.append((passed, value.decode("latin-1")))
        elif name.startswith(_PREFIX):
            key = name[_PLEN:]
            if not _KEY.match(key):
                raise bad_request(
                    f"header {name.decode('latin-1')!r} is not a valid gRPC metadata key",
                    name.decode("latin-1"),
                )
            skey = key.decode("ascii")
            if skey.startswith("grpc-") or skey in _HOP_BY_HOP:
                continue
            if skey.endswith("-bin"):
                decoded = decode_base64(value)
                if decoded is None:
                    raise bad_request(
                        f"header {_title(name)} is not valid base64 (standard or URL-safe "
                        "alphabet, padded or unpadded)",
                        _title(name),
                    )
                md.append((skey, decoded))
            else:
                if not _VALUE.match(value):
                    raise bad_request(
                        f"header {name.decode('latin-1')!r} has characters gRPC metadata cannot carry",
                        skey,
                    )
                md.append((skey, value.decode("ascii")))
        elif name == b"x-request-id":
            if _SANE_ID.match(value):
                request_id = value.decode("ascii")
        elif name == b"grpc-timeout":
            timeout = parse_timeout(value)
        elif name == b"content-type":
            content_type = value.decode("latin-1")
        elif name == b"accept":
            accept = value
        elif name == b"x-forwarded-for":
            xff = value.decode("latin-1")
    if not request_id and generate_request_id:
        request_id = _new_request_id()
    if request_id:
        md.append(("x-request-id", request_id))
    if client:
        addr = str(client[0])
        xff = f"{xff}, {addr}" if xff else addr
    if xff:
        md.append(("x-forwarded-for", xff))
    return RequestHeaders(md, request_id, timeout, content_type, accept)


#: Where :func:`assign_request_id` leaves the request's id (bytes; empty: none).
REQUEST_ID_KEY = "meshkit.request_id"

_Scope = MutableMapping[str, Any]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def assign_request_id(scope: _Scope, generate: bool = True) -> bytes:
    """Decide the request's id once, for every layer: the client's ``X-Request-Id`` if
    it is a sane token (1-128 of ``[A-Za-z0-9._-]``), else a generated one (unless
    ``generate`` is off). The scope's header is rewritten to it, so what goes upstream,
    into the log and back to the client is the same id. Idempotent per scope."""
    rid: bytes | None = scope.get(REQUEST_ID_KEY)
    if rid is not None:
        return rid
    headers = scope.get("headers") or ()
    incoming: bytes | None = None
    for k, v in headers:
        if k == b"x-request-id":
            incoming = bytes(v)
            break
    if incoming is not None and _SANE_ID.match(incoming):
        rid = incoming
    else:
        rid = _new_request_id().encode("ascii") if generate else b""
        kept = [(k, v) for k, v in headers if k != b"x-request-id"]
        if rid:
            kept.append((b"x-request-id", rid))
        scope["headers"] = kept  # a copy: the server's list stays as it was
    scope[REQUEST_ID_KEY] = rid
    return rid


def send_with_request_id(send: _Send, rid: bytes) -> _Send:
    """``send`` adding ``x-request-id: rid`` to a response start that lacks it, so every
    answer carries it, whichever layer wrote it (a 404, a 401, a 429...)."""

    async def wrapped(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers") or ()
            if not any(k == b"x-request-id" for k, _ in headers):
                message = {**message, "headers": [*headers, (b"x-request-id", rid)]}
        await send(message)

    return wrapped
