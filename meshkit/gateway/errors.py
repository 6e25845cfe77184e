"""gRPC status to HTTP, and ``google.rpc.Status`` JSON bodies for every error.

The mapping is grpc-gateway's and Envoy's. Bodies are always canonical
``google.rpc.Status`` JSON with ``details`` decoded from their ``Any`` payloads
(BadRequest, ErrorInfo, RetryInfo, ...) — also for the gateway's own errors,
so a client parses one error shape whatever went wrong.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pool, json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

log = logging.getLogger("meshkit.gateway")

#: gRPC status code name -> HTTP status.
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}

CODE_NUMBER: dict[str, int] = {c.name: c.value[0] for c in grpc.StatusCode}
CODE_NAME: dict[int, str] = {v: k for k, v in CODE_NUMBER.items()}

_DETAILS_KEY = "grpc-status-details-bin"


class GatewayError(Exception):
    """An error the gateway answers with itself: a status code name, a message,
    optional detail messages, and optionally an HTTP status other than the mapped one."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: Sequence[Message] = (),
        http_status: int | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details)
        self.http_status = http_status if http_status is not None else HTTP_STATUS.get(code, 500)
        self.headers = list(headers)

    def to_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` message for this error."""
        st = status_pb2.Status(code=CODE_NUMBER.get(self.code, 2), message=self.message)
        for d in self.details:
            st.details.add().Pack(d)
        return st


def bad_request(
    message: str, field: str | None = None, description: str | None = None
) -> GatewayError:
    """A 400 INVALID_ARGUMENT, with a BadRequest field violation when ``field`` is given."""
    details: list[Message] = []
    if field is not None:
        br = error_details_pb2.BadRequest()
        br.field_violations.add(field=field, description=description or message)
        details.append(br)
    return GatewayError("INVALID_ARGUMENT", message, details=details)


def status_from_rpc_error(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The rich status of a failed call: ``grpc-status-details-bin`` if sent, else code+message."""
    code = err.code()
    number = code.value[0] if isinstance(code, grpc.StatusCode) else 2
    trailers: Any = err.trailing_metadata() or ()
    for key, value in trailers:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            st = status_pb2.Status()
            try:
                st.ParseFromString(value)
            except DecodeError:
                break
            if st.code == number:
                return st
            break
    return status_pb2.Status(code=number, message=err.details() or "")


def _any_to_json(a: any_pb2.Any, pool: descriptor_pool.DescriptorPool | None) -> dict[str, Any]:
    try:
        out: dict[str, Any] = json_format.MessageToDict(a, descriptor_pool=pool)
        return out
    except (TypeError, KeyError, json_format.Error):
        # A detail type the pool does not know: keep it lossless as base64.
        return {"@type": a.type_url, "value": base64.b64encode(a.value).decode("ascii")}


def status_json(
    st: status_pb2.Status, pool: descriptor_pool.DescriptorPool | None = None
) -> dict[str, Any]:
    """``google.rpc.Status`` as canonical JSON (a dict), details decoded."""
    return {
        "code": st.code,
        "message": st.message,
        "details": [_any_to_json(a, pool) for a in st.details],
    }


def status_body(st: status_pb2.Status, pool: descriptor_pool.DescriptorPool | None = None) -> bytes:
    """Serialized :func:`status_json`."""
    return json.dumps(status_json(st, pool), ensure_ascii=False, separators=(",", ":")).encode()


async def send_status(
    send: Callable[[dict[str, Any]], Awaitable[None]],
    http_status: int,
    st: status_pb2.Status,
    pool: descriptor_pool.DescriptorPool | None = None,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer an ASGI HTTP request with ``st`` as its ``google.rpc.Status`` JSON body.

    The one place an error response is written, for the transcoder and the edge alike.
    """
    body = status_body(st, pool)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def http_status_for(code_number: int) -> int:
    """HTTP status for a numeric gRPC code."""
    return HTTP_STATUS.get(CODE_NAME.get(code_number, "UNKNOWN"), 500)


def metadata_headers(md: Any, prefix: bytes = b"grpc-metadata-") -> list[tuple[bytes, bytes]]:
    """gRPC metadata as ``Grpc-Metadata-<key>`` response headers (``-bin`` values base64);
    another ``prefix`` names them otherwise (``grpc-trailer-`` for HTTP trailers)."""
    out: list[tuple[bytes, bytes]] = []
    if not md:
        return out
    for key, value in md:
        if key.startswith("grpc-") or key == _DETAILS_KEY:
            continue
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        out.append((prefix + key.encode("latin-1"), value.encode("latin-1", "replace")))
    return out


def metadata_json(md: Any) -> dict[str, list[str]]:
    """gRPC metadata as JSON: each key to the list of its values, ``-bin`` values base64
    (the shape of the Connect protocol's end-of-stream metadata). Keys the gateway
    consumes (``grpc-*``, status details) are left out, as in :func:`metadata_headers`."""
    out: dict[str, list[str]] = {}
    for key, value in md or ():
        if key.startswith("grpc-") or key == _DETAILS_KEY:
            continue
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        out.setdefault(key, []).append(value)
    return out
