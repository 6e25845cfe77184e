"""The gateway as a plain ASGI application.

Request flow::

    middleware (outer, app-wide)  ->  router (trie)  ->  route middleware  ->  handler
                                                                   unary | streaming | websocket

* App-wide middleware is ordinary ASGI middleware: ``Callable[[ASGIApp], ASGIApp]``.
* Route middleware is compiled once per route at load:
  ``Callable[[Route, ASGIApp], ASGIApp]`` — it sees the route (method, template,
  HttpRule) and returns a wrapper or the app unchanged. The router puts the
  matched :class:`Route` in ``scope["meshkit.route"]`` and the decoded path
  variables in ``scope["path_params"]``.
* Upstreams come from :class:`UpstreamRegistry`; ``Upstream.channel(scope)`` is
  the one place a call picks its channel.

A compiled snapshot (:class:`GatewayState`) is swapped atomically by
:meth:`GatewayApp.reload`; requests in flight finish on the snapshot they
started with, whose channels close once it drains.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2

from meshkit.config import Policy, compile_policy
from meshkit.errors import ConfigError
from meshkit.gateway._asgi import ASGIApp, Middleware, Receive, Scope, Send
from meshkit.gateway.core._disconnect import DisconnectGuard
from meshkit.gateway.core._paths import route_path, unmounted
from meshkit.gateway.core.config import GatewayOptions
from meshkit.gateway.core.descriptors import (
    Catalog,
    build_catalog,
    load_descriptor_set,
    parse_descriptor_set,
)
from meshkit.gateway.core.errors import (
    GatewayError,
    http_status_for,
    metadata_headers,
    send_status,
    status_from_rpc_error,
)
from meshkit.gateway.core.metadata import (
    REQUEST_ID_KEY,
    RequestHeaders,
    assign_request_id,
    read_headers,
    send_with_request_id,
)
from meshkit.gateway.core.routing import BadPathError, Match, Router, RoutingError
from meshkit.gateway.core.transcoding import (
    Binding,
    HttpRuleError,
    JsonCodec,
    Transcoder,
    compile_binding,
    rule_bindings,
)
from meshkit.gateway.core.types import Route, RouteMiddleware
from meshkit.gateway.upstream._unary import UnaryInvoker, unary_invoker
from meshkit.gateway.upstream.upstreams import UpstreamRegistry

log = logging.getLogger("meshkit.gateway")

# Multicallables and invokers per channel. Weakly keyed, so they go when the channel
# goes (keying by id(channel) would hand a new channel a dead one's calls), and held
# here rather than as an attribute set on grpc's object.
_CALLS: weakref.WeakKeyDictionary[grpc.aio.Channel, dict[tuple[int, str], Any]] = (
    weakref.WeakKeyDictionary()
)


def _calls_of(channel: grpc.aio.Channel) -> dict[tuple[int, str], Any]:
    cache = _CALLS.get(channel)
    if cache is None:
        cache = _CALLS[channel] = {}
    return cache


_SNAPSHOT_TOKENS = itertools.count()


class Disconnected(Exception):
    """The HTTP client went away."""


# --------------------------------------------------------------------------- the snapshot


class GatewayState:
    """Everything compiled from descriptors + options + upstreams, immutable once built."""

    def __init__(
        self,
        catalog: Catalog,
        upstreams: UpstreamRegistry,
        options: GatewayOptions,
        route_middleware: Sequence[RouteMiddleware] = (),
    ) -> None:
        self.catalog = catalog
        self.upstreams = upstreams
        self.options = options
        self.codec = JsonCodec(catalog.pool, options)
        self.transcoder = Transcoder(self.codec, options)
        self.router: Router[Route] = Router()
        self.routes: list[Route] = []
        self.inflight = 0
        # Never reused (unlike id()): a channel's cached multicallables carry this
        # snapshot's serializers, which a reload with new descriptors must not see.
        self._token = next(_SNAPSHOT_TOKENS)
        self._compile(route_middleware)

    def _compile(self, route_middleware: Sequence[RouteMiddleware]) -> None:
        errors: list[str] = []
        fallback = self.options.fallback_routes
        for m in self.catalog.methods:
            specs: list[tuple[str, str, str, str, bool]] = []
            if m.rule is not None:
                specs.extend((*b, False) for b in rule_bindings(m.rule))
            if fallback == "all" or (fallback == "unannotated" and m.rule is None):
                specs.append(("POST", f"/{m.service}/{m.name}", "*", "", True))
            for http_method, template, body, response_body, is_fallback in specs:
                try:
                    b = compile_binding(
                        m, http_method, template, body, response_body, fallback=is_fallback
                    )
                    route = Route(b, self._noop)
                    route.app = self._chain(route, route_middleware)
                    self.router.add(http_method, b.template, route, m.full_name)
                    self.routes.append(route)
                except (HttpRuleError, RoutingError) as exc:
                    errors.append(str(exc))
        if errors:
            raise ConfigError("http rules", "; ".join(errors))

    async def _noop(self, scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
        raise RuntimeError("route app not compiled")

    def _chain(self, route: Route, route_middleware: Sequence[RouteMiddleware]) -> ASGIApp:
        b = route.binding
        m = b.method
        # A partial, not a wrapping coroutine: one coroutine frame less per request.
        streaming = m.client_streaming or m.server_streaming
        app: ASGIApp = functools.partial(
            self.handle_streaming if streaming else self.handle_unary, b
        )
        for mw in reversed(route_middleware):
            app = mw(route, app)
        return app

    # ---- calls

    def _callable(self, channel: grpc.aio.Channel, b: Binding, kind: str) -> Any:
        cache = _calls_of(channel)
        key = (self._token, b.method.path)
        mc = cache.get(key)
        if mc is None:
            m = b.method
            factory = getattr(channel, kind)
            mc = factory(
                m.path,
                request_serializer=m.input_type.SerializeToString,
                response_deserializer=m.output_type.FromString,
            )
            cache[key] = mc
        return mc

    def _unary_invoker(self, channel: grpc.aio.Channel, b: Binding) -> UnaryInvoker:
        cache = _calls_of(channel)
        key = (self._token, b.method.path + " invoke")
        inv: UnaryInvoker | None = cache.get(key)
        if inv is None:
            inv = unary_invoker(self._callable(channel, b, "unary_unary"))
            cache[key] = inv
        return inv

    def _upstream_channel(self, b: Binding, scope: Scope) -> grpc.aio.Channel:
        up = self.upstreams.for_service(b.method.service)
        if up is None:
            raise GatewayError("UNAVAILABLE", f"no upstream serves {b.method.service}")
        return up.channel(scope)

    def _timeout(self, b: Binding, hdrs: RequestHeaders) -> float | None:
        t = (
            hdrs.timeout
            if hdrs.timeout is not None
            else self.options.timeout_for(b.method.full_name)
        )
        if t is not None and t > self.options.max_timeout:
            t = self.options.max_timeout
        return t

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.options.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise GatewayError("INVALID_ARGUMENT", "invalid Content-Length") from None
                if declared > limit:
                    raise _too_large(limit)
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise Disconnected()
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def handle_unary(self, b: Binding, scope: Scope, receive: Receive, send: Send) -> None:
        """Unary RPC: read, transcode, call, answer. A client that disconnects during the
        call cancels it (see :mod:`meshkit.gateway.core._disconnect`)."""
        hdrs: RequestHeaders | None = None
        try:
            hdrs = read_headers(
                scope["headers"],
                scope.get("client"),
                generate_request_id=self.options.generate_request_id,
            )
            raw = await self._read_body(scope, receive) if b.body else b""
            req = self.transcoder.build(
                b, raw, hdrs.content_type, scope.get("query_string", b""), scope["path_params_raw"]
            )
            channel = self._upstream_channel(b, scope)
            invoke = self._unary_invoker(channel, b)
            guard = DisconnectGuard(scope, receive)
            try:
                resp, initial, trailing = await invoke(req, hdrs.metadata, self._timeout(b, hdrs))
            except BaseException:
                if guard.release():
                    return  # the client left and the call was cancelled: nobody to answer
                raise
            if guard.release():
                return
            ctype, body = self.transcoder.response_body(b, resp)
            headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
            if hdrs.request_id:
                headers.append((b"x-request-id", hdrs.request_id.encode("latin-1")))
            if initial:
                headers.extend(metadata_headers(initial))
            if trailing:
                headers.extend(metadata_headers(trailing))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except Disconnected:
            return
        except grpc.aio.AioRpcError as err:
            await self.send_rpc_error(send, err, hdrs)
        except GatewayError as err:
            await self.send_error(send, err, hdrs)
        except Exception:
            log.exception("gateway error in %s", b.method.full_name)
            await self.send_error(send, GatewayError("INTERNAL", "internal gateway error"), hdrs)

    async def handle_streaming(
        self, b: Binding, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Streaming RPCs over HTTP (NDJSON/SSE/JSON array out, NDJSON in)."""
        from meshkit.gateway.core.streaming import serve_http_stream

        await serve_http_stream(self, b, scope, receive, send)

    # ---- error answers

    def request_id_header(self, hdrs: RequestHeaders | None) -> list[tuple[bytes, bytes]]:
        """The ``x-request-id`` response header, if any."""
        if hdrs is not None and hdrs.request_id:
            return [(b"x-request-id", hdrs.request_id.encode("latin-1"))]
        return []

    async def send_error(
        self,
        send: Send,
        err: GatewayError,
        hdrs: RequestHeaders | None = None,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """Answer with a gateway error's Status JSON."""
        await send_status(
            send,
            err.http_status,
            err.to_status(),
            self.catalog.pool,
            [*err.headers, *self.request_id_header(hdrs), *extra],
        )

    async def send_rpc_error(
        self, send: Send, err: grpc.aio.AioRpcError, hdrs: RequestHeaders | None = None
    ) -> None:
        """Answer with an upstream call's status."""
        st = status_from_rpc_error(err, hdrs.request_id if hdrs is not None else "")
        extra = [
            *self.request_id_header(hdrs),
            *metadata_headers(err.initial_metadata()),
            *metadata_headers(err.trailing_metadata()),
        ]
        status = http_status_for(st.code)
        if status == 401:
            extra.append((b"www-authenticate", b"Bearer"))
        await send_status(send, status, st, self.catalog.pool, extra)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        "RESOURCE_EXHAUSTED", f"request body exceeds the limit of {limit} bytes", http_status=413
    )


