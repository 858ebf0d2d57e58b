"""Tenants, Kling credentials, API keys: one store contract with Redis and memory backends.

- A **credential** is one Kling account (access key, sealed secret key, `concurrency`: images the account
  may have in flight). Several tenants may share one (a team's account); it is identified by its access key.
- A **tenant** uses one or more credentials (the first is used for new tasks) under a policy.
- An **API key** looks like `kgw_<key id>_<secret><checksum>` (`kgw_<env>_...` outside the default
  environment). It is shown once; the store keeps only HMAC-SHA256(pepper, secret). The checksum lets a
  mistyped key be refused without a lookup, and the key id (the only part ever logged) finds the record.
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
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from redis.asyncio import Redis

from app.errors import Conflict, InvalidRequest, NotFound
from app.kling import KlingCredentials
from app.models import canonical_model_name
from app.ratelimit import TenantLimits
from app.sealing import SecretSealer

_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
KEY_ID_LENGTH = 12
KEY_SECRET_LENGTH = 32  # base62: about 190 bits
CHECKSUM_LENGTH = 6
MAX_API_KEY_CHARS = 200
_KEY_BODY_RE = re.compile(
    rf"^([0-9A-Za-z]{{{KEY_ID_LENGTH}}})_([0-9A-Za-z]{{{KEY_SECRET_LENGTH}}})([0-9A-Za-z]{{{CHECKSUM_LENGTH}}})$"
)


@dataclass(frozen=True)
class TenantPolicy:
    allowed_models: tuple[str, ...] | None = None  # None: every image model
    default_model: str | None = None
    max_images_per_request: int = 9
    max_wait_seconds: int | None = None  # None: the gateway's KGW_MAX_WAIT_SECONDS

    def __post_init__(self) -> None:
        if self.allowed_models is not None:
            object.__setattr__(self, "allowed_models", tuple(canonical_model_name(m) for m in self.allowed_models))
        if self.default_model is not None:
            object.__setattr__(self, "default_model", canonical_model_name(self.default_model))


@dataclass(frozen=True)
class Credential:
    """A Kling account as stored: the secret key stays sealed until a JWT must be signed."""

    id: str
    access_key: str
    sealed_secret: str
    concurrency: int
    created_at: float
    base_url: str | None = None  # the account's API, when not the gateway's KGW_KLING_BASE_URL
    # A console-made static API key (sealed as the secret; `access_key` is its `api_key_label`), not an AK/SK pair.
    static_key: bool = False


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: float
    credential_ids: tuple[str, ...]
    policy: TenantPolicy = field(default_factory=TenantPolicy)
    limits: TenantLimits = field(default_factory=TenantLimits)
    sealed_webhook_secret: str | None = None  # signs the results sent to callers' webhook URLs


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    tenant_id: str
    label: str
    digest: str
    created_at: float
    revoked_at: float | None = None
    expires_at: float | None = None

    def usable_at(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class IssuedKey:
    record: ApiKeyRecord
    api_key: str  # the only time the full key exists outside the caller's hands


@dataclass(frozen=True)
class Caller:
    """What a verified API key resolves to: everything a request needs, so it can be cached as one."""

    key: ApiKeyRecord
    tenant: Tenant
    credential_id: str
    kling: KlingCredentials
    concurrency: int


class TenantStore(Protocol):
    """Persistence of tenants, credentials and key records. Both backends pass tests/test_tenants.py."""

    async def add_tenant(self, tenant: Tenant) -> None:
        """Raises Conflict when the name is taken."""

    async def save_tenant(self, tenant: Tenant) -> None: ...
    async def get_tenant(self, tenant_id: str) -> Tenant | None: ...
    async def find_tenant(self, name: str) -> Tenant | None: ...
    async def list_tenants(self) -> list[Tenant]: ...

    async def add_credential(self, credential: Credential) -> None:
        """Raises Conflict when a credential with that access key exists."""

    async def save_credential(self, credential: Credential) -> None: ...
    async def get_credential(self, credential_id: str) -> Credential | None: ...
    async def find_credential(self, access_key: str) -> Credential | None: ...
    async def list_credentials(self) -> list[Credential]: ...

    async def save_key(self, record: ApiKeyRecord) -> None: ...
    async def get_key(self, key_id: str) -> ApiKeyRecord | None: ...
    async def list_keys(self, tenant_id: str) -> list[ApiKeyRecord]: ...
    async def touch_key(self, key_id: str, at: float) -> None: ...
    async def last_used(self, key_ids: list[str]) -> dict[str, float]: ...
    async def ping(self) -> None: ...


def _random_text(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


class KeyFormat:
    """`{prefix}_{key id}_{secret}{checksum}`; the prefix names the environment (`kgw`, `kgw_test`, ...)."""

    def __init__(self, environment: str | None = None) -> None:
        self.prefix = f"kgw_{environment}" if environment else "kgw"

    def _checksum(self, key_id: str, secret: str) -> str:
        return _base62(zlib.crc32(f"{self.prefix}_{key_id}_{secret}".encode()), CHECKSUM_LENGTH)

    def compose(self, key_id: str, secret: str) -> str:
        return f"{self.prefix}_{key_id}_{secret}{self._checksum(key_id, secret)}"

    def new(self) -> tuple[str, str, str]:
        """(key id, secret, full key)."""
        key_id, secret = _random_text(KEY_ID_LENGTH), _random_text(KEY_SECRET_LENGTH)
        return key_id, secret, self.compose(key_id, secret)

    def parse(self, api_key: str) -> tuple[str, str] | None:
        """(key id, secret) of a well-formed key of this environment with a valid checksum, else None."""
        if len(api_key) > MAX_API_KEY_CHARS or not api_key.startswith(self.prefix + "_"):
            return None
        match = _KEY_BODY_RE.match(api_key[len(self.prefix) + 1 :])
        if match is None:
            return None
        key_id, secret, checksum = match.groups()
        return (key_id, secret) if hmac.compare_digest(checksum, self._checksum(key_id, secret)) else None

    def is_gateway_key(self, token: str) -> bool:
        """True for anything shaped like a key of any environment (used to answer 403 on admin routes)."""
        return token.startswith("kgw_") and len(token) <= MAX_API_KEY_CHARS


KeyChanged = Callable[[str], Awaitable[None]]


class TenantDirectory:
    """The use cases around tenants, credentials and keys, for the admin API, the CLI and authentication."""

    def __init__(
        self,
        store: TenantStore,
        pepper: bytes,
        sealer: SecretSealer,
        key_format: KeyFormat | None = None,
        on_key_changed: KeyChanged | None = None,
    ) -> None:
        self.store = store
        self.key_format = key_format or KeyFormat()
        self._pepper = pepper
        self._sealer = sealer
        self._on_key_changed = on_key_changed

    def digest(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    def api_key_label(self, api_key: str) -> str:
        """What names a static API key's credential where an AK/SK one shows its access key (listings, audit,
        metrics' breaker keys): a keyed digest of it, which tells nothing of the key, nor confirms a guess of it
        to whoever reads the listings without the pepper."""
        return "key-" + self.digest(api_key)[:16]

    # --- credentials ---

    async def add_credential(
        self,
        access_key: str,
        secret_key: str,
        concurrency: int = 5,
        *,
        base_url: str | None = None,
        static_key: bool = False,
        reuse: bool = True,
    ) -> Credential:
        """A new credential, or the existing one for this access key when the secret matches (a shared account).
        With `reuse=False` an existing one raises Conflict instead, so the caller knows it created nothing."""
        existing = await self.store.find_credential(access_key) if reuse else None
        if existing is not None:
            current = self._sealer.open(existing.id, existing.sealed_secret)
            if not hmac.compare_digest(current.encode(), secret_key.encode()):
                raise Conflict(f"a credential for access key {access_key!r} exists with another secret key")
            if existing.base_url != base_url:
                raise Conflict(f"a credential for access key {access_key!r} exists with another base URL")
            if existing.static_key != static_key:
                raise Conflict(f"a credential for access key {access_key!r} exists of the other kind")
            return existing
        credential_id = f"c_{uuid.uuid4().hex[:16]}"
        credential = Credential(credential_id, access_key, self._sealer.seal(credential_id, secret_key), concurrency,
                                time.time(), base_url, static_key)  # fmt: skip
        await self.store.add_credential(credential)
        return credential

    async def add_api_key_credential(
        self, api_key: str, concurrency: int = 5, *, base_url: str | None = None, reuse: bool = True
    ) -> Credential:
        """`add_credential` for a static API key: the credential goes by the key's label."""
        return await self.add_credential(self.api_key_label(api_key), api_key, concurrency, base_url=base_url,
                                         static_key=True, reuse=reuse)  # fmt: skip

    async def update_credential(
        self, credential: Credential, secret_key: str | None, concurrency: int, base_url: str | None
    ) -> Credential:
        sealed = self._sealer.seal(credential.id, secret_key) if secret_key is not None else credential.sealed_secret
        updated = replace(credential, sealed_secret=sealed, concurrency=concurrency, base_url=base_url)
        await self.store.save_credential(updated)
        return updated

    async def reseal_all(self) -> int:
        """Re-seal every secret (Kling secret keys, webhook secrets) under the current master key; returns how
        many were re-sealed."""
        credentials = await self.store.list_credentials()
        for credential in credentials:
            resealed = self._sealer.reseal(credential.id, credential.sealed_secret)
            await self.store.save_credential(replace(credential, sealed_secret=resealed))
        tenants = [tenant for tenant in await self.store.list_tenants() if tenant.sealed_webhook_secret is not None]
        for tenant in tenants:
            assert tenant.sealed_webhook_secret is not None
            resealed = self._sealer.reseal(_webhook_seal_id(tenant.id), tenant.sealed_webhook_secret)
            await self.store.save_tenant(replace(tenant, sealed_webhook_secret=resealed))
        return len(credentials) + len(tenants)

    async def new_webhook_secret(self, tenant_id: str, secret: str) -> Tenant:
        """Give the tenant a new webhook secret (the old one stops signing at once)."""
        tenant = await self.get_tenant(tenant_id)
        updated = replace(tenant, sealed_webhook_secret=self._sealer.seal(_webhook_seal_id(tenant.id), secret))
        await self.store.save_tenant(updated)
        await self._key_changed(f"tenant:{tenant.id}")
        return updated

    async def webhook_secret(self, tenant_id: str) -> str | None:
        tenant = await self.store.get_tenant(tenant_id)
        if tenant is None or tenant.sealed_webhook_secret is None:
            return None
        return self._sealer.open(_webhook_seal_id(tenant.id), tenant.sealed_webhook_secret)

    def kling_credentials(self, credential: Credential) -> KlingCredentials:
        secret = self._sealer.open(credential.id, credential.sealed_secret)
        return KlingCredentials(credential.access_key, secret, credential.id, credential.base_url or "",
                                credential.static_key)  # fmt: skip

    async def kling_credentials_by_id(self, credential_id: str) -> KlingCredentials | None:
        credential = await self.store.get_credential(credential_id)
        return self.kling_credentials(credential) if credential is not None else None

    # --- tenants ---

    async def create_tenant(
        self,
        name: str,
        credential_ids: tuple[str, ...],
        policy: TenantPolicy | None = None,
        limits: TenantLimits | None = None,
    ) -> Tenant:
        await self._require_credentials(credential_ids)
        tenant = Tenant(f"t_{uuid.uuid4().hex[:16]}", name, time.time(), credential_ids, policy or TenantPolicy(),
                        limits or TenantLimits())  # fmt: skip
        await self.store.add_tenant(tenant)
        return tenant

    async def update_tenant(
        self,
        tenant: Tenant,
        *,
        credential_ids: tuple[str, ...] | None = None,
        policy: TenantPolicy | None = None,
        limits: TenantLimits | None = None,
    ) -> Tenant:
        if credential_ids is not None:
            await self._require_credentials(credential_ids)
        updated = replace(
            tenant,
            credential_ids=tenant.credential_ids if credential_ids is None else credential_ids,
            policy=tenant.policy if policy is None else policy,
            limits=tenant.limits if limits is None else limits,
        )
        await self.store.save_tenant(updated)
        await self._key_changed(f"tenant:{tenant.id}")
        return updated

    async def get_tenant(self, tenant_id: str) -> Tenant:
        tenant = await self.store.get_tenant(tenant_id)
        if tenant is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        return tenant

    async def _require_credentials(self, credential_ids: tuple[str, ...]) -> None:
        if not credential_ids:
            raise InvalidRequest("credential_ids", "a tenant needs at least one Kling credential")
        for credential_id in credential_ids:
            if await self.store.get_credential(credential_id) is None:
                raise InvalidRequest("credential_ids", f"no credential {credential_id!r}")

    # --- keys ---

    async def issue_key(self, tenant_id: str, label: str = "", expires_at: float | None = None) -> IssuedKey:
        await self.get_tenant(tenant_id)
        key_id, secret, api_key = self.key_format.new()
        record = ApiKeyRecord(key_id, tenant_id, label, self.digest(secret), time.time(), expires_at=expires_at)
        await self.store.save_key(record)
        return IssuedKey(record=record, api_key=api_key)

    async def get_key(self, key_id: str) -> ApiKeyRecord:
        record = await self.store.get_key(key_id)
        if record is None:
            raise NotFound(f"no API key {key_id!r}")
        return record

    async def revoke_key(self, key_id: str) -> ApiKeyRecord:
        record = await self.get_key(key_id)
        if record.revoked_at is None:
            record = replace(record, revoked_at=time.time())
            await self.store.save_key(record)
            await self._key_changed(key_id)
        return record

    async def rotate_key(self, key_id: str, overlap_s: float) -> IssuedKey:
        """A new key for the same tenant and label; the old one keeps working for `overlap_s`, then expires."""
        old = await self.get_key(key_id)
        now = time.time()
        if not old.usable_at(now):
            raise Conflict(f"API key {key_id!r} is revoked or expired; issue a new one instead")
        issued = await self.issue_key(old.tenant_id, old.label, old.expires_at)
        ends = now + overlap_s
        await self.store.save_key(
            replace(old, expires_at=ends if old.expires_at is None else min(ends, old.expires_at))
        )
        await self._key_changed(key_id)
        return issued

    async def resolve_key(self, api_key: str) -> Caller | None:
        """The caller behind a well-formed, known, matching, unrevoked, unexpired key; None otherwise."""
        parsed = self.key_format.parse(api_key)
        if parsed is None:
            return None
        key_id, secret = parsed
        record = await self.store.get_key(key_id)
        if record is None or not self.admits(record, secret):
            return None
        return await self.caller_for(record)

    def admits(self, record: ApiKeyRecord, secret: str) -> bool:
        """Whether `secret` is this key's (compared in constant time) and the key is neither revoked nor expired."""
        return hmac.compare_digest(record.digest, self.digest(secret)) and record.usable_at(time.time())

    async def caller_for(self, record: ApiKeyRecord) -> Caller | None:
        """What a request with this key needs: its tenant and the Kling account its tasks run on."""
        tenant = await self.store.get_tenant(record.tenant_id)
        if tenant is None:
            return None
        credential = await self.account_of(tenant)
        if credential is None:
            return None
        return Caller(record, tenant, credential.id, self.kling_credentials(credential), credential.concurrency)

    async def account_of(self, tenant: Tenant) -> Credential | None:
        """The Kling account the tenant's tasks run on (its first credential)."""
        return await self.store.get_credential(tenant.credential_ids[0])

    async def _key_changed(self, key_id: str) -> None:
        if self._on_key_changed is not None:
            await self._on_key_changed(key_id)


