"""Authentication at the edge: JWT bearer tokens and API keys, verified by
:mod:`meshkit.auth`.

What is accepted and refused (algorithms pinned per key, no keys from token
headers, ``crit`` refused, typed claims, hashed API keys) is :mod:`meshkit.auth`'s.

:class:`AuthMiddleware` enforces one :class:`AuthPolicy`; build one per route
with :func:`auth_route_middleware`. Verified claims go upstream as metadata
(``Grpc-Metadata-X-Jwt-Sub``, ``Grpc-Metadata-X-Jwt-Claims`` as JSON), and any
such header sent by a client is removed first so it cannot be spoofed.
Failures are 401 (with an RFC 6750 ``WWW-Authenticate`` challenge: no error code when
no credentials came) or 403 with a ``google.rpc.Status`` body naming the reason, never
the token or key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from google.rpc import error_details_pb2

from meshkit._sections import get_str, get_str_list, section
from meshkit.auth import Authenticator, AuthError, Principal, bearer_token
from meshkit.errors import ConfigError
from meshkit.gateway._asgi import (
    PRINCIPAL_KEY,
    ASGIApp,
    Receive,
    Scope,
    Send,
    header,
    notes,
    set_headers,
)
from meshkit.gateway.core.errors import GatewayError
from meshkit.gateway.edge._responses import send_error

#: Metadata the gateway sets from verified credentials; clients may never send them.
FORWARDED_PREFIX = b"grpc-metadata-x-jwt-"
API_KEY_NAME_HEADER = b"grpc-metadata-x-api-key-name"


# --------------------------------------------------------------------------- policy + middleware


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """What a route demands: ``require`` one of none, jwt, api_key, any; plus scopes
    (all needed) and exact claim values."""

    require: str = "none"
    scopes: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw: Any, path: str) -> AuthPolicy:
        """From ``{require: jwt, scopes: [orders.read], claims: {tenant: acme}}``."""
        m = section(raw, path, ("require", "scopes", "claims"))
        req = get_str(m, "require", path, "jwt")
        if req not in ("none", "jwt", "api_key", "any"):
            raise ConfigError(f"{path}.require", f"expected none, jwt, api_key or any; got {req!r}")
        claims = m.get("claims") or {}
        if not isinstance(claims, Mapping):
            raise ConfigError(f"{path}.claims", "expected a mapping of claim to required value")
        return cls(require=req, scopes=get_str_list(m, "scopes", path), claims=dict(claims))


class AuthMiddleware:
    """ASGI middleware enforcing one :class:`AuthPolicy` with one :class:`Authenticator`."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator, policy: AuthPolicy) -> None:
        self.app = app
        self.authn = authenticator
        self.policy = policy
        cfg = authenticator.config
        self._key_header = cfg.api_key_header.encode()
        self._key_query = cfg.api_key_query

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            principal = self.authenticate(scope)
        except AuthError as exc:
            notes(scope)["auth"] = "forbidden" if exc.forbidden else "unauthenticated"
            if scope["type"] == "websocket":
                # Refuse the handshake (policy violation); the reason goes in the close frame.
                await send({"type": "websocket.close", "code": 1008, "reason": exc.reason[:120]})
                return
            await send_error(send, self._error(exc))
            return
        self._forward(scope, principal)
        await self.app(scope, receive, send)

    def authenticate(self, scope: Scope) -> Principal | None:
        """The verified caller (None if the route needs nobody); raise :class:`AuthError`."""
        policy = self.policy
        token = bearer_token(header(scope, b"authorization"))
        presented = header(scope, self._key_header)
        key: str | None = presented.decode("latin-1") if presented is not None else None
        if key is None and self._key_query:
            for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
                if name == self._key_query:
                    key = value
                    break
        principal: Principal | None = None
        if policy.require in ("jwt", "any") and token is not None:
            principal = self.authn.verify_jwt(token)
        elif policy.require in ("api_key", "any") and key is not None:
            principal = self.authn.verify_api_key(key)
        elif policy.require != "none":
            what = {"jwt": "a bearer token", "api_key": "an API key"}.get(
                policy.require, "a bearer token or an API key"
            )
            raise AuthError(f"this route needs {what}", error="invalid_request", missing=True)
        if principal is not None:
            self._authorize(principal)
        scope[PRINCIPAL_KEY] = principal
        return principal

    def _authorize(self, p: Principal) -> None:
        missing = [s for s in self.policy.scopes if s not in p.scopes()]
        if missing:
            raise AuthError(
                f"missing scope {missing[0]!r}", forbidden=True, error="insufficient_scope"
            )
        for name, want in self.policy.claims.items():
            have = p.claims.get(name)
            ok = want in have if isinstance(have, list) else have == want
            if not ok:
                raise AuthError(
                    f"claim {name!r} does not have the required value",
                    forbidden=True,
                    error="insufficient_scope",
                )

    def _forward(self, scope: Scope, p: Principal | None) -> None:
        remove = [
            k
            for k, _ in scope.get("headers") or ()
            if k.startswith(FORWARDED_PREFIX) or k == API_KEY_NAME_HEADER
        ]
        if not self.authn.config.forward_authorization:
            # Both spellings reach the upstream as ``authorization`` metadata.
            remove += [b"authorization", b"grpc-metadata-authorization"]
        if p is not None and p.kind == "api_key":
            remove.append(self._key_header)
        add: list[tuple[bytes, bytes]] = []
        if p is not None:
            if p.kind == "jwt":
                add.append((FORWARDED_PREFIX + b"sub", p.subject.encode("utf-8", "replace")))
                jwt_cfg = self.authn.config.jwt
                wanted = jwt_cfg.forward_claims if jwt_cfg else ()
                chosen = {k: v for k, v in p.claims.items() if not wanted or k in wanted}
                add.append(
                    (
                        FORWARDED_PREFIX + b"claims",
                        json.dumps(chosen, separators=(",", ":"), ensure_ascii=True).encode(),
                    )
                )
            else:
                add.append((API_KEY_NAME_HEADER, p.subject.encode()))
        if remove or add:
            set_headers(scope, add, remove)

    def _error(self, exc: AuthError) -> GatewayError:
        info = error_details_pb2.ErrorInfo(reason=exc.error.upper(), domain="meshkit.gateway")
        return GatewayError(
            "PERMISSION_DENIED" if exc.forbidden else "UNAUTHENTICATED",
            exc.reason,
            details=[info],
            headers=[(b"www-authenticate", challenge(self.authn.config.realm, exc))],
        )


#: RFC 6750 §3.1's error codes; any other failure (a bad API key) is ``invalid_token``.
_CHALLENGE_ERRORS = frozenset({"invalid_request", "invalid_token", "insufficient_scope"})


def _quoted(text: str) -> str:
    """``text`` reduced to what RFC 6750 allows inside a quoted challenge parameter
    (printable ASCII without ``"`` and ``\\``), so no reason can break the header."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)[:200]


def challenge(realm: str, exc: AuthError) -> bytes:
    """The ``WWW-Authenticate`` value for a refusal (RFC 6750 §3): a request with no
    credentials gets only the scheme and realm; a refused one also the error code and
    a description (the same safe reason as the body)."""
    value = f'Bearer realm="{_quoted(realm)}"'
    if not exc.missing:
        error = exc.error if exc.error in _CHALLENGE_ERRORS else "invalid_token"
        value += f', error="{error}", error_description="{_quoted(exc.reason)}"'
    return value.encode("ascii")
