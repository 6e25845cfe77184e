"""Bad input for the gateway, shared by the in-process (httpx ASGITransport) tests and the
ones over a real socket: each request must be answered 4xx with google.rpc.Status JSON."""

from __future__ import annotations

import random
from typing import Any

#: (method, url, httpx request keywords) against the gwtest gateway; every one is a 4xx
#: except the long header, which is valid and simply not forwarded (LONG_HEADER_URL).
BAD_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/echo", {"content": b'{"name": '}),
    ("POST", "/v1/echo", {"content": b'{"name": "x"'}),
    ("POST", "/v1/echo", {"content": b"\xff\xfe\xfd"}),
    ("POST", "/v1/echo", {"content": b'{"name": "\xff"}'}),
    ("POST", "/v1/echo", {"content": b'{"i32": "NaN"}'}),
    ("POST", "/v1/echo", {"content": b'{"i32": 99999999999}'}),
    ("POST", "/v1/echo", {"content": b'{"inner": {"count": {}}}'}),
    ("POST", "/v1/echo", {"content": b'{"meta": ' + b"[" * 5000 + b"]" * 5000 + b"}"}),
    ("POST", "/v1/echo", {"content": b"[" * 60_000}),
    ("POST", "/v1/echo", {"content": b"null"}),
    ("POST", "/v1/echo", {"content": b'"string"'}),
    ("GET", "/v1/echo/%E0%A4%A", {}),
    ("GET", "/v1/echo/%C0%AF", {}),
    ("GET", "/v1/query?i32=1e3", {}),
    ("GET", "/v1/query?flag=2", {}),
    ("GET", "/v1/headers", {"headers": {"grpc-metadata-bad@key": "v"}}),
    ("GET", "/v1/headers", {"headers": {"grpc-metadata-x": "v\x7f"}}),
    ("GET", "/v1/headers", {"headers": {"grpc-timeout": "99999999999S"}}),
    ("GET", "/v1/headers", {"headers": {"grpc-metadata-blob-bin": "!!!"}}),
    ("GET", "/v1/headers", {"headers": {"grpc-metadata-blob-bin": "AAE=C"}}),
    ("POST", "/v1/echo", {"content": b'{"name": "\\ud800"}'}),
    ("POST", "/v1/echo", {"content": b'{"inner": {"tags": ["ok", "\\udfff"]}}'}),
    ("POST", "/v1/echo", {"content": b'{"inner": "x"}'}),
    ("POST", "/v1/echo", {"content": b'{"inner": 5}'}),
    ("POST", "/v1/echo", {"content": b'{"color": "COLOR_PURPLE"}'}),
    ("POST", "/v1/echo", {"content": b'{"colors": ["COLOR_RED", "COLOR_PURPLE"]}'}),
    ("POST", "/v1/echo", {"content": b'{"tags": "x"}'}),
    ("GET", "/v1/headers", {"headers": {"x-long": "a" * 64_000}}),
]


def is_long_header(kw: dict[str, Any]) -> bool:
    """The one BAD_REQUESTS entry that is valid: a long header the gateway does not forward."""
    return "x-long" in kw.get("headers", {})


def garbage_bodies(seed: int = 7, n: int = 200) -> list[bytes]:
    """``n`` random byte strings of 1-63 bytes, the same for a given seed."""
    rnd = random.Random(seed)
    return [bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 64))) for _ in range(n)]
