"""Bearer credentials -> Principal, for FastAPI routes and for the MCP endpoint.

Two kinds of bearer are accepted: the gateway's API keys (`kgw_...`, also as `X-API-Key`) and, when
`KGW_OIDC_ISSUER` is set, OAuth 2.1 access tokens (JWTs) from that issuer. Keys arrive in headers, never
in URLs. A key whose shape or checksum is wrong is refused without a store lookup. Verified keys are
cached per replica for at most `CACHE_TTL_S`, and revocations are broadcast through Redis so every replica
forgets the key at once; the TTL bounds the delay even if a broadcast is lost. Nothing here logs a key.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import KNOWN_ERRORS, Forbidden, Unauthorized, error_response, gateway_error_from
from app.images import Principal
from app.lifecycle import subscribed
from app.logs import bind_tenant
from app.oauth import InsufficientScope, InvalidToken, OAuthConfig, OAuthVerifier, looks_like_jwt, www_authenticate
from app.tenants import Caller, TenantDirectory

logger = logging.getLogger(__name__)
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)

CACHE_TTL_S = 1.0  # a revoked key is refused by every replica within this, even if a broadcast is lost
CACHE_MAX_ENTRIES = 10_000
TOUCH_INTERVAL_S = 60.0  # last-used time is written at most this often per key and replica
MAX_BEARER_CHARS = 8192

_bearer = HTTPBearer(auto_error=False, description="An API key (kgw_...) or an OAuth access token")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


class OAuthChallenge:
    """How 401/403 answers point OAuth clients at the protected-resource metadata (RFC 9728)."""

    def __init__(self, config: OAuthConfig, verifier: OAuthVerifier, metadata_url: str) -> None:
        self.config = config
        self.verifier = verifier
        self.metadata_url = metadata_url

    def header(self, error: str, description: str) -> str:
        return www_authenticate(self.config, error, description, self.metadata_url)


class Authenticator:
    def __init__(self, directory: TenantDirectory, oauth: OAuthChallenge | None = None) -> None:
        self._directory = directory
        self._oauth = oauth
        self._cache: dict[str, tuple[float, Caller]] = {}
        self._touched: dict[str, float] = {}

    async def authenticate(self, bearer: str | None) -> Principal:
        """The principal behind a bearer; raises Unauthorized (or Forbidden for a token lacking scopes)."""
        if not bearer:
            raise self._unauthorized("an API key is required: send 'Authorization: Bearer kgw_...'")
        if len(bearer) > MAX_BEARER_CHARS:
            raise self._unauthorized("the credential is too long")
        if self._oauth is not None and looks_like_jwt(bearer):
            return await self._authenticate_token(self._oauth, bearer)
        return await self._authenticate_key(bearer)

    async def _authenticate_key(self, api_key: str) -> Principal:
        key_format = self._directory.key_format
        parsed = key_format.parse(api_key)
        if parsed is None:
            other_environment = key_format.is_gateway_key(api_key) and not api_key.startswith(key_format.prefix + "_")
            raise self._unauthorized(
                "the API key belongs to another environment" if other_environment else "the API key is malformed"
            )
        key_id, secret = parsed
        caller = await self._cached_caller(key_id)
        if caller is None or not self._directory.admits(caller.key, secret):
            raise self._unauthorized("the API key is unknown, revoked or expired")
        await self._touch(key_id)
        return Principal(caller.tenant, caller.credential_id, caller.kling, caller.concurrency, key_id)

    async def _cached_caller(self, key_id: str) -> Caller | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        record = await self._directory.store.get_key(key_id)
        caller = await self._directory.caller_for(record) if record is not None else None
        if caller is not None:
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[key_id] = (now + CACHE_TTL_S, caller)
        return caller

    async def _touch(self, key_id: str) -> None:
        now = time.time()
        if now - self._touched.get(key_id, 0.0) < TOUCH_INTERVAL_S:
            return
        self._touched[key_id] = now
        try:
            await self._directory.store.touch_key(key_id, now)
        except RedisError:
            logger.warning("could not record last use of key %s", key_id)

    async def _authenticate_token(self, oauth: OAuthChallenge, token: str) -> Principal:
        try:
            identity = await oauth.verifier.verify(token)
        except InsufficientScope as exc:
            message = f"the token lacks the scopes {' '.join(exc.required)}"
            raise Forbidden(message, oauth.header("insufficient_scope", message)) from exc
        except InvalidToken as exc:
            raise self._unauthorized(str(exc)) from exc
        tenant = await self._directory.store.get_tenant(identity.tenant_ref)
        tenant = tenant or await self._directory.store.find_tenant(identity.tenant_ref)
        if tenant is None:
            raise self._unauthorized("the token names no known tenant")
        credential = await self._directory.account_of(tenant)
        if credential is None:
            raise self._unauthorized("the tenant has no Kling credential")
        kling = self._directory.kling_credentials(credential)
        return Principal(tenant, credential.id, kling, credential.concurrency, f"oauth:{identity.subject}")

    def _unauthorized(self, message: str) -> Unauthorized:
        challenge = self._oauth.header("invalid_token", message) if self._oauth is not None else None
        return Unauthorized(message, challenge)

    def forget(self, key_or_tenant: str) -> None:
        """Drop a key (or, for `tenant:<id>`, every key of a tenant) from this replica's cache."""
        if key_or_tenant.startswith("tenant:"):
            tenant_id = key_or_tenant.removeprefix("tenant:")
            self._cache = {k: v for k, v in self._cache.items() if v[1].tenant.id != tenant_id}
        else:
            self._cache.pop(key_or_tenant, None)

    def forget_all(self) -> None:
        self._cache.clear()


class KeyChangeBroadcast:
    """Redis pub/sub that tells every replica to forget a key (or a tenant's keys) at once."""

    def __init__(self, redis: Redis, channel: str = "kgw:auth-changes") -> None:
        self._redis = redis
        self._channel = channel

    async def publish(self, key_or_tenant: str) -> None:
        await self._redis.publish(self._channel, key_or_tenant)

    def listening(self, authenticator: Authenticator) -> contextlib.AbstractAsyncContextManager[None]:
        """Forget what is announced; after any gap, forget everything (messages sent meanwhile are lost)."""
        return subscribed(self._redis, self._channel, authenticator.forget, authenticator.forget_all)


def bearer_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return x_api_key.strip() if x_api_key else None


def principal_dependency(authenticator: Authenticator) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency that authenticates the caller (and documents both schemes in OpenAPI)."""

    async def principal(
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        x_api_key: Annotated[str | None, Depends(_api_key_header)],
    ) -> Principal:
        token = bearer.credentials if bearer else (x_api_key.strip() if x_api_key else None)
        found = await authenticator.authenticate(token)
        bind_tenant(found.tenant.id)
        return found

    return principal


class McpAuthMiddleware:
    """Pure ASGI (safe in front of SSE): authenticates every HTTP request it is handed (`McpTransports` hands it
    only the MCP transports' paths) and exposes the principal to tools through `current_principal`, which the
    SDK carries into tool calls."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self._app = app
        self._authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        bearer = bearer_from_headers(headers.get("authorization"), headers.get("x-api-key"))
        try:
            principal = await self._authenticator.authenticate(bearer)
        except KNOWN_ERRORS as exc:
            error = gateway_error_from(exc)
            assert error is not None
            await error_response(error)(scope, receive, send)
            return
        bind_tenant(principal.tenant.id)
        token = current_principal.set(principal)
        try:
            await self._app(scope, receive, send)
        finally:
            current_principal.reset(token)
