"""CORS per profile: preflight answers and response headers for allowed origins."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from meshkit._sections import get_bool, get_int, get_str_list, section
from meshkit.gateway._asgi import ASGIApp, Message, Receive, Scope, Send, header
from meshkit.gateway.core.errors import GatewayError
from meshkit.gateway.edge._responses import send_error


@dataclass(frozen=True, slots=True)
class CorsConfig:
    """Allowed origins (exact or ``https://*.example.com`` globs, or ``*``), methods,
    headers, exposed headers, credentials and preflight max age."""

    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET", "POST", "PUT", "PATCH", "DELETE")
    allow_headers: tuple[str, ...] = (
        "authorization",
        "content-type",
        "x-api-key",
        "grpc-timeout",
        "x-request-id",
    )
    expose_headers: tuple[str, ...] = ("x-request-id", "etag", "retry-after")
    allow_credentials: bool = False
    max_age: int = 600

    @classmethod
    def from_mapping(cls, raw: object, path: str = "cors") -> CorsConfig:
        """From the ``cors:`` section of a profile."""
        m = section(
            raw,
            path,
            (
                "allow_origins",
                "allow_methods",
                "allow_headers",
                "expose_headers",
                "allow_credentials",
                "max_age",
            ),
        )
        d = cls()
        return cls(
            allow_origins=get_str_list(m, "allow_origins", path),
            allow_methods=tuple(x.upper() for x in get_str_list(m, "allow_methods", path))
            or d.allow_methods,
            allow_headers=tuple(x.lower() for x in get_str_list(m, "allow_headers", path))
            or d.allow_headers,
            expose_headers=tuple(x.lower() for x in get_str_list(m, "expose_headers", path))
            or d.expose_headers,
            allow_credentials=get_bool(m, "allow_credentials", path, False),
            max_age=get_int(m, "max_age", path, 600),
        )

    def allows(self, origin: str) -> bool:
        """Whether ``origin`` may call."""
        return any(
            o == "*" or o == origin or fnmatch.fnmatchcase(origin, o) for o in self.allow_origins
        )


class CorsMiddleware:
    """Answers preflights itself; adds ``Access-Control-*`` headers to allowed origins' responses."""

    def __init__(self, app: ASGIApp, config: CorsConfig) -> None:
        self.app = app
        self.config = config
        c = config
        self._methods = ", ".join(c.allow_methods).encode()
        self._headers = ", ".join(c.allow_headers).encode()
        self._expose = ", ".join(c.expose_headers).encode()

    def _origin_headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        c = self.config
        wildcard = "*" in c.allow_origins and not c.allow_credentials
        out = [(b"access-control-allow-origin", b"*" if wildcard else origin)]
        if not wildcard:
            out.append((b"vary", b"Origin"))
        if c.allow_credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = header(scope, b"origin")
        if origin is None or not self.config.allows(origin.decode("latin-1")):
            if (
                origin is not None
                and scope["method"] == "OPTIONS"
                and header(scope, b"access-control-request-method")
            ):
                # Refused like every other edge error: a Status body the client can parse.
                await send_error(
                    send, GatewayError("PERMISSION_DENIED", "origin not allowed by the CORS policy")
                )
                return
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method"):
            hdrs = [
                *self._origin_headers(origin),
                (b"access-control-allow-methods", self._methods),
                (b"access-control-allow-headers", self._headers),
                (b"access-control-max-age", str(self.config.max_age).encode()),
                (b"content-length", b"0"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": hdrs})
            await send({"type": "http.response.body", "body": b""})
            return
        extra = [*self._origin_headers(origin), (b"access-control-expose-headers", self._expose)]

        async def send_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_cors)
