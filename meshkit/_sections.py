"""Validation helpers for config sections (the edge sections of ``gateway.yaml``, ``auth:``).

Every reader takes the key path, so a ConfigError names the exact key
(``profiles.mobile.routes[2].cache.ttl``), the bad value and what was expected.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshkit.config import parse_duration as _parse_duration
from meshkit.config import (
    parse_size,
    read_bool,
    read_int,
    read_mapping,
    read_number,
    show_value,
)
from meshkit.errors import ConfigError

_MISSING: Any = object()


def parse_duration(value: Any, path: str, *, positive: bool = True) -> float:
    """Seconds from ``"250ms"``, ``"30s"``, ``"1m30s"`` or a number, parsed by
    :func:`meshkit.config.parse_duration` (one duration grammar for every config);
    ``positive`` also refuses zero, which a timeout or TTL never means."""
    seconds = _parse_duration(value, path)
    if positive and seconds <= 0:
        shown = json.dumps(value) if isinstance(value, str | int | float) else repr(value)
        raise ConfigError(path, f"expected a duration > 0, got {shown}")
    return seconds


def section(raw: Any, path: str, known: Sequence[str]) -> Mapping[str, Any]:
    """``raw`` as a mapping with only ``known`` keys (None is an empty mapping). A
    misspelt key is reported at the key with a did-you-mean, as in policy documents."""
    if raw is None:
        return {}
    return read_mapping(raw, path, known)


def _required(raw: Mapping[str, Any], key: str, path: str, default: Any) -> Any:
    """``raw[key]``, or ``default``; a ConfigError when absent without a default."""
    if key in raw:
        return raw[key]
    if default is _MISSING:
        raise ConfigError(f"{path}.{key}", "missing required key")
    return _MISSING


def get_str(raw: Mapping[str, Any], key: str, path: str, default: Any = _MISSING) -> Any:
    """A string value (required unless ``default`` is given)."""
    v = _required(raw, key, path, default)
    if v is _MISSING:
        return default
    if not isinstance(v, str):
        raise ConfigError(f"{path}.{key}", f"expected a string, got {show_value(v)}")
    return v


def get_bool(raw: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    """A boolean value (``true``/``false`` only: YAML 1.1's yes/no/on/off are strings)."""
    return read_bool(raw[key], f"{path}.{key}") if key in raw else default


def get_int(
    raw: Mapping[str, Any], key: str, path: str, default: Any = _MISSING, minimum: int = 0
) -> Any:
    """An integer value >= ``minimum``."""
    v = _required(raw, key, path, default)
    return default if v is _MISSING else read_int(v, f"{path}.{key}", lo=minimum)


def get_number(
    raw: Mapping[str, Any], key: str, path: str, default: Any = _MISSING, minimum: float = 0.0
) -> Any:
    """A number >= ``minimum``."""
    v = _required(raw, key, path, default)
    return default if v is _MISSING else read_number(v, f"{path}.{key}", lo=minimum)


def get_size(
    raw: Mapping[str, Any], key: str, path: str, default: Any = _MISSING, minimum: int = 0
) -> Any:
    """A size in bytes: an integer or ``"512KiB"``, ``"4MiB"``, ``"1MB"`` (the policy
    document's grammar), at least ``minimum``."""
    v = _required(raw, key, path, default)
    if v is _MISSING:
        return default
    size = parse_size(v, f"{path}.{key}")
    if size < minimum:
        raise ConfigError(f"{path}.{key}", f"expected a size >= {minimum}, got {show_value(v)}")
    return size


def get_duration(
    raw: Mapping[str, Any], key: str, path: str, default: Any = _MISSING, *, positive: bool = True
) -> Any:
    """A duration (``"30s"``, ``"250ms"`` or seconds); zero only when not ``positive``."""
    v = _required(raw, key, path, default)
    return default if v is _MISSING else parse_duration(v, f"{path}.{key}", positive=positive)


def get_str_list(raw: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    """A list of strings (a single string is a one-item list)."""
    v = raw.get(key)
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{path}.{key}", f"expected a list of strings, got {show_value(v)}")
    return tuple(v)


def get_list(raw: Mapping[str, Any], key: str, path: str) -> list[Any]:
    """A list (absent is empty)."""
    v = raw.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise ConfigError(f"{path}.{key}", f"expected a list, got {show_value(v)}")
    return v


_HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


@dataclass(frozen=True, slots=True)
class Selector:
    """Which routes a rule applies to: globs on the RPC name (``shop.v1.OrderService.*``)
    and on the path template (``/v1/orders/**``), and HTTP methods. Empty matches all."""

    rpc: str = "*"
    path: str = "*"
    methods: tuple[str, ...] = ()

    def matches(self, rpc: str, http_method: str, template: str) -> bool:
        """Whether a route (its RPC full name, HTTP method and path template) matches."""
        if self.methods and http_method not in self.methods:
            return False
        return fnmatch.fnmatchcase(rpc, self.rpc) and fnmatch.fnmatchcase(template, self.path)

    @classmethod
    def from_mapping(cls, raw: Any, path: str) -> Selector:
        """From ``{rpc: GLOB, path: GLOB, methods: [GET]}``."""
        m = section(raw, path, ("rpc", "path", "methods"))
        methods = tuple(x.upper() for x in get_str_list(m, "methods", path))
        for x in methods:
            if x not in _HTTP_METHODS:
                raise ConfigError(f"{path}.methods", f"unknown HTTP method {x!r}")
        return cls(
            rpc=get_str(m, "rpc", path, "*"), path=get_str(m, "path", path, "*"), methods=methods
        )
