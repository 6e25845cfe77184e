"""Gateway options: one frozen, validated value, loadable from ``gateway.yaml``.

Example ``gateway.yaml``::

    gateway:
      emit_unpopulated: false      # print fields that hold their default value
      proto_names: false           # snake_case names out instead of lowerCamel
      strict: false                # 400 on unknown JSON fields and query parameters
      fallback_routes: unannotated # POST /pkg.Service/Method: none | unannotated | all
      stream_format: ndjson        # server streaming: ndjson | json-array
      max_body_bytes: 4194304
      max_json_depth: 64
      default_timeout: 30s         # when neither Grpc-Timeout nor a route timeout is set
      max_timeout: 300s            # cap on any deadline a client asks for
      route_timeouts:
        shop.v1.OrderService.WatchOrders: 600s
    upstreams:
      shop.v1.OrderService: 127.0.0.1:50051
      default: 127.0.0.1:50052
    policy: {...}                  # meshkit's client policy for upstream calls
    edge: {...}                    # auth, limits, cache, canary, BFF (docs/edge.md)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from meshkit.config import parse_duration as _parse_duration
from meshkit.errors import ConfigError


def parse_duration(value: Any, path: str, *, positive: bool = True) -> float:
    """Seconds from ``"250ms"``, ``"30s"``, ``"1m30s"`` or a number, parsed by
    :func:`meshkit.config.parse_duration` (one duration grammar for every config);
    ``positive`` also refuses zero, which a timeout or TTL never means."""
    seconds = _parse_duration(value, path)
    if positive and seconds <= 0:
        shown = json.dumps(value) if isinstance(value, str | int | float) else repr(value)
        raise ConfigError(path, f"expected a duration > 0, got {shown}")
    return seconds


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    """How the gateway transcodes. Defaults follow grpc-gateway."""

    emit_unpopulated: bool = False
    proto_names: bool = False
    strict: bool = False
    fallback_routes: str = "unannotated"
    stream_format: str = "ndjson"
    max_body_bytes: int = 4 * 1024 * 1024
    max_json_depth: int = 64
    default_timeout: float | None = None
    max_timeout: float = 300.0
    route_timeouts: Mapping[str, float] = field(default_factory=dict)
    generate_request_id: bool = True

    def __post_init__(self) -> None:
        if self.fallback_routes not in ("none", "unannotated", "all"):
            raise ConfigError(
                "gateway.fallback_routes",
                f"expected one of none, unannotated, all; got {self.fallback_routes!r}",
            )
        if self.stream_format not in ("ndjson", "json-array"):
            raise ConfigError(
                "gateway.stream_format",
                f"expected ndjson or json-array; got {self.stream_format!r}",
            )
        if self.max_body_bytes <= 0:
            raise ConfigError("gateway.max_body_bytes", f"expected > 0, got {self.max_body_bytes}")
        if not 1 <= self.max_json_depth <= 10_000:
            raise ConfigError(
                "gateway.max_json_depth", f"expected 1..10000, got {self.max_json_depth}"
            )

    def timeout_for(self, method_full_name: str) -> float | None:
        """The default deadline (seconds) for a method, before the client's Grpc-Timeout."""
        t = self.route_timeouts.get(method_full_name, self.default_timeout)
        return min(t, self.max_timeout) if t is not None else None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], path: str = "gateway") -> GatewayOptions:
        """Validate a ``gateway:`` section; errors name the key."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            where = f"{path}.{key}"
            if key not in known:
                raise ConfigError(where, f"unknown key; expected one of {', '.join(sorted(known))}")
            if key in ("emit_unpopulated", "proto_names", "strict", "generate_request_id"):
                if not isinstance(value, bool):
                    raise ConfigError(where, f"expected true or false, got {value!r}")
                kwargs[key] = value
            elif key in ("max_body_bytes", "max_json_depth"):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConfigError(where, f"expected an integer, got {value!r}")
                kwargs[key] = value
            elif key in ("default_timeout", "max_timeout"):
                kwargs[key] = parse_duration(value, where)
            elif key == "route_timeouts":
                if not isinstance(value, Mapping):
                    raise ConfigError(where, "expected a mapping of method name to duration")
                kwargs[key] = {str(k): parse_duration(v, f"{where}.{k}") for k, v in value.items()}
            else:
                if not isinstance(value, str):
                    raise ConfigError(where, f"expected a string, got {value!r}")
                kwargs[key] = value
        return cls(**kwargs)

    def with_(self, **changes: Any) -> GatewayOptions:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """A whole ``gateway.yaml``: options, upstream targets and the client policy section."""

    options: GatewayOptions = field(default_factory=GatewayOptions)
    upstreams: Mapping[str, str] = field(default_factory=dict)
    policy: Mapping[str, Any] | None = None
    #: The ``edge:`` section, validated by :mod:`meshkit.gateway.edge` when present.
    edge: Mapping[str, Any] | None = None


def read_yaml(path: Path) -> Any:
    """A YAML file's document (empty is ``{}``); an unreadable file is a ConfigError."""
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("", f"cannot load: {exc}", source=str(path)) from exc


@contextlib.contextmanager
def config_source(source: str | None) -> Iterator[None]:
    """ConfigErrors raised in the block also name ``source`` (the file), once."""
    try:
        yield
    except ConfigError as exc:
        if not source or exc.source is not None:
            raise
        prefix = f"{exc.path}: "
        message = exc.message[len(prefix) :] if exc.message.startswith(prefix) else exc.message
        raise ConfigError(exc.path, message, source=source) from exc


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a gateway YAML file."""
    p = Path(path)
    raw = read_yaml(p)
    with config_source(str(p)):
        if not isinstance(raw, Mapping):
            raise ConfigError("", "expected a mapping at the top level")
        unknown = set(raw) - {"gateway", "upstreams", "policy", "edge"}
        if unknown:
            raise ConfigError(
                sorted(unknown)[0], "unknown key; expected gateway, upstreams, policy or edge"
            )
        options = GatewayOptions.from_mapping(raw.get("gateway") or {})
        ups = raw.get("upstreams") or {}
        if not isinstance(ups, Mapping) or not all(isinstance(v, str) for v in ups.values()):
            raise ConfigError(
                "upstreams", "expected a mapping of service (or 'default') to HOST:PORT"
            )
        policy = raw.get("policy")
        if policy is not None and not isinstance(policy, Mapping):
            raise ConfigError("policy", "expected a mapping")
        edge = raw.get("edge")
        if edge is not None and not isinstance(edge, Mapping):
            raise ConfigError("edge", "expected a mapping")
    return GatewayConfig(options=options, upstreams=dict(ups), policy=policy, edge=edge)
