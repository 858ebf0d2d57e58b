"""REST routes for administrators: tenants and their API keys. Mounted only when KGW_ADMIN_TOKEN is set."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from app.errors import Forbidden, NotFound, Unauthorized
from app.kling import KlingCredentials
from app.tenants import ApiKeyRecord, Tenant, TenantDirectory, parse_api_key

_admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken", description="KGW_ADMIN_TOKEN")


class KlingCredentialsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    access_key: Annotated[str, Field(min_length=1, max_length=256)]
    secret_key: Annotated[SecretStr, Field(min_length=1, max_length=256)]


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")]
    kling: KlingCredentialsIn
    concurrency: Annotated[int, Field(ge=1, le=1000, description="Images the Kling account may have in flight")] = 5


class KlingCredentialsOut(BaseModel):
    access_key: str


class TenantOut(BaseModel):
    id: str
    name: str
    created_at: float
    kling: KlingCredentialsOut
    concurrency: int

    @classmethod
    def of(cls, tenant: Tenant) -> TenantOut:
        return cls(
            id=tenant.id,
            name=tenant.name,
            created_at=tenant.created_at,
            kling=KlingCredentialsOut(access_key=tenant.kling.access_key),
            concurrency=tenant.concurrency,
        )


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: Annotated[str, Field(max_length=100)] = ""


class KeyOut(BaseModel):
    key_id: str
    tenant_id: str
    label: str
    created_at: float
    revoked_at: float | None

    @classmethod
    def of(cls, record: ApiKeyRecord) -> KeyOut:
        return cls(
            key_id=record.key_id,
            tenant_id=record.tenant_id,
            label=record.label,
            created_at=record.created_at,
            revoked_at=record.revoked_at,
        )


class IssuedKeyOut(KeyOut):
    api_key: str = Field(description="The full key. It is shown only this once.")


def admin_dependency(admin_token: SecretStr) -> Callable[..., Awaitable[None]]:
    expected = admin_token.get_secret_value().encode()

    async def require_admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
    ) -> None:
        presented = credentials.credentials if credentials else ""
        if hmac.compare_digest(presented.encode(), expected):
            return
        if parse_api_key(presented) is not None:
            raise Forbidden("tenant API keys cannot use the admin API")
        raise Unauthorized("the admin token is missing or wrong")

    return require_admin


def build_admin_router(directory: TenantDirectory, admin_token: SecretStr) -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin_dependency(admin_token))])

    @router.post("/tenants", status_code=201)
    async def create_tenant(body: TenantIn) -> TenantOut:
        credentials = KlingCredentials(body.kling.access_key, body.kling.secret_key.get_secret_value())
        return TenantOut.of(await directory.create_tenant(body.name, credentials, body.concurrency))

    @router.get("/tenants")
    async def list_tenants() -> list[TenantOut]:
        return [TenantOut.of(tenant) for tenant in await directory.store.list_tenants()]

    @router.post("/tenants/{tenant_id}/keys", status_code=201)
    async def issue_key(tenant_id: str, body: KeyIn | None = None) -> IssuedKeyOut:
        issued = await directory.issue_key(tenant_id, body.label if body else "")
        return IssuedKeyOut(**KeyOut.of(issued.record).model_dump(), api_key=issued.api_key)

    @router.get("/tenants/{tenant_id}/keys")
    async def list_keys(tenant_id: str) -> list[KeyOut]:
        if await directory.store.get_tenant(tenant_id) is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        return [KeyOut.of(record) for record in await directory.store.list_keys(tenant_id)]

    @router.delete("/keys/{key_id}", status_code=204)
    async def revoke_key(key_id: str) -> Response:
        await directory.revoke_key(key_id)
        return Response(status_code=204)

    return router
