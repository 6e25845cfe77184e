"""Credential verification (JWT bearer tokens, API keys) for every meshkit layer.

The gateway's edge (:mod:`meshkit.gateway.edge.auth`) and the gRPC server interceptor
(:mod:`meshkit.grpc.auth`) both use it; it imports neither (tests/unit/test_layering.py).
"""

from meshkit.auth.verify import (
    ALLOWED_ALGORITHMS,
    ApiKey,
    AuthConfig,
    Authenticator,
    AuthError,
    JwtSettings,
    KeySpec,
    KeyStore,
    LoadedKey,
    Principal,
    RateSpec,
    bearer_token,
    hash_api_key,
)

__all__ = [
    "ALLOWED_ALGORITHMS",
    "ApiKey",
    "AuthConfig",
    "AuthError",
    "Authenticator",
    "JwtSettings",
    "KeySpec",
    "KeyStore",
    "LoadedKey",
    "Principal",
    "RateSpec",
    "bearer_token",
    "hash_api_key",
]
