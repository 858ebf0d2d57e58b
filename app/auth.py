"""Bearer API keys -> Principal, for FastAPI routes and for the MCP endpoint.

Keys arrive as `Authorization: Bearer kgw_...` (or `X-API-Key: kgw_...`), never in URLs. A key that is
not even well-formed is refused without a store lookup. Nothing here logs a key.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import Unauthorized
from app.images import Principal
from app.tenants import TenantDirectory, parse_api_key

current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)

_bearer = HTTPBearer(auto_error=False, description="An API key issued by the gateway: kgw_<key id>_<secret>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


class Authenticator:
    def __init__(self, directory: TenantDirectory) -> None:
        self._directory = directory

    async def authenticate(self, api_key: str | None) -> Principal:
        """The principal behind `api_key`; raises Unauthorized for a missing, malformed, unknown or revoked key."""
        if not api_key:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer kgw_...'")
        if parse_api_key(api_key) is None:
            raise Unauthorized("the API key is malformed")
        verified = await self._directory.verify_key(api_key)
        if verified is None:
            raise Unauthorized("the API key is unknown or revoked")
        record, tenant = verified
        return Principal(tenant=tenant, key_id=record.key_id)


def api_key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return x_api_key.strip() if x_api_key else None


def principal_dependency(authenticator: Authenticator) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency that authenticates the caller (and documents both schemes in OpenAPI)."""

    async def principal(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        x_api_key: Annotated[str | None, Depends(_api_key_header)],
    ) -> Principal:
        api_key = bearer.credentials if bearer else (x_api_key.strip() if x_api_key else None)
        found = await authenticator.authenticate(api_key)
        request.state.tenant_id = found.tenant.id
        return found

    return principal


class McpAuthMiddleware:
    """Pure ASGI (safe in front of SSE): authenticates every request to the MCP endpoint and exposes the
    principal to tools through `current_principal`, which the SDK carries into tool calls."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator, path_prefix: str = "/mcp") -> None:
        self._app = app
        self._authenticator = authenticator
        self._prefix = path_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self._prefix):
            await self._app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        api_key = api_key_from_headers(headers.get("authorization"), headers.get("x-api-key"))
        try:
            principal = await self._authenticator.authenticate(api_key)
        except Unauthorized as exc:
            await _send_unauthorized(send, exc)
            return
        token = current_principal.set(principal)
        try:
            await self._app(scope, receive, send)
        finally:
            current_principal.reset(token)


async def _send_unauthorized(send: Send, exc: Unauthorized) -> None:
    body = json.dumps(exc.to_json()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in exc.http_headers().items()]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})
