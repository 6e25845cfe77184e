"""The edge: the transcoding gateway wrapped with auth, limits, cache, shaping, BFF and ops.

:func:`create_edge_app` builds, per profile, the gateway's own
:func:`~meshkit.gateway.core.app.create_app` with route middleware (auth -> rate
limit -> cache -> shaping, chosen per route from the profile's rules), puts the
profile's BFF composite routes in front of it, and wraps it with CORS,
``/healthz`` ``/readyz`` ``/metrics`` ``/openapi.json`` and telemetry. All
profiles share one upstream registry (balanced, health-checked, canary splits).

Reload (:meth:`EdgeApp.reload`, SIGHUP in the CLI, or ``POST /admin/reload``
with the admin token) rebuilds every profile from the new config and swaps it in
atomically; requests in flight finish on the old one. Upstreams are kept and
switched in place (:meth:`BalancedUpstream.set_targets`), which is the
blue-green switch: no request is dropped. Caches start empty after a reload; the
resilience state (breakers, budgets, limiters) lives in the policies' registry and
carries over (:meth:`EdgeConfig.carry_policies`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from meshkit.auth import Authenticator, bearer_token
from meshkit.errors import ConfigError
from meshkit.gateway._asgi import PRINCIPAL_KEY, ASGIApp, Receive, Scope, Send, header, notes
from meshkit.gateway.core._paths import path_below, unmounted
from meshkit.gateway.core.app import (
    DescriptorSource,
    GatewayApp,
    create_app,
    load_catalog,
    serve_lifespan,
)
from meshkit.gateway.core.descriptors import Catalog
from meshkit.gateway.core.errors import GatewayError
from meshkit.gateway.core.metadata import assign_request_id, send_with_request_id
from meshkit.gateway.core.types import Route
from meshkit.gateway.edge._responses import send_error, send_json
from meshkit.gateway.edge.auth import AuthMiddleware, AuthPolicy
from meshkit.gateway.edge.bff import BffApp, Composite
from meshkit.gateway.edge.cache import CacheMiddleware, ResponseCache
from meshkit.gateway.edge.cors import CorsMiddleware
from meshkit.gateway.edge.observability import (
    EdgeMetrics,
    OpsMiddleware,
    Redactor,
    TelemetryMiddleware,
)
from meshkit.gateway.edge.profiles import EdgeConfig, Profile, RoutePolicy, load_edge_config
from meshkit.gateway.edge.ratelimit import ApiKeyLimits, RateLimitMiddleware
from meshkit.gateway.edge.shaping import ShapingMiddleware
from meshkit.gateway.openapi import openapi_json
from meshkit.gateway.upstream.balancing import BalancedUpstream
from meshkit.gateway.upstream.canary import CanaryUpstream
from meshkit.gateway.upstream.upstreams import Upstream, UpstreamRegistry

log = logging.getLogger("meshkit.gateway.edge")


# --------------------------------------------------------------------------- upstreams


def build_registry(config: EdgeConfig) -> UpstreamRegistry:
    """Balanced upstreams and canary splits for ``config``."""
    ups: dict[str, Upstream] = {
        name: BalancedUpstream(
            name,
            spec.targets,
            policy=spec.policy if spec.policy is not None else config.policy,
            health_check=spec.health_check,
            drain=spec.drain,
        )
        for name, spec in config.upstreams.items()
    }
    routes: dict[str, str] = {}
    _route_services(config, ups, routes)
    return UpstreamRegistry(ups, routes)


def _route_services(config: EdgeConfig, ups: dict[str, Upstream], routes: dict[str, str]) -> None:
    for svc, r in config.services.items():
        if r.canary is not None:
            name = f"canary:{svc}"
            ups[name] = CanaryUpstream(name, ups[r.canary.stable], ups[r.canary.canary], r.canary)
            routes[svc] = name
        else:
            assert r.upstream is not None
            routes[svc] = r.upstream


async def update_registry(registry: UpstreamRegistry, config: EdgeConfig) -> None:
    """Apply ``config``'s upstreams to a live registry: existing names switch their
    endpoints in place (draining the old ones), new names are added, canary
    splits and service routes are replaced. Removed upstreams close after draining."""
    ups: dict[str, Upstream] = {}
    for name, spec in config.upstreams.items():
        cur = registry.upstreams.get(name)
        if isinstance(cur, BalancedUpstream):
            cur.health_check = spec.health_check
            cur.drain = spec.drain
            # carry_policies: the same Policy object when its document did not change
            # (a no-op here), else a new one over the same registry, so the new
            # channels find the breakers, budgets and limiters whose config is unchanged.
            cur.set_policy(spec.policy if spec.policy is not None else config.policy)
            await cur.set_targets(spec.targets)
            ups[name] = cur
        else:
            ups[name] = BalancedUpstream(
                name,
                spec.targets,
                policy=spec.policy if spec.policy is not None else config.policy,
                health_check=spec.health_check,
                drain=spec.drain,
            )
    routes: dict[str, str] = {}
    _route_services(config, ups, routes)
    removed = [
        u
        for n, u in registry.upstreams.items()
        if n not in ups and not isinstance(u, CanaryUpstream)
    ]
    # Plain dict swaps: readers see either the old or the new mapping, never a mix.
    registry.upstreams = ups
    registry.routes = routes
    for u in removed:
        drain = u.drain if isinstance(u, BalancedUpstream) else 5.0
        asyncio.get_running_loop().create_task(_close_later(u, drain))


async def _close_later(u: Upstream, delay: float) -> None:
    await asyncio.sleep(delay)
    await u.close(grace=delay)


def health_snapshot(registry: UpstreamRegistry) -> dict[str, bool]:
    """``upstream/endpoint`` -> serving, for metrics."""
    out: dict[str, bool] = {}
    for u in registry.upstreams.values():
        if isinstance(u, BalancedUpstream):
            for t in u.targets:
                out[f"{u.name}/{t}"] = u.healthy.get(t, True)
    return out


# --------------------------------------------------------------------------- one profile


class ProfileRuntime:
    """A profile compiled against a catalog and a registry."""

    def __init__(
        self,
        profile: Profile,
        config: EdgeConfig,
        catalog: Catalog,
        registry: UpstreamRegistry,
        metrics: EdgeMetrics | None,
    ) -> None:
        self.profile = profile
        self.config = config
        self.metrics = metrics
        self.cache = ResponseCache(config.cache_max_bytes)
        self.authn = Authenticator(config.auth)
        self.key_limits = ApiKeyLimits(config.auth.api_keys)
        self.gateway: GatewayApp = create_app(
            catalog, registry, options=config.options, route_middleware=[self._route_middleware]
        )
        composites = [
            Composite(
                spec,
                catalog,
                registry,
                generate_request_id=config.options.generate_request_id,
                config_path=f"edge.profiles.{profile.name}.bff[{i}]",
                codec=self.gateway.state.codec,
            )
            for i, spec in enumerate(profile.bff)
        ]
        inner: ASGIApp = self.gateway
        if composites:
            inner = BffApp(composites, self.gateway, route_middleware=self._bff_middleware)
        if profile.shaping is not None:
            inner = ShapingMiddleware(inner, profile.shaping)
        if profile.cors is not None:
            inner = CorsMiddleware(inner, profile.cors)
        self.app = inner
        self.catalog = catalog
        self._openapi: bytes | None = None

    def openapi(self) -> bytes:
        """This profile's OpenAPI document (paths under its prefix, its auth schemes),
        generated on first use; a reload builds a new runtime, so it never goes stale."""
        if self._openapi is None:
            self._openapi = openapi_json(
                self.catalog,
                title=f"meshkit gateway ({self.profile.name})",
                **self.config.openapi_options(self.profile),
            )
        return self._openapi

    def wrap(
        self, name: str, policy: RoutePolicy, app: ASGIApp, streaming: bool = False
    ) -> ASGIApp:
        """Wrap a route handler with the features of ``policy`` (outermost first: auth,
        rate limit, cache, shaping)."""
        if policy.shaping is not None and not streaming:
            app = ShapingMiddleware(app, policy.shaping)
        if policy.cache is not None and not streaming:
            on_cache = self.metrics.cache_result if self.metrics is not None else None
            app = CacheMiddleware(app, policy.cache, self.cache, name=name, on_result=on_cache)
        has_key_limits = bool(self.key_limits)
        if policy.rate_limit is not None or has_key_limits:
            metrics = self.metrics
            on_reject = (
                (lambda scope, what: metrics.rejected(name, what)) if metrics is not None else None
            )
            app = RateLimitMiddleware(
                app,
                policy.rate_limit,
                api_key_limits=self.key_limits if has_key_limits else None,
                name=name,
                on_reject=on_reject,
            )
        # Always present, even with no auth configured: it strips client-sent x-jwt-* and
        # x-api-key-name metadata, which upstreams may trust as set by the edge.
        return AuthMiddleware(app, self.authn, policy.auth or AuthPolicy("none"))

    def _route_middleware(self, route: Route, app: ASGIApp) -> ASGIApp:
        b = route.binding
        policy = self.profile.policy_for(b.method.full_name, b.http_method, b.template.source)
        streaming = b.method.server_streaming or b.method.client_streaming
        return self.wrap(b.method.full_name, policy, app, streaming)

    def _bff_middleware(self, comp: Composite, app: ASGIApp) -> ASGIApp:
        name = f"bff.{comp.spec.name}"
        policy = self.profile.policy_for(name, comp.spec.http_method, comp.spec.path)
        return self.wrap(name, policy, app)


# --------------------------------------------------------------------------- the edge app


class EdgeApp:
    """All profiles of one config. ``app_for(profile)`` serves one profile (per-port
    serving); calling the EdgeApp itself dispatches by path prefix."""

    def __init__(
        self,
        config: EdgeConfig,
        catalog: Catalog,
        *,
        config_loader: Callable[[], EdgeConfig] | None = None,
        catalog_loader: Callable[[], Catalog] | None = None,
        option_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.option_overrides = dict(option_overrides or {})
        config = self._overridden(config)
        self.catalog = catalog
        self.config = config
        self.config_loader = config_loader
        self.catalog_loader = catalog_loader
        self.registry = build_registry(config)
        self.metrics = (
            EdgeMetrics(lambda: health_snapshot(self.registry)) if config.metrics else None
        )
        self.profiles: dict[str, ProfileRuntime] = {}
        self._compile(config)
        self._reload_lock: asyncio.Lock | None = None
        self._redactor: tuple[Any, Redactor] | None = None
        self.reloads = 0
        #: What ``POST /admin/reload`` runs instead of :meth:`reload` when this process
        #: is one of several serving the port (``meshkit gateway --workers``): a reload
        #: of every worker, as SIGHUP does. Raises ConfigError when it failed.
        self.reload_all: Callable[[], Awaitable[None]] | None = None

    def _compile(self, config: EdgeConfig) -> None:
        self._install(self._build(config, self.catalog))

    def _build(self, config: EdgeConfig, catalog: Catalog) -> dict[str, ProfileRuntime]:
        # Profiles hold the registry object, which reload updates in place.
        return {
            n: ProfileRuntime(p, config, catalog, self.registry, self.metrics)
            for n, p in config.profiles.items()
        }

    def _install(self, profiles: dict[str, ProfileRuntime]) -> None:
        self.profiles = profiles
        self._by_prefix = sorted(
            ((p.profile.prefix, p) for p in self.profiles.values()), key=lambda x: -len(x[0])
        )

    # ---- readiness and reload

    def ready(self) -> bool:
        """Every health-checked upstream had a SERVING endpoint at its last check. This
        does not look at connectivity; :meth:`not_ready` (what ``/readyz`` answers) does."""
        return all(
            u.ready for u in self.registry.upstreams.values() if isinstance(u, BalancedUpstream)
        )

    async def not_ready(self) -> dict[str, str]:
        """The upstreams that cannot take calls now, each with why (empty: ready).

        Health-checked upstreams answer from their last checks; the others from the
        connectivity of their channels (see :meth:`BalancedUpstream.not_ready`), so an
        upstream whose every endpoint refuses connections is not ready. Bounded by
        ``BalancedUpstream.connect_timeout``: the upstreams are probed concurrently."""
        ups = [u for u in self.registry.upstreams.values() if isinstance(u, BalancedUpstream)]
        reasons = await asyncio.gather(*(u.not_ready() for u in ups))
        return {u.name: r for u, r in zip(ups, reasons, strict=True) if r is not None}

    async def startup(self) -> None:
        """Probe health once and start the periodic checks (call on the serving loop)."""
        ups = [
            u
            for u in self.registry.upstreams.values()
            if isinstance(u, BalancedUpstream) and u.health_check is not None
        ]
        await asyncio.gather(*(u.check_now() for u in ups))
        for u in ups:
            u.start_health_checks()

    async def shutdown(self) -> None:
        """Close channels and stop health checks."""
        await self.registry.close(grace=1.0)
        if self.metrics is not None:
            self.metrics.shutdown()

    def _overridden(self, config: EdgeConfig) -> EdgeConfig:
        """``config`` with the command line's option overrides applied."""
        if not self.option_overrides:
            return config
        return dataclasses.replace(config, options=config.options.with_(**self.option_overrides))

    async def reload(
        self, config: EdgeConfig | None = None, catalog: Catalog | None = None
    ) -> None:
        """Switch to ``config`` (or re-read the file) and ``catalog`` (or re-read the
        descriptor set when it came from a file); in-flight requests are unaffected.
        Raises ConfigError (and keeps the current configuration) when anything is invalid."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            if config is None:
                if self.config_loader is None:
                    raise ConfigError("", "no config file to reload from")
                config = self._overridden(self.config_loader())
            elif config is not self.config:
                config = self._overridden(config)
            if config is not self.config:
                config = config.carry_policies(self.config)
            if catalog is None and self.catalog_loader is not None:
                catalog = self.catalog_loader()
            if config is self.config and config.auth.keys is not None:
                config.auth.keys.reload()  # same document: re-read key and JWKS files
            new_catalog = catalog if catalog is not None else self.catalog
            # Compile everything before touching anything: a bad rule must not half-apply.
            profiles = self._build(config, new_catalog)
            await update_registry(self.registry, config)
            for u in self.registry.upstreams.values():
                if isinstance(u, BalancedUpstream) and u.health_check is not None:
                    u.start_health_checks()
            self.catalog = new_catalog
            self.config = config
            self._install(profiles)
            self.reloads += 1
            log.info("edge config reloaded (%d profiles)", len(self.profiles))

    # ---- serving

    def app_for(self, name: str) -> ASGIApp:
        """An ASGI app serving only profile ``name`` (for its own port); the prefix is
        not required on a profile's own port."""
        if name not in self.profiles:
            raise ConfigError(
                "--profile", f"unknown profile {name!r}; have {', '.join(self.profiles)}"
            )

        async def one(scope: Scope, receive: Receive, send: Send) -> None:
            await self._serve(self.profiles[name], scope, receive, send, strip=False)

        return self._outer(one, name)

    def _outer(self, inner: ASGIApp, profile: str) -> ASGIApp:
        app: ASGIApp = OpsMiddleware(
            inner,
            not_ready=self.not_ready,
            metrics=self.metrics,
            openapi=lambda: self._openapi(scope_profile=profile),
        )
        app = _RequestId(_Unmount(_AdminMiddleware(app, self)), self)
        if self.config.access_log or self.metrics is not None:
            app = TelemetryMiddleware(
                app,
                metrics=self.metrics,
                profile=profile,
                access_logs=self.config.access_log,
                redactor=self.redactor,
            )
        return _Lifespan(app, self)

    def redactor(self) -> Redactor:
        """What the access log and spans hide, from the current auth config: the API-key
        query parameter and header besides the always-secret names."""
        auth = self.config.auth
        cached = self._redactor
        if cached is None or cached[0] is not auth:
            query = [auth.api_key_query] if auth.api_key_query else []
            cached = (auth, Redactor.for_names(query=query, headers=[auth.api_key_header]))
            self._redactor = cached
        return cached[1]

    def _openapi(self, scope_profile: str) -> bytes:
        rt = self.profiles.get(scope_profile)
        if rt is None:
            rt = next(iter(self.profiles.values()))
        return rt.openapi()

    def asgi(self) -> ASGIApp:
        """The app dispatching every profile by path prefix."""
        return self._outer(self._dispatch, "")

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        for prefix, rt in self._by_prefix:
            if not prefix or path == prefix or path.startswith(prefix + "/"):
                await self._serve(rt, scope, receive, send, strip=bool(prefix))
                return
        await send_error(send, GatewayError("NOT_FOUND", "no profile serves this path"))

    async def _serve(
        self, rt: ProfileRuntime, scope: Scope, receive: Receive, send: Send, *, strip: bool
    ) -> None:
        prefix = rt.profile.prefix
        notes(scope)["profile"] = rt.profile.name
        if strip and prefix:
            # A copy, so the outer middleware still logs the path the client sent; what the
            # inner layers learn (route, caller) is copied back for the log and metrics.
            # The inner layers see the path below the profile (and below any mount point).
            inner = dict(scope)
            inner["path"] = scope["path"][len(prefix) :] or "/"
            raw = scope.get("raw_path")
            if raw:
                below = path_below(raw.decode("latin-1"), scope["path"], prefix)
                inner["raw_path"] = (below or inner["path"]).encode("latin-1")
            # Not the profile prefix: the inner layers route on the path as they see it.
            inner["root_path"] = ""
            if inner["path"] == "/openapi.json" and scope.get("method") == "GET":
                await send_json(send, 200, rt.openapi())  # this profile's own document
                return
            try:
                await rt.app(inner, receive, send)
            finally:
                for key in ("meshkit.route", PRINCIPAL_KEY):
                    if key in inner:
                        scope[key] = inner[key]
            return
        if prefix and scope.get("path", "").startswith(prefix + "/"):
            # The prefix is optional on the profile's own port.
            await self._serve(rt, scope, receive, send, strip=True)
            return
        await rt.app(scope, receive, send)


