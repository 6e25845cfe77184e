"""Server interceptors (grpc.aio and sync) that verify the edge's JWTs for
service-to-service calls.

It uses :class:`meshkit.auth.Authenticator`, as the gateway's edge does, so a service
accepts exactly the tokens (keys, algorithms, issuer, audience, leeway) the edge
accepts. A call without a valid ``authorization: Bearer <jwt>`` fails with
UNAUTHENTICATED before the handler runs; the verified claims are available to
the handler through :func:`current_claims`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from meshkit.auth import AuthConfig, Authenticator, AuthError, bearer_token

_claims: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "meshkit_jwt_claims", default=None
)


def current_claims() -> Mapping[str, Any] | None:
    """The verified claims of the call being handled (None outside a verified call)."""
    return _claims.get()


class _JwtCheck:
    """What both interceptors decide: reject (with a code and a reason) or pass claims."""

    def __init__(
        self, config: AuthConfig, exempt: Sequence[str], required_scopes: Sequence[str]
    ) -> None:
        self.authn = Authenticator(config)
        self.exempt = tuple(exempt)
        self.required_scopes = tuple(required_scopes)

    def check(
        self, details: grpc.HandlerCallDetails
    ) -> tuple[grpc.StatusCode, str] | Mapping[str, Any] | None:
        """None for an exempt method; a (code, reason) rejection; or the verified claims."""
        if (details.method or "").startswith(self.exempt):
            return None
        token = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                token = bearer_token(value)
        if not token:
            return grpc.StatusCode.UNAUTHENTICATED, "this method needs a bearer token"
        try:
            p = self.authn.verify_jwt(token)
        except AuthError as exc:
            return grpc.StatusCode.UNAUTHENTICATED, exc.reason
        missing = [s for s in self.required_scopes if s not in p.scopes()]
        if missing:
            return grpc.StatusCode.PERMISSION_DENIED, f"missing scope {missing[0]!r}"
        return p.claims


class _JwtInterceptor:
    """The configuration both interceptors take."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        exempt: Sequence[str] = ("/grpc.health.v1.Health/",),
        required_scopes: Sequence[str] = (),
    ) -> None:
        self._check = _JwtCheck(config, exempt, required_scopes)


class JwtServerInterceptor(_JwtInterceptor, grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Reject calls without a valid bearer JWT (grpc.aio servers); ``exempt`` lists
    method-path prefixes (such as ``/grpc.health.v1.Health/``) that need none."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        verdict = self._check.check(details)
        if verdict is None:
            return handler
        if isinstance(verdict, tuple):
            return _rejecting(handler, *verdict)
        return _with_claims(handler, verdict)


class SyncJwtServerInterceptor(_JwtInterceptor, grpc.ServerInterceptor):  # type: ignore[misc,type-arg]
    """:class:`JwtServerInterceptor` for thread-pool (``grpc.server``) servers."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        verdict = self._check.check(details)
        if verdict is None:
            return handler
        if isinstance(verdict, tuple):
            return _sync_rejecting(handler, *verdict)
        return _sync_with_claims(handler, verdict)


def _same_kind(handler: Any, unary_response: Any, streaming_response: Any) -> Any:
    """A handler of ``handler``'s arity and serializers, running the given behaviours."""
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming_response, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response, **kw)
    return grpc.stream_stream_rpc_method_handler(streaming_response, **kw)


def _rejecting(handler: Any, code: grpc.StatusCode, reason: str) -> Any:
    async def abort(request: Any, context: Any) -> Any:
        await context.abort(code, reason)

    async def abort_stream(request: Any, context: Any) -> Any:
        await context.abort(code, reason)
        yield  # pragma: no cover - makes this an async generator

    return _same_kind(handler, abort, abort_stream)


def _with_claims(handler: Any, claims: Mapping[str, Any]) -> Any:
    inner = handler.unary_unary or handler.stream_unary
    inner_stream = handler.unary_stream or handler.stream_stream

    async def unary(request: Any, context: Any) -> Any:
        token = _claims.set(claims)
        try:
            return await inner(request, context)
        finally:
            _claims.reset(token)

    # Streaming responses: the handler runs in its own task context; set claims inside it.
    async def streaming(request: Any, context: Any) -> Any:
        _claims.set(claims)
        result = inner_stream(request, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            await result

    return _same_kind(handler, unary, streaming)


def _sync_rejecting(handler: Any, code: grpc.StatusCode, reason: str) -> Any:
    def abort(request: Any, context: Any) -> Any:
        context.abort(code, reason)

    return _same_kind(handler, abort, abort)


def _sync_with_claims(handler: Any, claims: Mapping[str, Any]) -> Any:
    inner = (
        handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    )

    def unary(request: Any, context: Any) -> Any:
        token = _claims.set(claims)
        try:
            return inner(request, context)
        finally:
            _claims.reset(token)

    def streaming(request: Any, context: Any) -> Any:
        # The worker thread runs this generator between other work of its own: the claims
        # are set for each step and taken back after it.
        responses = None
        while True:
            token = _claims.set(claims)
            try:
                if responses is None:
                    responses = iter(inner(request, context))
                item = next(responses)
            except StopIteration:
                return
            finally:
                _claims.reset(token)
            yield item

    return _same_kind(handler, unary, streaming)
