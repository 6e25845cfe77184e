"""JWT and API-key verification, shared by the gateway's edge and the gRPC server.

* JWT (PyJWT): HS256, RS256 and ES256. Each key pins its algorithms, so a token
  can never pick the verification algorithm (``alg: none`` is never allowed, and
  an HS256 token "signed" with an RSA public key as the HMAC secret fails: the
  RSA key only accepts RS256). Keys come only from the configuration (``jku``,
  ``x5u``, ``jwk`` headers are never used); any ``crit`` header and a non-string
  ``kid`` are refused. ``exp``, ``nbf`` (with leeway), ``iss`` and ``aud`` are
  checked, and registered claims must have their JSON types (NumericDate numbers).
  Every failure, whatever PyJWT raised, is an :class:`AuthError`. Keys come from
  the config, files, or a JWKS file; :meth:`KeyStore.reload` re-reads the files
  (the gateway calls it on reload).
* API keys: in a header or a query parameter; the config stores only their
  SHA-256, compared with :func:`hmac.compare_digest`; each key has a name and
  may carry its own rate limit.

This module knows neither HTTP nor gRPC: the edge's :mod:`meshkit.gateway.edge.auth`
and :mod:`meshkit.grpc.auth` read the credentials and answer the failures.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from meshkit._sections import (
    get_bool,
    get_duration,
    get_int,
    get_list,
    get_number,
    get_str,
    get_str_list,
    section,
)
from meshkit.errors import ConfigError

log = logging.getLogger("meshkit.gateway.auth")

ALLOWED_ALGORITHMS = ("HS256", "RS256", "ES256")
_FAMILY = {"HS256": "oct", "RS256": "RSA", "ES256": "EC"}


def bearer_token(authorization: str | bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme case-insensitive),
    or None for any other scheme or an empty token. Shared by the edge, its admin
    endpoint and the gRPC server interceptor, so all three read the header alike."""
    if authorization is None:
        return None
    text = authorization.decode("latin-1") if isinstance(authorization, bytes) else authorization
    scheme, _, rest = text.partition(" ")
    token = rest.strip()
    return token if scheme.lower() == "bearer" and token else None


