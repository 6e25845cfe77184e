"""A grpc.aio server interceptor that verifies the edge's JWTs for service-to-service calls.

It uses the gateway's :class:`~meshkit.gateway.auth.Authenticator`, so a service
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

from meshkit.gateway.auth import AuthConfig, Authenticator, AuthError, bearer_token

_claims: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "meshkit_jwt_claims", default=None
)


def current_claims() -> Mapping[str, Any] | None:
    """The verified claims of the call being handled (None outside a verified call)."""
    return _claims.get()


class JwtServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Reject calls without a valid bearer JWT; ``exempt`` lists method-path prefixes
    (such as ``/grpc.health.v1.Health/``) that need none."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        exempt: Sequence[str] = ("/grpc.health.v1.Health/",),
        required_scopes: Sequence[str] = (),
    ) -> None:
        self.authn = Authenticator(config)
        self.exempt = tuple(exempt)
        self.required_scopes = tuple(required_scopes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        method = details.method or ""
        handler = await continuation(details)
        if handler is None or method.startswith(self.exempt):
            return handler
        token = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                token = bearer_token(value)
        reason: str | None = None
        claims: Mapping[str, Any] | None = None
        code = grpc.StatusCode.UNAUTHENTICATED
        if not token:
            reason = "this method needs a bearer token"
        else:
            try:
                p = self.authn.verify_jwt(token)
                claims = p.claims
                missing = [s for s in self.required_scopes if s not in p.scopes()]
                if missing:
                    reason, code = (
                        f"missing scope {missing[0]!r}",
                        grpc.StatusCode.PERMISSION_DENIED,
                    )
            except AuthError as exc:
                reason = exc.reason
        if reason is not None:
            return _rejecting(handler, code, reason)
        return _with_claims(handler, claims or {})


def _rejecting(handler: Any, code: grpc.StatusCode, reason: str) -> Any:
    async def abort(request: Any, context: Any) -> Any:
        await context.abort(code, reason)

    async def abort_stream(request: Any, context: Any) -> Any:
        await context.abort(code, reason)
        yield  # pragma: no cover - makes this an async generator

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)


def _with_claims(handler: Any, claims: Mapping[str, Any]) -> Any:
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        inner = handler.unary_unary

        async def uu(request: Any, context: Any) -> Any:
            token = _claims.set(claims)
            try:
                return await inner(request, context)
            finally:
                _claims.reset(token)

        return grpc.unary_unary_rpc_method_handler(uu, **kw)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def su(it: Any, context: Any) -> Any:
            token = _claims.set(claims)
            try:
                return await inner_su(it, context)
            finally:
                _claims.reset(token)

        return grpc.stream_unary_rpc_method_handler(su, **kw)
    # Streaming responses: the handler runs in its own task context; set claims inside it.
    inner_stream = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: Any) -> Any:
        _claims.set(claims)
        result = inner_stream(request, context)
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            await result

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.stream_stream_rpc_method_handler(streaming, **kw)