async def serve_lifespan(
    receive: Receive,
    send: Send,
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
    logger: logging.Logger,
) -> None:
    """The ASGI lifespan protocol around ``startup`` and ``shutdown``: a failed startup
    is logged and reported to the server, which then refuses to serve."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            try:
                await startup()
            except Exception as exc:
                logger.exception("startup failed")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


# --------------------------------------------------------------------------- the app


class GatewayApp:
    """The ASGI application. Build it with :func:`create_app`."""

    def __init__(
        self,
        state: GatewayState,
        *,
        middleware: Sequence[Middleware] = (),
        route_middleware: Sequence[RouteMiddleware] = (),
    ) -> None:
        self.state = state
        self.route_middleware = tuple(route_middleware)
        app: ASGIApp = self._dispatch
        for mw in reversed(middleware):
            app = mw(app)
        self._app = app
        self._retired: list[GatewayState] = []
        self.on_startup: list[Callable[[], Awaitable[None]]] = []
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind == "http" and REQUEST_ID_KEY not in scope:
            # Outermost here, so responses written by app-wide middleware and the router
            # (404, 405) carry the id too. Inside the edge its outer layer already did this.
            rid = assign_request_id(scope, self.state.options.generate_request_id)
            if rid:
                send = send_with_request_id(send, rid)
        await self._app(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        state.inflight += 1
        try:
            if scope["type"] == "websocket":
                from meshkit.gateway.core.websocket import serve_websocket

                await serve_websocket(state, scope, receive, send)
                return
            method = scope["method"]
            path = route_path(scope)
            try:
                found = state.router.match(path, method)
                if isinstance(found, Match):
                    values = [v for _, v in found.bindings()]
            except BadPathError as exc:
                await state.send_error(send, GatewayError("INVALID_ARGUMENT", str(exc)))
                return
            if isinstance(found, Match):
                route = found.target
                scope["meshkit.route"] = route
                scope["path_params_raw"] = values
                scope["path_params"] = {
                    ".".join(v.field_path): val
                    for v, val in zip(found.template.variables, values, strict=True)
                }
                await route.app(scope, receive, send)
            elif found is None:
                await state.send_error(
                    send, GatewayError("NOT_FOUND", f"no route for {method} {path[:200]}")
                )
            else:
                await state.send_error(
                    send,
                    GatewayError(
                        "UNIMPLEMENTED",
                        f"method {method} not allowed for {path[:200]}",
                        http_status=405,
                        headers=[(b"allow", ", ".join(found).encode())],
                    ),
                )
        finally:
            state.inflight -= 1
            if state.inflight == 0 and state is not self.state:
                self._retire_done(state)

    def _retire_done(self, state: GatewayState) -> None:
        if state in self._retired:
            self._retired.remove(state)
            if state.upstreams is not self.state.upstreams:
                asyncio.get_running_loop().create_task(state.upstreams.close(grace=1.0))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        async def startup() -> None:
            for fn in self.on_startup:
                await fn()

        async def shutdown() -> None:
            for fn in self.on_shutdown:
                try:
                    await fn()
                except Exception:
                    log.exception("gateway shutdown hook failed")
            await self.state.upstreams.close(grace=1.0)

        await serve_lifespan(receive, send, startup, shutdown, log)

    def reload(self, state: GatewayState) -> None:
        """Swap in a new snapshot; in-flight requests finish on the old one, whose
        upstream channels (if not shared with the new one) close once it drains."""
        old = self.state
        self.state = state
        if old.upstreams is state.upstreams:
            return
        if old.inflight == 0:
            try:
                asyncio.get_running_loop().create_task(old.upstreams.close(grace=1.0))
            except RuntimeError:
                pass
        else:
            self._retired.append(old)

    def build_state(
        self,
        catalog: Catalog,
        upstreams: UpstreamRegistry | None = None,
        options: GatewayOptions | None = None,
    ) -> GatewayState:
        """Compile a snapshot reusing this app's route middleware (and upstreams/options
        unless given)."""
        return GatewayState(
            catalog,
            upstreams if upstreams is not None else self.state.upstreams,
            options if options is not None else self.state.options,
            self.route_middleware,
        )

    @property
    def routes(self) -> list[Route]:
        """The compiled routes of the current snapshot."""
        return self.state.routes


DescriptorSource = str | Path | bytes | descriptor_pb2.FileDescriptorSet | Catalog


def load_catalog(source: DescriptorSource, services: Sequence[str] | None = None) -> Catalog:
    """A :class:`Catalog` from a path, bytes, a FileDescriptorSet or a Catalog."""
    if isinstance(source, Catalog):
        return source
    if isinstance(source, bytes):
        fds = parse_descriptor_set(source)
    elif isinstance(source, descriptor_pb2.FileDescriptorSet):
        fds = source
    else:
        fds = load_descriptor_set(source)
    return build_catalog(fds, services=services)


def create_app(
    descriptors: DescriptorSource,
    upstreams: UpstreamRegistry | Sequence[str] | Mapping[str, str],
    *,
    options: GatewayOptions | None = None,
    services: Sequence[str] | None = None,
    middleware: Sequence[Middleware] = (),
    route_middleware: Sequence[RouteMiddleware] = (),
    policy: Policy | Mapping[str, Any] | None = None,
) -> GatewayApp:
    """Build the gateway ASGI app.

    ``descriptors``: a FileDescriptorSet (path, bytes or message) or a Catalog.
    ``upstreams``: a registry, or specs ``["HOST:PORT", "pkg.Svc=HOST:PORT"]``, or a
    mapping ``{"default" | service: target}``. ``policy`` is meshkit's client policy
    for upstream calls: a :class:`~meshkit.config.Policy`, shared by every upstream
    (a mapping is compiled here, once, the same way). Raises ConfigError listing every invalid or
    ambiguous rule (method and template).
    """
    catalog = load_catalog(descriptors, services)
    if isinstance(policy, Mapping):
        policy = compile_policy(policy)
    registry = (
        upstreams
        if isinstance(upstreams, UpstreamRegistry)
        else UpstreamRegistry.from_specs(upstreams, policy=policy)
    )
    state = GatewayState(catalog, registry, options or GatewayOptions(), route_middleware)
    return GatewayApp(state, middleware=middleware, route_middleware=route_middleware)


__all__ = [
    "ASGIApp",
    "GatewayApp",
    "GatewayState",
    "Middleware",
    "Route",
    "RouteMiddleware",
    "create_app",
    "load_catalog",
    "route_path",
    "unmounted",
]
