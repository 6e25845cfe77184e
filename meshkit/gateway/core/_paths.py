"""Request paths below an ASGI mount point (``root_path``), for every layer that routes."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote

Scope = MutableMapping[str, Any]


def path_below(encoded: str, decoded: str, prefix: str) -> str | None:
    """``encoded`` (a raw path) past ``prefix`` when ``decoded`` (the same path, decoded)
    lies under it; None otherwise. The prefix is compared decoded, as hosts give
    ``root_path``, and the same number of segments is dropped from the raw path."""
    prefix = prefix.rstrip("/")
    if not prefix or not (decoded == prefix or decoded.startswith(prefix + "/")):
        return None
    depth = prefix.count("/")
    parts = encoded.split("/", depth + 1)
    return "/" + parts[depth + 1] if len(parts) > depth + 1 else "/"


def route_path(scope: Scope) -> str:
    """The request path below the app's mount point, still percent-encoded.

    Hosts that mount an ASGI app (Starlette's ``Mount``, ``uvicorn --root-path``) leave the
    full path in ``raw_path`` and name the mount in ``root_path``; routing starts below it.
    """
    raw = scope.get("raw_path")
    path: str = scope.get("path", "")
    encoded = raw.decode("latin-1") if raw else path
    root: str = scope.get("root_path") or ""
    if not root:
        return encoded
    below = path_below(encoded, unquote(encoded) if raw else path, root)
    return encoded if below is None else below


def unmounted(scope: Scope) -> Scope:
    """``scope`` as if the app were served at ``/``: ``path`` and ``raw_path`` below the
    mount point, ``root_path`` empty (the scope itself when there is no mount point)."""
    root = scope.get("root_path")
    if not root or scope.get("type") not in ("http", "websocket"):
        return scope
    inner = dict(scope)
    below = route_path(scope)
    if scope.get("raw_path"):
        inner["raw_path"] = below.encode("latin-1")
        inner["path"] = unquote(below)
    else:
        inner["path"] = below
    inner["root_path"] = ""
    return inner
