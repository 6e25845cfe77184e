"""Response shaping per profile or route: field masks, renamed fields, header edits.

Shaping works on the JSON the transcoder produced (so names are the profile's
output names, lowerCamel by default). A field mask keeps only the listed dotted
paths (through lists: ``items.sku`` keeps ``sku`` of every item); renames move
a dotted path to a new key at the same level. Streaming responses and error
bodies pass through untouched (errors keep the ``google.rpc.Status`` shape).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshkit._sections import get_str_list, section
from meshkit.errors import ConfigError
from meshkit.gateway._asgi import ASGIApp, Message, Receive, Scope, Send, is_streaming_type
from meshkit.gateway.edge._responses import BufferedResponse


def _tree(paths: tuple[str, ...]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for p in paths:
        node = root
        parts = p.split(".")
        for i, part in enumerate(parts):
            if i == len(parts) - 1:
                node[part] = True
            else:
                child = node.get(part)
                if child is True:
                    break  # a shorter path already keeps the whole subtree
                node = node.setdefault(part, {})
    return root


def apply_mask(obj: Any, tree: Mapping[str, Any]) -> Any:
    """Keep only the masked paths of ``obj`` (lists are masked element-wise)."""
    if isinstance(obj, list):
        return [apply_mask(x, tree) for x in obj]
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = {}
    for key, sub in tree.items():
        if key in obj:
            out[key] = obj[key] if sub is True else apply_mask(obj[key], sub)
    return out


def apply_renames(obj: Any, renames: Mapping[str, str]) -> Any:
    """Rename dotted paths (``shipment.eta`` -> ``arrival``: the key at that level)."""
    for src, dst in renames.items():
        _rename(obj, src.split("."), dst)
    return obj


def _rename(obj: Any, parts: list[str], dst: str) -> None:
    if isinstance(obj, list):
        for x in obj:
            _rename(x, parts, dst)
        return
    if not isinstance(obj, dict):
        return
    if len(parts) == 1:
        if parts[0] in obj:
            obj[dst] = obj.pop(parts[0])
        return
    if parts[0] in obj:
        _rename(obj[parts[0]], parts[1:], dst)


@dataclass(frozen=True, slots=True)
class ShapingRule:
    """A field mask (empty keeps all), renames, and headers to add or remove."""

    fields: tuple[str, ...] = ()
    rename: Mapping[str, str] = field(default_factory=dict)
    add_headers: Mapping[str, str] = field(default_factory=dict)
    remove_headers: tuple[str, ...] = ()

    @property
    def touches_body(self) -> bool:
        """Whether the body must be rewritten (else only headers change)."""
        return bool(self.fields or self.rename)

    def shape(self, obj: Any) -> Any:
        """Apply the mask, then the renames."""
        if self.fields:
            obj = apply_mask(obj, _tree(self.fields))
        if self.rename:
            obj = apply_renames(obj, self.rename)
        return obj

    @classmethod
    def from_mapping(cls, raw: object, path: str) -> ShapingRule:
        """From ``{fields: [orderId, total], rename: {a.b: c}, add_headers: {..}, remove_headers: [..]}``."""
        m = section(raw, path, ("fields", "rename", "add_headers", "remove_headers"))
        maps: dict[str, dict[str, str]] = {}
        for key in ("rename", "add_headers"):
            v = m.get(key) or {}
            if not isinstance(v, Mapping) or not all(
                isinstance(a, str) and isinstance(b, str) for a, b in v.items()
            ):
                raise ConfigError(f"{path}.{key}", "expected a mapping of strings to strings")
            maps[key] = dict(v)
        for dst in maps["rename"].values():
            if "." in dst:
                raise ConfigError(f"{path}.rename", f"a new name is one key, not a path: {dst!r}")
        return cls(
            fields=get_str_list(m, "fields", path),
            rename=maps["rename"],
            add_headers={k.lower(): v for k, v in maps["add_headers"].items()},
            remove_headers=tuple(h.lower() for h in get_str_list(m, "remove_headers", path)),
        )


class ShapingMiddleware:
    """ASGI middleware applying one :class:`ShapingRule` to JSON 2xx responses."""

    def __init__(self, app: ASGIApp, rule: ShapingRule) -> None:
        self.app = app
        self.rule = rule
        self._add = [(k.encode(), v.encode()) for k, v in rule.add_headers.items()]
        self._remove = {h.encode() for h in rule.remove_headers} | set(k for k, _ in self._add)

    def _headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in headers if k.lower() not in self._remove] + self._add

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.rule.touches_body:

            async def send_headers(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = dict(message)
                    message["headers"] = self._headers(
                        [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
                    )
                await send(message)

            await self.app(scope, receive, send_headers)
            return
        buf = BufferedResponse(stream_to=send, stream_headers=self._headers)
        await self.app(scope, receive, buf)
        if not buf.started or buf.passed:
            return
        ctype = buf.header(b"content-type") or b""
        headers = self._headers(buf.headers)
        if (
            is_streaming_type(ctype)
            or not buf.complete
            or not 200 <= buf.status < 300
            or not ctype.startswith(b"application/json")
        ):
            await buf.replay(send, headers=headers)
            return
        try:
            obj = json.loads(buf.body)
        except ValueError:
            await buf.replay(send, headers=headers)
            return
        body = json.dumps(self.rule.shape(obj), ensure_ascii=False, separators=(",", ":")).encode()
        await buf.replay(send, body=body, headers=headers)