def _credential_json(credential: Credential) -> str:
    """The record as stored in Redis. An unset `base_url` is left out, so that replicas of an earlier version (which
    know no such field) still read it during a rolling upgrade."""
    fields = asdict(credential)
    for name, unset in (("base_url", None), ("static_key", False)):
        if fields[name] == unset:
            del fields[name]
    return json.dumps(fields)


def _webhook_seal_id(tenant_id: str) -> str:
    """What a tenant's sealed webhook secret is bound to, so it cannot be swapped for a Kling secret."""
    return f"webhook:{tenant_id}"


def _tenant_to_json(tenant: Tenant) -> str:
    return json.dumps(asdict(tenant))


def _tenant_from_json(raw: str | bytes) -> Tenant:
    fields: dict[str, Any] = json.loads(raw)
    policy = fields.pop("policy", {}) or {}
    if policy.get("allowed_models") is not None:
        policy["allowed_models"] = tuple(policy["allowed_models"])
    limits = TenantLimits(**(fields.pop("limits", {}) or {}))
    return Tenant(**fields | {"credential_ids": tuple(fields["credential_ids"]), "policy": TenantPolicy(**policy),
                              "limits": limits})  # fmt: skip


class MemoryTenantStore:
    """In-process backend: one process only (the demo, tests, single-user installs)."""

    def __init__(self) -> None:
        self._tenants: dict[str, Tenant] = {}
        self._credentials: dict[str, Credential] = {}
        self._keys: dict[str, ApiKeyRecord] = {}
        self._used: dict[str, float] = {}

    async def add_tenant(self, tenant: Tenant) -> None:
        if await self.find_tenant(tenant.name) is not None:
            raise Conflict(f"a tenant named {tenant.name!r} already exists")
        self._tenants[tenant.id] = tenant

    async def save_tenant(self, tenant: Tenant) -> None:
        self._tenants[tenant.id] = tenant

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        return self._tenants.get(tenant_id)

    async def find_tenant(self, name: str) -> Tenant | None:
        return next((tenant for tenant in self._tenants.values() if tenant.name == name), None)

    async def list_tenants(self) -> list[Tenant]:
        return sorted(self._tenants.values(), key=lambda tenant: tenant.created_at)

    async def add_credential(self, credential: Credential) -> None:
        if await self.find_credential(credential.access_key) is not None:
            raise Conflict(f"a credential for access key {credential.access_key!r} already exists")
        self._credentials[credential.id] = credential

    async def save_credential(self, credential: Credential) -> None:
        self._credentials[credential.id] = credential

    async def get_credential(self, credential_id: str) -> Credential | None:
        return self._credentials.get(credential_id)

    async def find_credential(self, access_key: str) -> Credential | None:
        return next((c for c in self._credentials.values() if c.access_key == access_key), None)

    async def list_credentials(self) -> list[Credential]:
        return sorted(self._credentials.values(), key=lambda credential: credential.created_at)

    async def save_key(self, record: ApiKeyRecord) -> None:
        self._keys[record.key_id] = record

    async def get_key(self, key_id: str) -> ApiKeyRecord | None:
        return self._keys.get(key_id)

    async def list_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        keys = [record for record in self._keys.values() if record.tenant_id == tenant_id]
        return sorted(keys, key=lambda record: record.created_at)

    async def touch_key(self, key_id: str, at: float) -> None:
        self._used[key_id] = at

    async def last_used(self, key_ids: list[str]) -> dict[str, float]:
        return {key_id: self._used[key_id] for key_id in key_ids if key_id in self._used}

    async def ping(self) -> None:
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisTenantStore:
    """Redis backend. Each record is one JSON string and every write touches one key, so the layout
    works unchanged on Redis Cluster; uniqueness (tenant names, access keys) is claimed with SET NX."""

    def __init__(self, redis: Redis, namespace: str = "kgw") -> None:
        self._redis = redis
        self._ns = namespace

    async def _claim(self, index: str, record_key: str, value: str, what: str) -> None:
        """Claim a unique index for a record written just before: whoever finds the index then finds the
        record too (a replica applying the same tenants file meanwhile gets Conflict, then the record)."""
        if not await self._redis.set(f"{self._ns}:{index}", value, nx=True):
            await self._redis.delete(record_key)
            raise Conflict(f"{what} already exists")

    async def _get_all(self, kind: str, ids: list[str]) -> list[bytes | str | None]:
        # A non-transactional pipeline rather than MGET: the keys may live in different Cluster slots.
        pipeline = self._redis.pipeline(transaction=False)
        for record_id in ids:
            pipeline.get(f"{self._ns}:{kind}:{record_id}")
        values: list[bytes | str | None] = await pipeline.execute()
        return values

    async def add_tenant(self, tenant: Tenant) -> None:
        await self.save_tenant(tenant)
        record_key = f"{self._ns}:tenant:{tenant.id}"
        await self._claim(f"tenant-name:{tenant.name}", record_key, tenant.id, f"a tenant named {tenant.name!r}")
        await self._redis.sadd(f"{self._ns}:tenants", tenant.id)

    async def save_tenant(self, tenant: Tenant) -> None:
        await self._redis.set(f"{self._ns}:tenant:{tenant.id}", _tenant_to_json(tenant))

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        raw = await self._redis.get(f"{self._ns}:tenant:{tenant_id}")
        return _tenant_from_json(raw) if raw is not None else None

    async def find_tenant(self, name: str) -> Tenant | None:
        tenant_id = await self._redis.get(f"{self._ns}:tenant-name:{name}")
        return await self.get_tenant(_text(tenant_id)) if tenant_id is not None else None

    async def list_tenants(self) -> list[Tenant]:
        ids = [_text(member) for member in await self._redis.smembers(f"{self._ns}:tenants")]
        tenants = [_tenant_from_json(raw) for raw in await self._get_all("tenant", ids) if raw is not None]
        return sorted(tenants, key=lambda tenant: tenant.created_at)

    async def add_credential(self, credential: Credential) -> None:
        await self.save_credential(credential)
        what = f"a credential for access key {credential.access_key!r}"
        record_key = f"{self._ns}:credential:{credential.id}"
        await self._claim(f"credential-ak:{credential.access_key}", record_key, credential.id, what)
        await self._redis.sadd(f"{self._ns}:credentials", credential.id)

    async def save_credential(self, credential: Credential) -> None:
        await self._redis.set(f"{self._ns}:credential:{credential.id}", _credential_json(credential))

    async def get_credential(self, credential_id: str) -> Credential | None:
        raw = await self._redis.get(f"{self._ns}:credential:{credential_id}")
        return Credential(**json.loads(raw)) if raw is not None else None

    async def find_credential(self, access_key: str) -> Credential | None:
        credential_id = await self._redis.get(f"{self._ns}:credential-ak:{access_key}")
        return await self.get_credential(_text(credential_id)) if credential_id is not None else None

    async def list_credentials(self) -> list[Credential]:
        ids = [_text(member) for member in await self._redis.smembers(f"{self._ns}:credentials")]
        credentials = [Credential(**json.loads(raw)) for raw in await self._get_all("credential", ids) if raw]
        return sorted(credentials, key=lambda credential: credential.created_at)

    async def save_key(self, record: ApiKeyRecord) -> None:
        await self._redis.set(f"{self._ns}:key:{record.key_id}", json.dumps(asdict(record)))
        await self._redis.sadd(f"{self._ns}:tenant-keys:{record.tenant_id}", record.key_id)

    async def get_key(self, key_id: str) -> ApiKeyRecord | None:
        raw = await self._redis.get(f"{self._ns}:key:{key_id}")
        return ApiKeyRecord(**json.loads(raw)) if raw is not None else None

    async def list_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        key_ids = [_text(member) for member in await self._redis.smembers(f"{self._ns}:tenant-keys:{tenant_id}")]
        records = [ApiKeyRecord(**json.loads(raw)) for raw in await self._get_all("key", key_ids) if raw]
        return sorted(records, key=lambda record: record.created_at)

    async def touch_key(self, key_id: str, at: float) -> None:
        await self._redis.set(f"{self._ns}:key-used:{key_id}", repr(at))

    async def last_used(self, key_ids: list[str]) -> dict[str, float]:
        if not key_ids:
            return {}
        values = await self._get_all("key-used", key_ids)
        return {key_id: float(_text(value)) for key_id, value in zip(key_ids, values, strict=True) if value}

    async def ping(self) -> None:
        await self._redis.ping()
