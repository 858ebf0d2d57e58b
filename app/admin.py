"""REST routes for administrators: credentials, tenants, keys, usage and the audit log.

Mounted only when KGW_ADMIN_TOKEN is set. Every change is written to the audit log (who, what, when;
never a secret). Secrets go in once and never come out: responses carry access keys and key ids only.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from app.errors import Forbidden, InvalidRequest, Unauthorized
from app.models import FieldProblem
from app.tenant_schemas import KlingBaseUrl, LimitsIn, PolicyIn, StaticApiKey, TenantName
from app.tenants import ApiKeyRecord, Credential, KeyFormat, Tenant, TenantDirectory
from app.usage import AuditEntry, DailyUsage
from app.webhooks import new_webhook_secret

if TYPE_CHECKING:
    from app.main import Stores

ACTOR = "admin-api"
_admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken", description="KGW_ADMIN_TOKEN")


class CredentialIn(BaseModel):
    """A Kling account by its access key and secret key, or by a static API key made in Kling's console."""

    model_config = ConfigDict(extra="forbid")
    access_key: Annotated[str | None, Field(min_length=1, max_length=256)] = None
    secret_key: Annotated[SecretStr | None, Field(min_length=1, max_length=256)] = None
    api_key: Annotated[StaticApiKey | None, Field(description="Instead of the two keys: a static API key, sent to "
                                                  "Kling as it is")] = None  # fmt: skip
    concurrency: Annotated[int, Field(ge=1, le=1000, description="Images the Kling account may have in flight")] = 5
    base_url: KlingBaseUrl = None

    @model_validator(mode="after")
    def _one_kind(self) -> CredentialIn:
        if self.api_key is not None:
            if self.access_key is not None or self.secret_key is not None:
                raise FieldProblem("api_key", "is given instead of access_key and secret_key, not with them")
        elif self.access_key is None or self.secret_key is None:
            raise FieldProblem("access_key", "and secret_key are required (or an api_key instead)")
        return self

    async def added_to(self, directory: TenantDirectory) -> Credential:
        """The credential this names, created in `directory` (or the existing one, as `add_credential` says)."""
        if self.api_key is not None:
            key = self.api_key.get_secret_value()
            return await directory.add_api_key_credential(key, self.concurrency, base_url=self.base_url)
        assert self.access_key is not None
        assert self.secret_key is not None
        return await directory.add_credential(self.access_key, self.secret_key.get_secret_value(), self.concurrency,
                                              base_url=self.base_url)  # fmt: skip


class CredentialOut(BaseModel):
    id: str
    access_key: str = Field(description="The access key; for a static API key, a label derived from it")
    kind: Literal["access_key", "api_key"]
    concurrency: int
    created_at: float
    base_url: str | None = Field(description="The account's Kling API; null: the gateway's KGW_KLING_BASE_URL")

    @classmethod
    def of(cls, credential: Credential) -> CredentialOut:
        return cls(id=credential.id, access_key=credential.access_key, concurrency=credential.concurrency,
                   kind="api_key" if credential.static_key else "access_key", created_at=credential.created_at,
                   base_url=credential.base_url)  # fmt: skip


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: TenantName
    kling: CredentialIn | None = Field(default=None, description="A Kling account (reused if its access key exists)")
    credential_ids: list[str] | None = Field(default=None, description="Existing credentials; the first runs tasks")
    policy: PolicyIn = Field(default_factory=PolicyIn)
    limits: LimitsIn = Field(default_factory=LimitsIn)


class TenantOut(BaseModel):
    id: str
    name: str
    created_at: float
    credential_ids: list[str]
    policy: PolicyIn
    limits: LimitsIn
    has_webhook_secret: bool = False

    @classmethod
    def of(cls, tenant: Tenant) -> TenantOut:
        policy = tenant.policy
        return cls(
            id=tenant.id, name=tenant.name, created_at=tenant.created_at, credential_ids=list(tenant.credential_ids),
            policy=PolicyIn(
                allowed_models=list(policy.allowed_models) if policy.allowed_models is not None else None,
                default_model=policy.default_model, max_images_per_request=policy.max_images_per_request,
                max_wait_seconds=policy.max_wait_seconds,
            ),
            limits=LimitsIn(**vars(tenant.limits)), has_webhook_secret=tenant.sealed_webhook_secret is not None,
        )  # fmt: skip


