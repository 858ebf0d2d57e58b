"""OAuth 2.1 resource-server side: verify JWT access tokens issued by an external authorization server.

The gateway never issues tokens. It checks a bearer JWT against the issuer's JWKS (fetched asynchronously with
the gateway's own HTTP client, cached, refetched at most once per window for an unknown `kid`), requires the
token to be addressed to this gateway (`aud`), and maps a claim to the tenant. Nothing here logs a token or
puts one (or any part of one) in an exception message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx2
import jwt

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 5.0
"""Bound on each request to the issuer (discovery document, JWKS)."""
MIN_REFETCH_INTERVAL_S = 30.0
"""At most one refetch per this many seconds for tokens whose `kid` is unknown."""
RETRY_AFTER_FAILURE_S = 5.0
"""After a failed fetch, the next attempt waits this long (an issuer outage must not turn into a flood)."""
MAX_TOKEN_CHARS = 16_384
RESOURCE_NAME = "Kling MCP Gateway"

_FORBIDDEN_ALGORITHMS = re.compile(r"^(none|HS\d+)$", re.IGNORECASE)
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_REQUIRED_CLAIMS = ["exp", "iss", "aud"]


@dataclass(frozen=True)
class OAuthConfig:
    issuer: str
    audience: str
    jwks_url: str | None = None
    tenant_claim: str = "tenant"
    required_scopes: tuple[str, ...] = ("images:generate",)
    algorithms: tuple[str, ...] = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")
    leeway_s: int = 30
    jwks_cache_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("OAuth needs an issuer and an audience")
        if not self.algorithms:
            raise ValueError("OAuth needs at least one allowed algorithm")
        refused = [alg for alg in self.algorithms if _FORBIDDEN_ALGORITHMS.match(alg)]
        if refused:
            raise ValueError(f"algorithms {refused} are not allowed for access tokens (only asymmetric ones)")
        if not self.tenant_claim:
            raise ValueError("OAuth needs a tenant claim")


@dataclass(frozen=True)
class OAuthIdentity:
    tenant_ref: str
    subject: str
    scopes: frozenset[str]
    expires_at: int


class OAuthError(Exception):
    """Base class; str(exc) is a short description that is safe to send to the client."""


class InvalidToken(OAuthError):
    """The caller answers 401 with error="invalid_token"."""


class InsufficientScope(OAuthError):
    """The caller answers 403 with error="insufficient_scope"."""

    def __init__(self, required: tuple[str, ...]) -> None:
        super().__init__(f"this requires the scope(s): {' '.join(required)}")
        self.required = required


class _Key:
    """One signing key of the issuer's JWKS, with its JWK kept so an `alg`-less key can verify RS384/PS256 too."""

    def __init__(self, jwk: dict[str, Any], parsed: jwt.PyJWK) -> None:
        self.kid: str | None = parsed.key_id
        self.declared_alg: object = jwk.get("alg")
        self._jwk = jwk
        self._by_alg: dict[str, jwt.PyJWK] = {parsed.algorithm_name: parsed}

    def for_algorithm(self, alg: str) -> jwt.PyJWK:
        """The key bound to `alg`; a JWK that names its `alg` only serves that one (RFC 8725 §3.1)."""
        if alg in self._by_alg:
            return self._by_alg[alg]
        if self.declared_alg is not None:
            raise InvalidToken("the token's algorithm does not match its key")
        try:
            variant = jwt.PyJWK(self._jwk, algorithm=alg)  # refuses a key of another type (an EC key for RS256)
        except jwt.PyJWTError:
            raise InvalidToken("the token's algorithm does not match its key") from None
        self._by_alg[alg] = variant
        return variant


