"""Validation helpers for the edge sections of ``gateway.yaml``.

Every reader takes the key path, so a ConfigError names the exact key
(``profiles.mobile.routes[2].cache.ttl``), the bad value and what was expected.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshkit.errors import ConfigError
from meshkit.gateway.config import parse_duration

_MISSING: Any = object()


def section(raw: Any, path: str, known: Sequence[str]) -> Mapping[str, Any]:
    """``raw`` as a mapping with only ``known`` keys (None is an empty mapping)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{path}.{key}" if path else str(key),
                f"unknown key; expected one of {', '.join(sorted(known))}",
            )
    return raw


def get_str(raw: Mapping[str, Any], key: str, path: str, default: Any = _MISSING) -> Any:
    """A string value (required unless ``default`` is given)."""
    if key not in raw:
        if default is _MISSING:
            raise ConfigError(f"{path}.{key}", "required")
        return default
    v = raw[key]
    if not isinstance(v, str):
        raise ConfigError(f"{path}.{key}", f"expected a string, got {v!r}")
    return v


def get_bool(raw: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    """A boolean value."""
    v = raw.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{path}.{key}", f"expected true or false, got {v!r}")
    return v


def _get_number(
    raw: Mapping[str, Any], key: str, path: str, default: Any, minimum: float, integer: bool
) -> Any:
    if key not in raw:
        if default is _MISSING:
            raise ConfigError(f"{path}.{key}", "required")
        return default
    v = raw[key]
    kind = int if integer else int | float
    if not isinstance(v, kind) or isinstance(v, bool) or v < minimum:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{path}.{key}", f"expected {what} >= {minimum}, got {v!r}")
    return v if integer else float(v)


def get_int(
    raw: Mapping[str, Any], key: str, path: str, default: Any = _MISSING, minimum: int = 0
) -> Any:
    """An integer value >= ``minimum``."""
    return _get_number(raw, key, path, default, minimum, integer=True)


def get_number(
    raw: Mapping[str, Any], key: str, path: str, default: Any = _MISSING, minimum: float = 0.0
) -> Any:
    """A number >= ``minimum``."""
    return _get_number(raw, key, path, default, minimum, integer=False)


def get_duration(
    raw: Mapping[str, Any], key: str, path: str, default: Any = _MISSING, *, positive: bool = True
) -> Any:
    """A duration (``"30s"``, ``"250ms"`` or seconds); zero only when not ``positive``."""
    if key not in raw:
        if default is _MISSING:
            raise ConfigError(f"{path}.{key}", "required")
        return default
    return parse_duration(raw[key], f"{path}.{key}", positive=positive)


def get_str_list(raw: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    """A list of strings (a single string is a one-item list)."""
    v = raw.get(key)
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{path}.{key}", f"expected a list of strings, got {v!r}")
    return tuple(v)


def get_list(raw: Mapping[str, Any], key: str, path: str) -> list[Any]:
    """A list (absent is empty)."""
    v = raw.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise ConfigError(f"{path}.{key}", f"expected a list, got {type(v).__name__}")
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