class WebhookSecretOut(BaseModel):
    tenant_id: str
    webhook_secret: str


class CredentialIdsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    credential_ids: Annotated[list[str], Field(min_length=1)]


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: Annotated[str, Field(max_length=100)] = ""
    expires_in_seconds: Annotated[int | None, Field(ge=60, description="The key stops working after this")] = None


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overlap_seconds: Annotated[int, Field(ge=0, le=30 * 86_400, description="How long the old key keeps working")] = (
        86_400
    )


class KeyOut(BaseModel):
    key_id: str
    tenant_id: str
    label: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None = None

    @classmethod
    def of(cls, record: ApiKeyRecord, last_used_at: float | None = None) -> KeyOut:
        return cls(key_id=record.key_id, tenant_id=record.tenant_id, label=record.label, created_at=record.created_at,
                   expires_at=record.expires_at, revoked_at=record.revoked_at, last_used_at=last_used_at)  # fmt: skip


class IssuedKeyOut(KeyOut):
    api_key: str = Field(description="The full key. It is shown only this once.")


def admin_dependency(admin_token: SecretStr, key_format: KeyFormat) -> Callable[..., Awaitable[None]]:
    expected = admin_token.get_secret_value().encode()

    async def require_admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)],
    ) -> None:
        presented = credentials.credentials if credentials else ""
        if presented and hmac.compare_digest(presented.encode(), expected):
            return
        if key_format.is_gateway_key(presented):
            raise Forbidden("tenant API keys cannot use the admin API")
        raise Unauthorized("the admin token is missing or wrong")

    return require_admin


