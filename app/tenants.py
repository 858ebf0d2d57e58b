"""Tenants, their Kling credentials, and their API keys; one store contract, Redis and memory backends.

An API key looks like `kgw_<key id>_<secret>`. It is shown once, when issued; the store keeps only
HMAC-SHA256(pepper, secret), so a copy of the store alone cannot be turned back into keys, and the key
id (the only part ever logged) finds the record in one lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import string
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Protocol

from redis.asyncio import Redis

from app.errors import Conflict, NotFound
from app.kling import KlingCredentials

KEY_PREFIX = "kgw"
_ALPHABET = string.ascii_letters + string.digits
KEY_ID_LENGTH = 12
KEY_SECRET_LENGTH = 32  # base62: about 190 bits
API_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([A-Za-z0-9]{{{KEY_ID_LENGTH}}})_([A-Za-z0-9]{{{KEY_SECRET_LENGTH}}})$")


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: float
    kling: KlingCredentials
    concurrency: int = 5  # images the Kling account may have in flight (its resource pack's limit)


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    tenant_id: str
    label: str
    digest: str
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class IssuedKey:
    record: ApiKeyRecord
    api_key: str  # the only time the full key exists outside the caller's hands


class TenantStore(Protocol):
    """Persistence of tenants and key records. Both backends pass tests/test_tenants.py."""

    async def add_tenant(self, tenant: Tenant) -> None:
        """Raises Conflict when the name is taken."""

    async def get_tenant(self, tenant_id: str) -> Tenant | None: ...
    async def list_tenants(self) -> list[Tenant]: ...
    async def add_key(self, record: ApiKeyRecord) -> None: ...
    async def get_key(self, key_id: str) -> ApiKeyRecord | None: ...
    async def list_keys(self, tenant_id: str) -> list[ApiKeyRecord]: ...
    async def save_key(self, record: ApiKeyRecord) -> None: ...
    async def ping(self) -> None: ...


def _random_text(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def parse_api_key(api_key: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, or None; no store lookup is needed to refuse a malformed key."""
    match = API_KEY_RE.match(api_key)
    return (match.group(1), match.group(2)) if match else None


