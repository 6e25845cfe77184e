"""The edge configuration: upstreams, service routing, auth, and BFF profiles.

It lives under ``edge:`` in ``gateway.yaml`` next to the transcoder's
``gateway:`` options and ``policy:``; one file can hold several profiles (web,
mobile, IoT), each on its own port or path prefix::

    gateway: {default_timeout: 10s}
    edge:
      upstreams:                      # named endpoint sets
        shop:   {targets: [127.0.0.1:50051], health_check: {interval: 2s}}
        shop-v2: [127.0.0.1:50052]
      services:                       # gRPC service -> upstream, or a canary split
        default: shop
        shop.v1.PaymentService: {canary: {stable: shop, canary: shop-v2, weight: 10,
                                          sticky: "header:x-user-id"}}
      auth:
        jwt: {issuer: https://id.example, audience: shop, leeway: 30s,
              keys: [{kid: k1, algorithm: RS256, file: keys/k1.pub.pem}]}
        api_keys: {header: x-api-key, keys: [{name: partner, sha256: "<hex>",
                                               rate_limit: {rate: 5, per: 1s}}]}
        forward_authorization: false
      cache: {max_bytes: 67108864}
      admin: {token_sha256: "<hex>"}  # POST /admin/reload with Authorization: Bearer <token>
      profiles:
        web:
          port: 8080
          cors: {allow_origins: ["https://shop.example"]}
          routes:
            - match: {rpc: "shop.v1.*"}
              auth: {require: jwt}
            - match: {rpc: shop.v1.OrderService.GetOrder}
              cache: {ttl: 10s}
              rate_limit: {rate: 50, per: 1s, key: subject}
        mobile:
          prefix: /mobile
          routes:
            - match: {rpc: "shop.v1.OrderService.*"}
              shaping: {fields: [orderId, status, total]}
          bff:
            - name: order_summary
              path: /v1/orders/{order_id}/summary
              calls:
                order: {rpc: shop.v1.OrderService.GetOrder, request: {orderId: "{path.order_id}"}}
                shipment: {rpc: shop.v1.ShippingService.GetShipment,
                           request: {orderId: "{order.orderId}"}, optional: true, timeout: 500ms}
              fields: [order.orderId, order.status, shipment.status]

For every route, each feature (auth, rate_limit, cache, shaping) comes from the
last matching rule that sets it. Everything is validated at load; a ConfigError
names the key path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshkit._sections import (
    Selector,
    get_bool,
    get_int,
    get_list,
    get_size,
    get_str,
    section,
)
from meshkit.auth import AuthConfig
from meshkit.config import Policy, carry_policy, compile_policy
from meshkit.errors import ConfigError
from meshkit.gateway.core.config import (
    Document,
    GatewayOptions,
    config_source,
    read_document,
)
from meshkit.gateway.edge.auth import AuthPolicy
from meshkit.gateway.edge.bff import CompositeSpec
from meshkit.gateway.edge.cache import CacheRule
from meshkit.gateway.edge.cors import CorsConfig
from meshkit.gateway.edge.ratelimit import RateLimitRule
from meshkit.gateway.edge.shaping import ShapingRule
from meshkit.gateway.upstream.balancing import UpstreamSpec
from meshkit.gateway.upstream.canary import CanarySpec


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Which routes (``match``) get which features; None leaves a feature to other rules."""

    match: Selector
    auth: AuthPolicy | None = None
    rate_limit: RateLimitRule | None = None
    cache: CacheRule | None = None
    shaping: ShapingRule | None = None

    @classmethod
    def from_mapping(cls, raw: object, path: str) -> RouteRule:
        """From ``{match: {...}, auth: {...}, rate_limit: {...}, cache: {...}, shaping: {...}}``."""
        m = section(raw, path, ("match", "auth", "rate_limit", "cache", "shaping"))
        return cls(
            Selector.from_mapping(m.get("match"), f"{path}.match"),
            AuthPolicy.from_mapping(m["auth"], f"{path}.auth")
            if m.get("auth") is not None
            else None,
            RateLimitRule.from_mapping(m["rate_limit"], f"{path}.rate_limit")
            if m.get("rate_limit") is not None
            else None,
            CacheRule.from_mapping(m["cache"], f"{path}.cache")
            if m.get("cache") is not None
            else None,
            ShapingRule.from_mapping(m["shaping"], f"{path}.shaping")
            if m.get("shaping") is not None
            else None,
        )


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """The features one route ends up with."""

    auth: AuthPolicy | None = None
    rate_limit: RateLimitRule | None = None
    cache: CacheRule | None = None
    shaping: ShapingRule | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    """One kind of client's gateway: where it listens, its rules, CORS, BFF routes."""

    name: str
    prefix: str = ""
    port: int | None = None
    routes: tuple[RouteRule, ...] = ()
    cors: CorsConfig | None = None
    bff: tuple[CompositeSpec, ...] = ()
    shaping: ShapingRule | None = None

    def policy_for(self, rpc: str, http_method: str, template: str) -> RoutePolicy:
        """Merge the matching rules (the last rule setting a feature wins)."""
        auth = rl = cache = shaping = None
        for r in self.routes:
            if not r.match.matches(rpc, http_method, template):
                continue
            auth = r.auth or auth
            rl = r.rate_limit or rl
            cache = r.cache or cache
            shaping = r.shaping or shaping
        return RoutePolicy(auth, rl, cache, shaping)

    @classmethod
    def from_mapping(cls, name: str, raw: object, path: str) -> Profile:
        """Validate one ``profiles.<name>`` section."""
        m = section(raw, path, ("prefix", "port", "routes", "cors", "bff", "shaping"))
        prefix = get_str(m, "prefix", path, "").rstrip("/")
        if prefix and not prefix.startswith("/"):
            raise ConfigError(
                f"{path}.prefix", f"expected a path starting with '/', got {prefix!r}"
            )
        port = get_int(m, "port", path, None)
        if port is not None and not 0 <= port < 65536:
            raise ConfigError(f"{path}.port", f"expected 0..65535, got {port}")
        routes = tuple(
            RouteRule.from_mapping(r, f"{path}.routes[{i}]")
            for i, r in enumerate(get_list(m, "routes", path))
        )
        bff = tuple(
            CompositeSpec.from_mapping(b, f"{path}.bff[{i}]")
            for i, b in enumerate(get_list(m, "bff", path))
        )
        names = [b.name for b in bff]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}.bff", "composite names must be unique")
        return cls(
            name,
            prefix,
            port,
            routes,
            CorsConfig.from_mapping(m["cors"], f"{path}.cors")
            if m.get("cors") is not None
            else None,
            bff,
            ShapingRule.from_mapping(m["shaping"], f"{path}.shaping")
            if m.get("shaping") is not None
            else None,
        )


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    """A service's upstream: one name, or a canary split."""

    upstream: str | None = None
    canary: CanarySpec | None = None