def build_admin_router(directory: TenantDirectory, stores: Stores, admin_token: SecretStr) -> APIRouter:
    router = APIRouter(
        prefix="/admin", tags=["admin"], dependencies=[Depends(admin_dependency(admin_token, directory.key_format))]
    )
    audit = stores.audit

    @router.post("/credentials", status_code=201)
    async def create_credential(body: CredentialIn) -> CredentialOut:
        """Add a Kling account (or return the existing one with this access key and secret)."""
        credential = await body.added_to(directory)
        await audit.append(ACTOR, "credential.create", credential.id, {"access_key": credential.access_key})
        return CredentialOut.of(credential)

    @router.get("/credentials")
    async def list_credentials() -> list[CredentialOut]:
        return [CredentialOut.of(credential) for credential in await directory.store.list_credentials()]

    @router.post("/tenants", status_code=201)
    async def create_tenant(body: TenantIn) -> TenantOut:
        """Create a tenant on a new Kling account (`kling`) or on existing credentials (`credential_ids`)."""
        if (body.kling is None) == (body.credential_ids is None):
            raise InvalidRequest("kling", "give either kling (a Kling account) or credential_ids")
        ids = tuple(body.credential_ids or ())
        if body.kling is not None:
            credential = await body.kling.added_to(directory)
            ids = (credential.id,)
            await audit.append(ACTOR, "credential.create", credential.id, {"access_key": credential.access_key})
        tenant = await directory.create_tenant(body.name, ids, body.policy.policy(), body.limits.limits())
        await audit.append(ACTOR, "tenant.create", tenant.id, {"name": tenant.name})
        return TenantOut.of(tenant)

    @router.get("/tenants")
    async def list_tenants() -> list[TenantOut]:
        return [TenantOut.of(tenant) for tenant in await directory.store.list_tenants()]

    @router.get("/tenants/{tenant_id}")
    async def get_tenant(tenant_id: str) -> TenantOut:
        return TenantOut.of(await directory.get_tenant(tenant_id))

    @router.put("/tenants/{tenant_id}/policy")
    async def set_policy(tenant_id: str, body: PolicyIn) -> TenantOut:
        tenant = await directory.update_tenant(await directory.get_tenant(tenant_id), policy=body.policy())
        await audit.append(ACTOR, "tenant.policy", tenant.id)
        return TenantOut.of(tenant)

    @router.put("/tenants/{tenant_id}/limits")
    async def set_limits(tenant_id: str, body: LimitsIn) -> TenantOut:
        """Requests per minute (per tenant, and per key when set), concurrent tasks, images per UTC day."""
        tenant = await directory.update_tenant(await directory.get_tenant(tenant_id), limits=body.limits())
        await audit.append(ACTOR, "tenant.limits", tenant.id)
        return TenantOut.of(tenant)

    @router.post("/tenants/{tenant_id}/webhook-secret", status_code=201)
    async def create_webhook_secret(tenant_id: str) -> WebhookSecretOut:
        """A new secret signing the results sent to this tenant's `webhook_url`s (shown once; replaces the old)."""
        secret = new_webhook_secret()
        tenant = await directory.new_webhook_secret(tenant_id, secret)
        await audit.append(ACTOR, "tenant.webhook_secret", tenant.id)
        return WebhookSecretOut(tenant_id=tenant.id, webhook_secret=secret)

    @router.put("/tenants/{tenant_id}/credentials")
    async def set_credentials(tenant_id: str, body: CredentialIdsIn) -> TenantOut:
        tenant = await directory.get_tenant(tenant_id)
        tenant = await directory.update_tenant(tenant, credential_ids=tuple(body.credential_ids))
        await audit.append(ACTOR, "tenant.credentials", tenant.id, {"credential_ids": ",".join(body.credential_ids)})
        return TenantOut.of(tenant)

    @router.post("/tenants/{tenant_id}/keys", status_code=201)
    async def issue_key(tenant_id: str, body: KeyIn | None = None) -> IssuedKeyOut:
        body = body or KeyIn()
        expires_at = time.time() + body.expires_in_seconds if body.expires_in_seconds else None
        issued = await directory.issue_key(tenant_id, body.label, expires_at)
        await audit.append(ACTOR, "key.issue", issued.record.key_id, {"tenant_id": tenant_id})
        return IssuedKeyOut(**KeyOut.of(issued.record).model_dump(), api_key=issued.api_key)

    @router.get("/tenants/{tenant_id}/keys")
    async def list_keys(tenant_id: str) -> list[KeyOut]:
        await directory.get_tenant(tenant_id)
        records = await directory.store.list_keys(tenant_id)
        used = await directory.store.last_used([record.key_id for record in records])
        return [KeyOut.of(record, used.get(record.key_id)) for record in records]

    @router.post("/keys/{key_id}/rotate", status_code=201)
    async def rotate_key(key_id: str, body: RotateIn | None = None) -> IssuedKeyOut:
        """Issue a successor key; the old one keeps working for `overlap_seconds`, then expires."""
        issued = await directory.rotate_key(key_id, (body or RotateIn()).overlap_seconds)
        await audit.append(ACTOR, "key.rotate", key_id, {"key_id": issued.record.key_id})
        return IssuedKeyOut(**KeyOut.of(issued.record).model_dump(), api_key=issued.api_key)

    @router.delete("/keys/{key_id}", status_code=204)
    async def revoke_key(key_id: str) -> Response:
        await directory.revoke_key(key_id)
        await audit.append(ACTOR, "key.revoke", key_id)
        return Response(status_code=204)

    @router.get("/usage")
    async def usage(days: Annotated[int, Query(ge=1, le=400)] = 30) -> dict[str, list[DailyUsage]]:
        """Requests, tasks and images per tenant and UTC day (and per key), newest first."""
        tenant_ids = [tenant.id for tenant in await directory.store.list_tenants()]
        return await stores.usage.tenants_usage(tenant_ids, days)

    @router.get("/audit")
    async def audit_log(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditEntry]:
        """The most recent administrative changes, newest first."""
        return await audit.recent(limit)

    return router