class AuthError(Exception):
    """Authentication (401) or authorization (403) failed; ``reason`` is safe to show."""

    def __init__(
        self,
        reason: str,
        *,
        forbidden: bool = False,
        error: str = "invalid_token",
        missing: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.forbidden = forbidden
        self.error = error
        #: No credentials were sent at all: the challenge then carries no error code.
        self.missing = missing


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class KeySpec:
    """Where one verification key comes from (exactly one of secret/env/file)."""

    kid: str | None
    algorithm: str
    secret: str | None = None
    secret_env: str | None = None
    file: str | None = None


@dataclass(frozen=True, slots=True)
class LoadedKey:
    """A usable verification key pinned to its algorithms."""

    kid: str | None
    algorithms: tuple[str, ...]
    key: Any


class KeyStore:
    """Verification keys from specs and an optional JWKS file; :meth:`reload` re-reads."""

    def __init__(
        self,
        specs: Sequence[KeySpec] = (),
        jwks_file: str | None = None,
        base_dir: Path | None = None,
    ) -> None:
        self.specs = tuple(specs)
        self.jwks_file = jwks_file
        self.base_dir = base_dir or Path.cwd()
        self.keys: tuple[LoadedKey, ...] = ()
        self.generation = 0
        self.reload()

    def _path(self, name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else self.base_dir / p

    def reload(self) -> None:
        """Re-read every file-backed key; on error the old keys stay and ConfigError is raised."""
        keys: list[LoadedKey] = []
        for i, spec in enumerate(self.specs):
            where = f"auth.jwt.keys[{i}]"
            keys.append(LoadedKey(spec.kid, (spec.algorithm,), self._load_spec(spec, where)))
        if self.jwks_file:
            keys.extend(self._load_jwks(self._path(self.jwks_file)))
        self.keys = tuple(keys)
        self.generation += 1

    def _load_spec(self, spec: KeySpec, where: str) -> Any:
        if spec.secret is not None:
            material: bytes = spec.secret.encode()
        elif spec.secret_env is not None:
            val = os.environ.get(spec.secret_env)
            if val is None:
                raise ConfigError(
                    f"{where}.secret_env", f"environment variable {spec.secret_env} is not set"
                )
            material = val.encode()
        else:
            assert spec.file is not None
            try:
                material = self._path(spec.file).read_bytes()
            except OSError as exc:
                raise ConfigError(f"{where}.file", f"cannot read: {exc}") from exc
        if spec.algorithm == "HS256":
            # A public key used as an HMAC secret is the algorithm-confusion attack's setup.
            if material.lstrip().startswith(b"-----BEGIN"):
                raise ConfigError(where, "an HS256 secret must not be a PEM key")
            if len(material.strip()) < 32:
                raise ConfigError(where, "an HS256 secret needs at least 32 bytes")
            return material.strip() if spec.file else material
        try:
            algo = jwt.get_algorithm_by_name(spec.algorithm)
            return algo.prepare_key(material)
        except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"{where}.file", f"not a valid {spec.algorithm} public key: {exc}"
            ) from exc

    def _load_jwks(self, path: Path) -> list[LoadedKey]:
        try:
            doc = json.loads(path.read_text())
            jwks = jwt.PyJWKSet.from_dict(doc)
        except (OSError, ValueError, jwt.PyJWKSetError, jwt.InvalidKeyError) as exc:
            raise ConfigError("auth.jwt.jwks_file", f"cannot load {path}: {exc}") from exc
        out: list[LoadedKey] = []
        for k in jwks.keys:
            alg = k.algorithm_name
            if alg not in ALLOWED_ALGORITHMS:
                log.warning(
                    "JWKS key %s uses %s, which meshkit does not accept; skipped", k.key_id, alg
                )
                continue
            out.append(LoadedKey(k.key_id, (alg,), k.key))
        return out

    def candidates(self, kid: str | None, alg: str) -> list[LoadedKey]:
        """Keys that may verify a token with header ``kid`` and ``alg``."""
        return [
            k for k in self.keys if alg in k.algorithms and (kid is None or k.kid in (None, kid))
        ]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class RateSpec:
    """A rate limit value: ``rate`` per ``per`` seconds, bursts up to ``burst``."""

    rate: float
    per: float = 1.0
    burst: int = 0

    @property
    def effective_burst(self) -> int:
        """``burst``, or the rate rounded up when no burst is given."""
        return self.burst or max(1, int(self.rate + 0.999))

    @classmethod
    def from_mapping(cls, raw: Any, path: str) -> RateSpec:
        """From ``{rate: 10, per: 1s, burst: 20}``."""
        m = section(raw, path, ("rate", "per", "burst"))
        return cls(
            rate=get_number(m, "rate", path),
            per=get_duration(m, "per", path, 1.0),
            burst=get_int(m, "burst", path, 0),
        )


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A named API key, stored as the hex SHA-256 of the key."""

    name: str
    sha256: bytes
    rate_limit: RateSpec | None = None


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """Accepted issuers and audiences, leeway, and which claims go upstream."""

    issuer: tuple[str, ...] = ()
    audience: tuple[str, ...] = ()
    leeway: float = 0.0
    require: tuple[str, ...] = ("exp",)
    forward_claims: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthConfig:
    """The ``auth:`` section: JWT settings and keys, API keys and forwarding."""

    jwt: JwtSettings | None = None
    keys: KeyStore | None = None
    api_keys: tuple[ApiKey, ...] = ()
    api_key_header: str = "x-api-key"
    api_key_query: str | None = None
    forward_authorization: bool = True
    realm: str = "meshkit"

    @classmethod
    def from_mapping(cls, raw: Any, path: str = "auth", base_dir: Path | None = None) -> AuthConfig:
        """Validate an ``auth:`` section; errors name the key path."""
        m = section(raw, path, ("jwt", "api_keys", "forward_authorization", "realm"))
        settings: JwtSettings | None = None
        store: KeyStore | None = None
        if m.get("jwt") is not None:
            jp = f"{path}.jwt"
            j = section(
                m["jwt"],
                jp,
                ("issuer", "audience", "leeway", "keys", "jwks_file", "require", "forward_claims"),
            )
            specs: list[KeySpec] = []
            for i, k in enumerate(get_list(j, "keys", jp)):
                kp = f"{jp}.keys[{i}]"
                km = section(k, kp, ("kid", "algorithm", "secret", "secret_env", "file"))
                alg = get_str(km, "algorithm", kp)
                if alg not in ALLOWED_ALGORITHMS:
                    raise ConfigError(
                        f"{kp}.algorithm",
                        f"expected one of {', '.join(ALLOWED_ALGORITHMS)}, got {alg!r}",
                    )
                sources = [s for s in ("secret", "secret_env", "file") if s in km]
                if len(sources) != 1:
                    raise ConfigError(kp, "expected exactly one of secret, secret_env, file")
                if alg != "HS256" and sources[0] != "file":
                    raise ConfigError(kp, f"{alg} needs a public key file (file: ...)")
                specs.append(
                    KeySpec(
                        kid=get_str(km, "kid", kp, None),
                        algorithm=alg,
                        secret=get_str(km, "secret", kp, None),
                        secret_env=get_str(km, "secret_env", kp, None),
                        file=get_str(km, "file", kp, None),
                    )
                )
            jwks = get_str(j, "jwks_file", jp, None)
            if not specs and not jwks:
                raise ConfigError(jp, "needs keys or jwks_file")
            settings = JwtSettings(
                issuer=get_str_list(j, "issuer", jp),
                audience=get_str_list(j, "audience", jp),
                leeway=get_duration(j, "leeway", jp, 0.0, positive=False),
                require=get_str_list(j, "require", jp) or ("exp",),
                forward_claims=get_str_list(j, "forward_claims", jp),
            )
            store = KeyStore(specs, jwks, base_dir)
        api_keys: list[ApiKey] = []
        header_name, query_name = "x-api-key", None
        if m.get("api_keys") is not None:
            ap = f"{path}.api_keys"
            a = section(m["api_keys"], ap, ("header", "query", "keys"))
            header_name = get_str(a, "header", ap, "x-api-key").lower()
            query_name = get_str(a, "query", ap, None)
            seen: set[str] = set()
            for i, k in enumerate(get_list(a, "keys", ap)):
                kp = f"{ap}.keys[{i}]"
                km = section(k, kp, ("name", "sha256", "rate_limit"))
                name = get_str(km, "name", kp)
                if name in seen:
                    raise ConfigError(f"{kp}.name", f"duplicate API key name {name!r}")
                seen.add(name)
                digest = get_str(km, "sha256", kp).lower()
                try:
                    raw_digest = bytes.fromhex(digest)
                except ValueError:
                    raw_digest = b""
                if len(raw_digest) != 32:
                    raise ConfigError(
                        f"{kp}.sha256", "expected 64 hex digits (the SHA-256 of the key)"
                    )
                rl = (
                    RateSpec.from_mapping(km["rate_limit"], f"{kp}.rate_limit")
                    if km.get("rate_limit")
                    else None
                )
                api_keys.append(ApiKey(name, raw_digest, rl))
        return cls(
            jwt=settings,
            keys=store,
            api_keys=tuple(api_keys),
            api_key_header=header_name,
            api_key_query=query_name,
            forward_authorization=get_bool(m, "forward_authorization", path, True),
            realm=get_str(m, "realm", path, "meshkit"),
        )


def hash_api_key(key: str) -> str:
    """The hex SHA-256 to put in the config for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: from a JWT (``subject``, ``claims``) or an API key (``key``)."""

    kind: str
    subject: str
    claims: Mapping[str, Any] = field(default_factory=dict)
    key: ApiKey | None = None

    def scopes(self) -> frozenset[str]:
        """``scope`` (space separated) and ``scp`` (list or string) claims together."""
        out: set[str] = set()
        for name in ("scope", "scp"):
            v = self.claims.get(name)
            if isinstance(v, str):
                out.update(v.split())
            elif isinstance(v, list):
                out.update(str(x) for x in v)
        return frozenset(out)


class Authenticator:
    """Verifies JWTs and API keys against an :class:`AuthConfig`."""

    def __init__(self, config: AuthConfig, *, memo_size: int = 4096) -> None:
        self.config = config
        # Verified tokens, until the earlier of their exp and 60 s: a client sends the same
        # token on every request, and signature checks dominate auth's cost.
        self._memo: collections.OrderedDict[str, tuple[float, Principal]] = (
            collections.OrderedDict()
        )
        self._memo_size = memo_size
        self._memo_generation = -1

    def verify_jwt(self, token: str) -> Principal:
        """Verify ``token``; raise :class:`AuthError` with a safe reason."""
        store = self.config.keys
        generation = store.generation if store is not None else 0
        if generation != self._memo_generation:  # keys changed: forget what they verified
            self._memo.clear()
            self._memo_generation = generation
        hit = self._memo.get(token)
        if hit is not None:
            if hit[0] > time.time():
                return hit[1]
            self._memo.pop(token, None)
        p = self._verify_jwt(token)
        exp = p.claims.get("exp")
        until = time.time() + 60.0
        if isinstance(exp, int | float):
            until = min(until, float(exp) + (self.config.jwt.leeway if self.config.jwt else 0.0))
        self._memo[token] = (until, p)
        if len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return p

    def _verify_jwt(self, token: str) -> Principal:
        cfg, store = self.config.jwt, self.config.keys
        if cfg is None or store is None:
            raise AuthError("bearer tokens are not accepted here")
        try:
            head = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            # DecodeError (segments, base64, JSON) and PyJWT's own header checks (a kid
            # that is not a string, a malformed crit) alike: all mean a malformed token.
            raise AuthError("malformed token") from None
        # RFC 7515 §4.1.11: a recipient must refuse a token naming critical extensions it
        # does not understand. meshkit implements none (not even PyJWT's b64), so any crit
        # is refused, before a signature is checked.
        if "crit" in head:
            raise AuthError("token has critical header extensions (crit), none is supported")
        alg = head.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            # The value is not echoed: it is client-controlled text.
            raise AuthError("token algorithm is not allowed")
        kid = head.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("token key id (kid) must be a string")
        # Keys come only from the configuration: jku, x5u, jwk and x5c headers are never
        # consulted (RFC 8725 §3.10), so a token cannot bring its own key.
        keys = store.candidates(kid, alg)
        if not keys:
            raise AuthError("no key accepts this token (unknown kid or algorithm)")
        options: Any = {
            "require": list(cfg.require),
            "verify_aud": bool(cfg.audience),
            "verify_iss": bool(cfg.issuer),
        }
        last: AuthError | None = None
        for k in keys:
            try:
                claims = jwt.decode(
                    token,
                    key=k.key,
                    algorithms=list(k.algorithms),
                    audience=list(cfg.audience) or None,
                    issuer=list(cfg.issuer) or None,
                    leeway=cfg.leeway,
                    options=options,
                )
            except jwt.InvalidSignatureError:
                last = AuthError("token signature is invalid")
                continue
            except jwt.ExpiredSignatureError:
                raise AuthError("token has expired") from None
            except jwt.ImmatureSignatureError:
                raise AuthError("token is not valid yet (nbf)") from None
            except jwt.InvalidAudienceError:
                raise AuthError("token audience is not accepted") from None
            except jwt.InvalidIssuerError:
                raise AuthError("token issuer is not accepted") from None
            except jwt.MissingRequiredClaimError as exc:
                raise AuthError(f"token lacks the {exc.claim!r} claim") from None
            except (jwt.InvalidKeyError, jwt.InvalidAlgorithmError):
                last = AuthError("token algorithm does not match the key")
                continue
            except jwt.InvalidTokenError:
                raise AuthError("token is invalid") from None
            except Exception as exc:
                # Fail closed: a token that trips anything else in PyJWT or the crypto
                # backend is refused like any invalid one. One line, no traceback, and
                # only the exception's type (its text could quote the token).
                log.warning("JWT verification failed unexpectedly: %s", type(exc).__name__)
                raise AuthError("token is invalid") from None
            _check_claim_types(claims)
            return Principal("jwt", str(claims.get("sub", "")), claims)
        raise last or AuthError("token signature is invalid")

    def verify_api_key(self, presented: str) -> Principal:
        """Find the key whose hash matches; every stored hash is compared (constant time)."""
        digest = hashlib.sha256(presented.encode()).digest()
        found: ApiKey | None = None
        for k in self.config.api_keys:
            if hmac.compare_digest(digest, k.sha256) and found is None:
                found = k
        if found is None:
            raise AuthError("API key is not recognised", error="invalid_key")
        return Principal("api_key", found.name, {}, found)


def _check_claim_types(claims: Mapping[str, Any]) -> None:
    """Refuse registered claims of the wrong JSON type (RFC 7519 §4.1).

    PyJWT passes ``int(value)`` of the time claims, so ``"exp": "99999999999"`` or
    ``"iat": true`` would be taken; RFC 7519 says NumericDate is a JSON number (Envoy
    refuses the others too). ``iss``/``sub`` are StringOrURI, ``aud`` one or a list.
    """
    for name in ("exp", "nbf", "iat"):
        v = claims.get(name)
        if name in claims and (
            isinstance(v, bool) or not isinstance(v, int | float) or v != v  # NaN
        ):
            raise AuthError(f"token claim {name!r} must be a number (NumericDate)")
    for name in ("iss", "sub"):
        if name in claims and not isinstance(claims[name], str):
            raise AuthError(f"token claim {name!r} must be a string")
    aud = claims.get("aud")
    if "aud" in claims and not (
        isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        raise AuthError("token claim 'aud' must be a string or a list of strings")