class _Unmount:
    """Everything inside the edge sees paths below its mount point (ASGI ``root_path``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        inner = unmounted(scope)
        await self.app(inner, receive, send)
        if inner is not scope:
            for key in ("meshkit.route", PRINCIPAL_KEY):
                if key in inner:
                    scope[key] = inner[key]


class _RequestId:
    """Every response carries ``x-request-id`` (the client's if sane, else generated):
    inside telemetry, so the access log records the same id; outside everything that can
    answer by itself (auth, limits, ops, admin, the router)."""

    def __init__(self, app: ASGIApp, edge: EdgeApp) -> None:
        self.app = app
        self.edge = edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            rid = assign_request_id(scope, self.edge.config.options.generate_request_id)
            if rid:
                send = send_with_request_id(send, rid)
        await self.app(scope, receive, send)


class _AdminMiddleware:
    """``POST /admin/reload`` with ``Authorization: Bearer <token>`` (SHA-256 in config)."""

    def __init__(self, app: ASGIApp, edge: EdgeApp) -> None:
        self.app = app
        self.edge = edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/admin/reload":
            want = self.edge.config.admin_token_sha256
            if want is None:
                await send_error(send, GatewayError("NOT_FOUND", "the admin endpoint is disabled"))
                return
            if scope["method"] != "POST":
                await send_error(
                    send,
                    GatewayError(
                        "UNIMPLEMENTED", "use POST", http_status=405, headers=[(b"allow", b"POST")]
                    ),
                )
                return
            token = (bearer_token(header(scope, b"authorization")) or "").encode("latin-1")
            if not hmac.compare_digest(hashlib.sha256(token).digest(), want):
                await send_error(
                    send,
                    GatewayError(
                        "UNAUTHENTICATED",
                        "admin token required",
                        headers=[(b"www-authenticate", b'Bearer realm="meshkit-admin"')],
                    ),
                )
                return
            try:
                if self.edge.reload_all is not None:
                    # Validate here first: a bad file is refused with its error in the
                    # answer, and no worker is disturbed.
                    if self.edge.config_loader is not None:
                        self.edge.config_loader()
                    await self.edge.reload_all()
                else:
                    await self.edge.reload()
            except ConfigError as exc:
                await send_error(
                    send, GatewayError("FAILED_PRECONDITION", f"reload refused: {exc}")
                )
                return
            await send_json(send, 200, b'{"status":"reloaded"}')
            return
        await self.app(scope, receive, send)


class _Lifespan:
    def __init__(self, app: ASGIApp, edge: EdgeApp) -> None:
        self.app = app
        self.edge = edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await serve_lifespan(receive, send, self.edge.startup, self.edge.shutdown, log)


def create_edge_app(
    config: EdgeConfig | str | Path | Mapping[str, Any],
    descriptors: DescriptorSource,
    *,
    services: list[str] | None = None,
    option_overrides: Mapping[str, Any] | None = None,
) -> EdgeApp:
    """Build the edge from a config (an :class:`EdgeConfig`, a YAML path, or a mapping)
    and descriptors (as :func:`meshkit.gateway.core.app.create_app` takes them).

    ``option_overrides`` (the CLI's ``--strict``, ``--proto-names``...) replace the
    config's ``gateway:`` options, on every reload too.
    Serve ``edge.asgi()`` (all profiles by prefix) or ``edge.app_for(name)`` per port.
    """

    loader: Callable[[], EdgeConfig] | None = None
    if isinstance(config, str | Path):
        path = Path(config)
        loader = lambda: load_edge_config(path)  # noqa: E731
        cfg = loader()
    elif isinstance(config, EdgeConfig):
        cfg = config
    else:
        cfg = EdgeConfig.from_mapping(config)
    catalog = load_catalog(descriptors, services)
    catalog_loader: Callable[[], Catalog] | None = None
    if isinstance(descriptors, str | Path):
        source = descriptors
        catalog_loader = lambda: load_catalog(source, services)  # noqa: E731
    return EdgeApp(
        cfg,
        catalog,
        config_loader=loader,
        catalog_loader=catalog_loader,
        option_overrides=option_overrides,
    )