@dataclass(frozen=True)
class EdgeConfig:
    """The whole validated ``edge:`` section plus the transcoder's options and policy."""

    upstreams: Mapping[str, UpstreamSpec] = field(default_factory=dict)
    services: Mapping[str, ServiceRoute] = field(default_factory=dict)
    auth: AuthConfig = field(default_factory=AuthConfig)
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    cache_max_bytes: int = 64 * 1024 * 1024
    admin_token_sha256: bytes | None = None
    options: GatewayOptions = field(default_factory=GatewayOptions)
    #: The ``policy:`` section, compiled once at load and shared by every upstream
    #: without a ``policy`` of its own (so they share its breakers).
    policy: Policy | None = None
    metrics: bool = True
    access_log: bool = True
    source: str | None = None

    def openapi_options(self, profile: Profile | None = None) -> dict[str, Any]:
        """Keyword arguments for :func:`~meshkit.gateway.openapi.generate_openapi` that
        this config decides: JSON naming, fallback routes, the auth schemes in use and,
        for a ``profile``, its path prefix."""
        auth = self.auth
        out: dict[str, Any] = {
            "proto_names": self.options.proto_names,
            "fallback_routes": self.options.fallback_routes,
            "security": [
                s
                for s, on in (("bearer", auth.jwt is not None), ("api_key", bool(auth.api_keys)))
                if on
            ],
            "api_key_header": auth.api_key_header,
        }
        if profile is not None:
            out["path_prefix"] = profile.prefix
        return out

    @classmethod
    def from_mapping(
        cls,
        raw: Any,
        *,
        base_dir: Path | None = None,
        source: str | None = None,
        marks: Mapping[str, tuple[int, int]] | None = None,
    ) -> EdgeConfig:
        """Validate a whole document (``gateway:``, ``upstreams:``, ``policy:``, ``edge:``).
        With ``source`` (and ``marks``, from :func:`~meshkit.gateway.core.config.read_document`)
        errors name ``file:line:col``."""
        with config_source(source, marks):
            return cls._from_mapping(raw, base_dir, source)

    def carry_policies(self, old: EdgeConfig) -> EdgeConfig:
        """This config after a reload from ``old`` (:func:`carry_policy`, per policy):
        ``old``'s Policy objects wherever the document is unchanged, else the new
        ones over the registry each upstream used before, so breakers, budgets and
        limiters whose config did not change keep their state."""

        def before(name: str) -> Policy | None:
            # The policy the upstream used: its own, or the document's shared one.
            spec = old.upstreams.get(name)
            if spec is None:
                return None
            return spec.policy if spec.policy is not None else old.policy

        ups = {
            n: dataclasses.replace(u, policy=carry_policy(before(n), u.policy))
            for n, u in self.upstreams.items()
        }
        return dataclasses.replace(
            self, upstreams=ups, policy=carry_policy(old.policy, self.policy)
        )

    @classmethod
    def _from_mapping(cls, raw: Any, base_dir: Path | None, source: str | None) -> EdgeConfig:
        top = section(raw, "", ("gateway", "upstreams", "policy", "edge"))
        options = GatewayOptions.from_mapping(top.get("gateway") or {})
        policy = compile_policy(top.get("policy"), source=source)
        e = section(
            top.get("edge"),
            "edge",
            (
                "upstreams",
                "services",
                "auth",
                "profiles",
                "cache",
                "admin",
                "metrics",
                "access_log",
            ),
        )
        ups: dict[str, UpstreamSpec] = {}
        services: dict[str, ServiceRoute] = {}
        raw_ups = e.get("upstreams")
        if raw_ups is not None:
            if not isinstance(raw_ups, Mapping):
                raise ConfigError("edge.upstreams", "expected a mapping of name to endpoints")
            for name, spec in raw_ups.items():
                ups[str(name)] = UpstreamSpec.from_mapping(
                    str(name), spec, f"edge.upstreams.{name}"
                )
        simple = top.get("upstreams") or {}
        if not isinstance(simple, Mapping):
            raise ConfigError(
                "upstreams", "expected a mapping of service (or 'default') to HOST:PORT"
            )
        for svc, target in simple.items():
            # The transcoder's plain form: service -> HOST:PORT[,HOST:PORT].
            if not isinstance(target, str):
                raise ConfigError(f"upstreams.{svc}", f"expected HOST:PORT, got {target!r}")
            name = f"{svc}"
            if name in ups:
                raise ConfigError(f"upstreams.{svc}", "also defined under edge.upstreams")
            ups[name] = UpstreamSpec.from_mapping(name, target, f"upstreams.{svc}")
            services.setdefault(str(svc), ServiceRoute(upstream=name))
        raw_svcs = e.get("services") or {}
        if not isinstance(raw_svcs, Mapping):
            raise ConfigError(
                "edge.services", "expected a mapping of service (or 'default') to an upstream"
            )
        for svc, route in raw_svcs.items():
            sp = f"edge.services.{svc}"
            if isinstance(route, str):
                if route not in ups:
                    raise ConfigError(sp, f"names unknown upstream {route!r}")
                services[str(svc)] = ServiceRoute(upstream=route)
            else:
                r = section(route, sp, ("upstream", "canary"))
                if ("upstream" in r) == ("canary" in r):
                    raise ConfigError(sp, "expected exactly one of upstream, canary")
                if "upstream" in r:
                    up = get_str(r, "upstream", sp)
                    if up not in ups:
                        raise ConfigError(f"{sp}.upstream", f"names unknown upstream {up!r}")
                    services[str(svc)] = ServiceRoute(upstream=up)
                else:
                    c = CanarySpec.from_mapping(r["canary"], f"{sp}.canary")
                    for side, up in (("stable", c.stable), ("canary", c.canary)):
                        if up not in ups:
                            raise ConfigError(
                                f"{sp}.canary.{side}", f"names unknown upstream {up!r}"
                            )
                    services[str(svc)] = ServiceRoute(canary=c)
        if len(ups) == 1 and "default" not in services:
            services["default"] = ServiceRoute(upstream=next(iter(ups)))
        auth = AuthConfig.from_mapping(e.get("auth"), "edge.auth", base_dir)
        raw_profiles = e.get("profiles") or {"default": {}}
        if not isinstance(raw_profiles, Mapping):
            raise ConfigError("edge.profiles", "expected a mapping of profile name to profile")
        profiles = {
            str(n): Profile.from_mapping(str(n), p, f"edge.profiles.{n}")
            for n, p in raw_profiles.items()
        }
        seen_prefix: dict[tuple[int | None, str], str] = {}
        for p in profiles.values():
            k = (p.port, p.prefix)
            if k in seen_prefix:
                raise ConfigError(
                    f"edge.profiles.{p.name}", f"same port and prefix as profile {seen_prefix[k]!r}"
                )
            seen_prefix[k] = p.name
        cache = section(e.get("cache"), "edge.cache", ("max_bytes",))
        admin = section(e.get("admin"), "edge.admin", ("token_sha256",))
        token: bytes | None = None
        if admin.get("token_sha256") is not None:
            try:
                token = bytes.fromhex(get_str(admin, "token_sha256", "edge.admin"))
            except ValueError:
                token = b""
            if len(token) != 32:
                raise ConfigError("edge.admin.token_sha256", "expected 64 hex digits")
        metrics = get_bool(e, "metrics", "edge", True)
        access = get_bool(e, "access_log", "edge", True)
        return cls(
            ups,
            services,
            auth,
            profiles,
            get_size(cache, "max_bytes", "edge.cache", 64 * 1024 * 1024, 1),
            token,
            options,
            policy,
            metrics,
            access,
            source,
        )


def load_edge_config(path: str | Path | Document) -> EdgeConfig:
    """Read and validate ``gateway.yaml`` (key files resolve relative to it); errors name
    ``file:line:col``, the key path, the value and what was expected."""
    doc = path if isinstance(path, Document) else read_document(path)
    return EdgeConfig.from_mapping(
        doc.data, base_dir=Path(doc.source).parent, source=doc.source, marks=doc.marks
    )
