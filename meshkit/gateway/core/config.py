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

from meshkit._sections import parse_duration
from meshkit.config import (
    Policy,
    carry_policy,
    compile_policy,
    located,
    parse_size,
    read_bool,
    read_int,
    read_mapping,
)
from meshkit.config import read_yaml as _read_yaml_text
from meshkit.errors import ConfigError


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
            raise ConfigError(
                "gateway.max_body_bytes", f"expected a size > 0, got {self.max_body_bytes}"
            )
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
        """Validate a ``gateway:`` section with the policy document's readers: errors
        name the key, the value and what was expected; a misspelt key gets a
        did-you-mean; ``max_body_bytes`` takes sizes such as ``4MiB``."""
        known = [f.name for f in fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, value in read_mapping(raw, path, known).items():
            where = f"{path}.{key}"
            if key in ("emit_unpopulated", "proto_names", "strict", "generate_request_id"):
                kwargs[key] = read_bool(value, where)
            elif key == "max_body_bytes":
                kwargs[key] = parse_size(value, where)
            elif key == "max_json_depth":
                kwargs[key] = read_int(value, where, lo=1, hi=10_000)
            elif key in ("default_timeout", "max_timeout"):
                kwargs[key] = parse_duration(value, where)
            elif key == "route_timeouts":
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        where,
                        "expected a mapping of method name to duration, "
                        f"got {json.dumps(value, default=repr)}",
                    )
                kwargs[key] = {str(k): parse_duration(v, f"{where}.{k}") for k, v in value.items()}
            else:
                if not isinstance(value, str):
                    raise ConfigError(where, f"expected a string, got {json.dumps(value)}")
                kwargs[key] = value
        return cls(**kwargs)

    def with_(self, **changes: Any) -> GatewayOptions:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """A whole ``gateway.yaml``: options, upstream targets and the client policy."""

    options: GatewayOptions = field(default_factory=GatewayOptions)
    #: Service (or ``default``) -> ``HOST:PORT[,HOST:PORT...]``, balanced round-robin.
    upstreams: Mapping[str, str] = field(default_factory=dict)
    #: The ``policy:`` section, compiled once at load: every upstream channel, on
    #: every event loop, shares it (and so its registry of breakers, budgets and
    #: limiters, which a reload hands on: :func:`carry_policy`).
    policy: Policy | None = None
    #: The ``edge:`` section, validated by :mod:`meshkit.gateway.edge.edge` when present.
    edge: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Document:
    """A parsed configuration file: its data, where each key path sits in it (line,
    column) and the file name, so any error about it can name ``file:line:col``."""

    data: Any
    marks: Mapping[str, tuple[int, int]]
    source: str

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """ConfigErrors raised in the block name this file and the line and column of
        the key they are about."""
        with config_source(self.source, self.marks):
            yield


def read_document(path: str | Path) -> Document:
    """Read a YAML configuration file with the policy documents' loader (duplicate
    keys are errors; ``on``/``off``/``yes``/``no`` stay strings). Empty is ``{}``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot load: {exc}", source=str(p)) from exc
    data, marks = _read_yaml_text(text, str(p))
    return Document({} if data is None else data, marks, str(p))


def read_yaml(path: Path) -> Any:
    """A YAML file's document (empty is ``{}``), read as :func:`read_document` does."""
    return read_document(path).data


@contextlib.contextmanager
def config_source(
    source: str | None, marks: Mapping[str, tuple[int, int]] | None = None
) -> Iterator[None]:
    """ConfigErrors raised in the block also name ``source`` (the file), once, with the
    line and column of the key path when ``marks`` (from :func:`read_document`) has it."""
    try:
        yield
    except ConfigError as exc:
        if not source or exc.source is not None:
            raise
        raise located(exc, source, marks or {}) from exc


def config_from_document(doc: Document, *, previous: GatewayConfig | None = None) -> GatewayConfig:
    """Validate a parsed ``gateway.yaml`` (without its ``edge:`` section, which
    :mod:`meshkit.gateway.edge.profiles` validates). ``previous`` (on reload) lends its
    policy when the document's is unchanged, else its registry (:func:`carry_policy`)."""
    with doc.errors():
        raw = doc.data
        if not isinstance(raw, Mapping):
            raise ConfigError(
                "", f"expected a mapping at the top level, got {json.dumps(raw, default=repr)}"
            )
        read_mapping(raw, "", ("gateway", "upstreams", "policy", "edge"))
        options = GatewayOptions.from_mapping(raw.get("gateway") or {})
        ups = read_upstreams(raw.get("upstreams"))
        edge = raw.get("edge")
        if edge is not None and not isinstance(edge, Mapping):
            raise ConfigError("edge", "expected a mapping")
        policy = compile_policy(raw.get("policy"), source=doc.source)
    if previous is not None:
        policy = carry_policy(previous.policy, policy)
    return GatewayConfig(options=options, upstreams=ups, policy=policy, edge=edge)


def read_upstreams(raw: Any, path: str = "upstreams") -> dict[str, str]:
    """The ``upstreams:`` section: service (or ``default``) -> ``HOST:PORT``, or several
    comma-separated targets, which the gateway balances round-robin."""
    from meshkit.gateway.upstream.upstreams import check_target

    if raw is None:
        return {}
    expected = "a mapping of service (or 'default') to HOST:PORT[,HOST:PORT...]"
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"expected {expected}, got {json.dumps(raw, default=repr)}")
    out: dict[str, str] = {}
    for svc, target in raw.items():
        where = f"{path}.{svc}"
        if not isinstance(svc, str):
            raise ConfigError(path, f"keys must be strings, got {json.dumps(svc, default=repr)}")
        if not isinstance(target, str) or not target.strip():
            raise ConfigError(
                where, f"expected HOST:PORT[,HOST:PORT...], got {json.dumps(target, default=repr)}"
            )
        targets = [t.strip() for t in target.split(",") if t.strip()]
        if not targets:
            raise ConfigError(where, f"expected HOST:PORT[,HOST:PORT...], got {json.dumps(target)}")
        for t in targets:
            check_target(t, where)
        out[svc] = target
    return out


def load_config(path: str | Path, *, previous: GatewayConfig | None = None) -> GatewayConfig:
    """Read and validate a gateway YAML file; errors name ``file:line:col`` and the key."""
    return config_from_document(read_document(path), previous=previous)