class TenantDirectory:
    """The use cases around tenants and keys, for the admin API, the CLI and authentication."""

    def __init__(self, store: TenantStore, pepper: bytes) -> None:
        self.store = store
        self._pepper = pepper

    def digest(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    async def create_tenant(self, name: str, kling: KlingCredentials, concurrency: int = 5) -> Tenant:
        tenant = Tenant(
            id=f"t_{uuid.uuid4().hex[:16]}",
            name=name,
            created_at=time.time(),
            kling=kling,
            concurrency=concurrency,
        )
        await self.store.add_tenant(tenant)
        return tenant

    async def issue_key(self, tenant_id: str, label: str = "") -> IssuedKey:
        if await self.store.get_tenant(tenant_id) is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        key_id, secret = _random_text(KEY_ID_LENGTH), _random_text(KEY_SECRET_LENGTH)
        record = ApiKeyRecord(
            key_id=key_id,
            tenant_id=tenant_id,
            label=label,
            digest=self.digest(secret),
            created_at=time.time(),
        )
        await self.store.add_key(record)
        return IssuedKey(record=record, api_key=f"{KEY_PREFIX}_{key_id}_{secret}")

    async def revoke_key(self, key_id: str) -> ApiKeyRecord:
        record = await self.store.get_key(key_id)
        if record is None:
            raise NotFound(f"no API key {key_id!r}")
        if record.active:
            record = replace(record, revoked_at=time.time())
            await self.store.save_key(record)
        return record

    async def verify_key(self, api_key: str) -> tuple[ApiKeyRecord, Tenant] | None:
        """The key's record and tenant when the key is well-formed, known, matching and not revoked."""
        parsed = parse_api_key(api_key)
        if parsed is None:
            return None
        key_id, secret = parsed
        record = await self.store.get_key(key_id)
        if record is None or not hmac.compare_digest(record.digest, self.digest(secret)) or not record.active:
            return None
        tenant = await self.store.get_tenant(record.tenant_id)
        return (record, tenant) if tenant is not None else None


class MemoryTenantStore:
    """In-process backend: one process only (the demo, tests, single-user installs)."""

    def __init__(self) -> None:
        self._tenants: dict[str, Tenant] = {}
        self._keys: dict[str, ApiKeyRecord] = {}

    async def add_tenant(self, tenant: Tenant) -> None:
        if any(existing.name == tenant.name for existing in self._tenants.values()):
            raise Conflict(f"a tenant named {tenant.name!r} already exists")
        self._tenants[tenant.id] = tenant

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        return self._tenants.get(tenant_id)

    async def list_tenants(self) -> list[Tenant]:
        return sorted(self._tenants.values(), key=lambda tenant: tenant.created_at)

    async def add_key(self, record: ApiKeyRecord) -> None:
        self._keys[record.key_id] = record

    async def save_key(self, record: ApiKeyRecord) -> None:
        self._keys[record.key_id] = record

    async def get_key(self, key_id: str) -> ApiKeyRecord | None:
        return self._keys.get(key_id)

    async def list_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        keys = [record for record in self._keys.values() if record.tenant_id == tenant_id]
        return sorted(keys, key=lambda record: record.created_at)

    async def ping(self) -> None:
        return None


def _tenant_to_json(tenant: Tenant) -> str:
    fields = asdict(tenant)
    fields["kling"] = {"access_key": tenant.kling.access_key, "secret_key": tenant.kling.secret_key}
    return json.dumps(fields)


def _tenant_from_json(raw: str | bytes) -> Tenant:
    fields = json.loads(raw)
    fields["kling"] = KlingCredentials(**fields["kling"])
    return Tenant(**fields)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisTenantStore:
    """Redis backend. Each record is one JSON string; every operation touches one key at a time,
    so the layout works unchanged on Redis Cluster."""

    def __init__(self, redis: Redis, namespace: str = "kgw") -> None:
        self._redis = redis
        self._ns = namespace

    async def add_tenant(self, tenant: Tenant) -> None:
        # The name index is claimed first and atomically, so two admins racing on one name get one tenant.
        if not await self._redis.set(f"{self._ns}:tenant-name:{tenant.name}", tenant.id, nx=True):
            raise Conflict(f"a tenant named {tenant.name!r} already exists")
        await self._redis.set(f"{self._ns}:tenant:{tenant.id}", _tenant_to_json(tenant))
        await self._redis.sadd(f"{self._ns}:tenants", tenant.id)

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        raw = await self._redis.get(f"{self._ns}:tenant:{tenant_id}")
        return _tenant_from_json(raw) if raw is not None else None

    async def list_tenants(self) -> list[Tenant]:
        tenant_ids = sorted(_text(member) for member in await self._redis.smembers(f"{self._ns}:tenants"))
        tenants = [await self.get_tenant(tenant_id) for tenant_id in tenant_ids]
        return sorted((tenant for tenant in tenants if tenant), key=lambda tenant: tenant.created_at)

    async def add_key(self, record: ApiKeyRecord) -> None:
        await self.save_key(record)
        await self._redis.sadd(f"{self._ns}:tenant-keys:{record.tenant_id}", record.key_id)

    async def save_key(self, record: ApiKeyRecord) -> None:
        await self._redis.set(f"{self._ns}:key:{record.key_id}", json.dumps(asdict(record)))

    async def get_key(self, key_id: str) -> ApiKeyRecord | None:
        raw = await self._redis.get(f"{self._ns}:key:{key_id}")
        return ApiKeyRecord(**json.loads(raw)) if raw is not None else None

    async def list_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        key_ids = await self._redis.smembers(f"{self._ns}:tenant-keys:{tenant_id}")
        records = [await self.get_key(_text(key_id)) for key_id in key_ids]
        return sorted((record for record in records if record), key=lambda record: record.created_at)

    async def ping(self) -> None:
        await self._redis.ping()