class OAuthVerifier:
    def __init__(
        self,
        config: OAuthConfig,
        http: httpx2.AsyncClient,
        *,
        min_refetch_interval_s: float = MIN_REFETCH_INTERVAL_S,
    ) -> None:
        self._config = config
        self._http = http
        self._issuer = _strip_slash(config.issuer)
        self._min_refetch_interval_s = min_refetch_interval_s
        self._jwks_url = config.jwks_url
        self._keys: tuple[_Key, ...] = ()
        self._loaded_at = 0.0
        self._last_attempt: float | None = None
        self._last_refetch: float | None = None  # the last refetch caused by an unknown kid
        self._last_ok = False
        self._generation = 0  # bumped after every fetch attempt: waiters on the lock reuse its outcome
        self._lock = asyncio.Lock()

    async def verify(self, token: str) -> OAuthIdentity:
        """The identity behind `token`; raises InvalidToken (401) or InsufficientScope (403)."""
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise InvalidToken("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._config.algorithms:
            # Before any key is touched: refuses `alg: none` and HS256 signed with a public key as the secret.
            raise InvalidToken("token algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed token")

        key = await self._signing_key(kid)
        payload = self._decode(token, key.for_algorithm(alg), alg)
        return self._identity(payload)

    def _decode(self, token: str, key: jwt.PyJWK, alg: str) -> dict[str, Any]:
        try:
            payload = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self._config.audience,
                options={"require": _REQUIRED_CLAIMS, "verify_iat": True, "verify_nbf": True},
                leeway=self._config.leeway_s,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.MissingRequiredClaimError as exc:
            claim = exc.claim if exc.claim in _REQUIRED_CLAIMS else "a required"
            raise InvalidToken(f"token lacks the {claim} claim") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.InvalidAlgorithmError:
            raise InvalidToken("token algorithm not allowed") from None
        except jwt.InvalidIssuedAtError:
            raise InvalidToken("invalid iat claim") from None
        except jwt.DecodeError:
            raise InvalidToken("malformed token") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise InvalidToken("invalid token") from None
        iss = payload.get("iss")
        if not isinstance(iss, str) or _strip_slash(iss) != self._issuer:
            raise InvalidToken("wrong issuer")
        return payload

    def _identity(self, payload: Mapping[str, Any]) -> OAuthIdentity:
        tenant = payload.get(self._config.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise InvalidToken(f"token lacks the {self._config.tenant_claim} claim")
        subject = payload.get("sub")
        if not isinstance(subject, str) or not subject:
            subject = payload.get("client_id")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("token has no subject")
        scopes = _scopes(payload)
        if not set(self._config.required_scopes) <= scopes:
            raise InsufficientScope(self._config.required_scopes)
        return OAuthIdentity(tenant_ref=tenant, subject=subject, scopes=scopes, expires_at=int(payload["exp"]))

    # --- keys ---------------------------------------------------------------------------------------------------

    async def _signing_key(self, kid: str | None) -> _Key:
        found = self._find(kid) if self._fresh() else None
        if found is not None:
            return found
        generation = self._generation
        async with self._lock:
            if self._generation == generation and self._may_fetch(kid):
                await self._refresh()
        found = self._find(kid)
        if found is not None:
            return found
        if not self._keys:
            raise InvalidToken("cannot fetch the issuer's signing keys")
        if kid is None:
            raise InvalidToken("token has no key id")
        raise InvalidToken("unknown signing key")

    def _fresh(self) -> bool:
        return bool(self._keys) and time.monotonic() - self._loaded_at < self._config.jwks_cache_s

    def _find(self, kid: str | None) -> _Key | None:
        if kid is None:
            return self._keys[0] if len(self._keys) == 1 else None
        return next((key for key in self._keys if key.kid == kid), None)

    def _may_fetch(self, kid: str | None) -> bool:
        now = time.monotonic()
        if self._last_attempt is None:
            return True
        if not self._last_ok:
            return now - self._last_attempt >= RETRY_AFTER_FAILURE_S
        if not self._fresh():
            return True  # the cache expired: an ordinary refresh
        if kid is None:
            return False  # a fresh set cannot gain a kid-less match by refetching
        # An unknown kid: a rotation, or garbage. Only these refetches are rationed.
        if self._last_refetch is not None and now - self._last_refetch < self._min_refetch_interval_s:
            return False
        self._last_refetch = now
        return True

    async def _refresh(self) -> None:
        self._last_attempt = time.monotonic()
        try:
            keys = await self._fetch_keys()
        except (httpx2.HTTPError, TimeoutError, ValueError, TypeError, jwt.PyJWTError) as exc:
            # Stale keys (if any) stay in use: an issuer outage does not log everyone out.
            self._last_ok = False
            logger.warning("fetching the OAuth signing keys of %s failed: %s", self._issuer, type(exc).__name__)
        else:
            self._keys = keys
            self._loaded_at = time.monotonic()
            self._last_ok = True
        finally:
            self._generation += 1

    async def _fetch_keys(self) -> tuple[_Key, ...]:
        if self._jwks_url is None:
            self._jwks_url = await self._discover_jwks_url()
        document = await self._get_json(self._jwks_url)
        raw = document.get("keys")
        if not isinstance(raw, list):
            raise ValueError("the JWKS has no keys")
        usable = [
            jwk
            for jwk in raw
            if isinstance(jwk, dict) and jwk.get("use", "sig") == "sig" and jwk.get("kty") not in (None, "oct")
        ]
        # PyJWKSet.from_dict's own rule, per key: unusable keys (unknown kty/crv) are skipped, not fatal.
        keys: list[_Key] = []
        for jwk in usable:
            try:
                keys.append(_Key(jwk, jwt.PyJWK.from_dict(jwk)))
            except jwt.PyJWTError:
                continue
        if not keys:
            raise ValueError("the JWKS has no usable signing keys")
        return tuple(keys)

    async def _discover_jwks_url(self) -> str:
        for url in _metadata_urls(self._issuer):
            try:
                document = await self._get_json(url)
            except (httpx2.HTTPError, TimeoutError, ValueError):
                continue
            issuer = document.get("issuer")
            if issuer is not None and (not isinstance(issuer, str) or _strip_slash(issuer) != self._issuer):
                logger.warning("the metadata at %s names another issuer; ignored", url)
                continue
            jwks_uri = document.get("jwks_uri")
            if isinstance(jwks_uri, str) and jwks_uri:
                return jwks_uri
        raise ValueError("no authorization server metadata with a jwks_uri")

    async def _get_json(self, url: str) -> dict[str, Any]:
        async with asyncio.timeout(FETCH_TIMEOUT_S):
            response = await self._http.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        document = response.json()
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        return document


def _scopes(payload: Mapping[str, Any]) -> frozenset[str]:
    scopes: set[str] = set()
    for claim in ("scope", "scp"):
        value = payload.get(claim)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(item for item in value if isinstance(item, str) and item)
    return frozenset(scopes)


def _strip_slash(value: str) -> str:
    return value[:-1] if value.endswith("/") else value


def _metadata_urls(issuer: str) -> list[str]:
    """OIDC discovery, then RFC 8414 (appended, and for an issuer with a path also the inserted form)."""
    urls = [f"{issuer}/.well-known/openid-configuration", f"{issuer}/.well-known/oauth-authorization-server"]
    parts = urlsplit(issuer)
    if parts.path not in ("", "/"):
        urls.append(f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path}")
    return urls


def looks_like_jwt(token: str) -> bool:
    """A cheap syntactic check (three base64url segments, a JSON header with "alg"); verifies nothing."""
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        return False
    header, payload, signature = token.split(".")
    if not header or not payload or not all(_BASE64URL.match(part) for part in (header, payload, signature)):
        return False
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(decoded, dict) and isinstance(decoded.get("alg"), str)


def protected_resource_metadata(config: OAuthConfig) -> dict[str, object]:
    """The RFC 9728 protected-resource metadata document for this gateway."""
    return {
        "resource": config.audience,
        "authorization_servers": [config.issuer],
        "scopes_supported": list(config.required_scopes),
        "bearer_methods_supported": ["header"],
        "resource_name": RESOURCE_NAME,
    }


def www_authenticate(config: OAuthConfig, error: str, description: str, metadata_url: str) -> str:
    """An RFC 6750 `WWW-Authenticate` value with the RFC 9728 `resource_metadata` parameter."""
    params = [f"error={_quote(error)}", f"error_description={_quote(description)}"]
    if error == "insufficient_scope":
        params.append(f"scope={_quote(' '.join(config.required_scopes))}")
    params.append(f"resource_metadata={_quote(metadata_url)}")
    return "Bearer " + ", ".join(params)


def _quote(value: str) -> str:
    """A quoted-string: printable ASCII only (no header injection), with backslash and quote escaped."""
    printable = "".join(char if " " <= char <= "~" else " " for char in value)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'
