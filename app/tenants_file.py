"""Declarative tenants (`KGW_TENANTS_FILE`, TOML) applied at start, idempotently, for GitOps.

    [[credentials]]
    access_key = "AK..."
    secret_key_env = "ACME_KLING_SECRET_KEY"   # or secret_key_file = "/run/secrets/acme-kling"
    concurrency = 5
    # base_url = "https://api-beijing.klingai.com"  # an account of Kling's China site; default KGW_KLING_BASE_URL

    [[credentials]]                            # or a static API key made in Kling's console
    name = "acme-console"                      # what tenants call it
    api_key_env = "ACME_KLING_API_KEY"         # or api_key_file = "/run/secrets/acme-kling-api-key"

    [[tenants]]
    name = "acme"
    credentials = ["AK..."]                    # access keys (or names); the first runs new tasks
    [tenants.policy]
    allowed_models = ["kling-v3"]
    max_images_per_request = 4

Secrets are never inline: only a reference to an environment variable or a file. Applying the same file
twice changes nothing; a changed file updates what it names and leaves everything else alone.
"""

from __future__ import annotations

import hmac
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.errors import Conflict
from app.tenant_schemas import KlingBaseUrl, LimitsIn, PolicyIn, TenantName, check_static_api_key
from app.tenants import TenantDirectory


class TenantsFileError(Exception):
    """The file cannot be applied; the message names the entry and what to fix."""


class CredentialEntry(BaseModel):
    """An AK/SK account (`access_key` and a reference to its secret key), or a static API key (`name` and a
    reference to the key)."""

    # Errors never quote the input: a secret written inline by mistake would be printed with them.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    access_key: Annotated[str | None, Field(min_length=1)] = None
    name: Annotated[str | None, Field(min_length=1, description="What tenants call this credential")] = None
    secret_key_env: str | None = None
    secret_key_file: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    concurrency: Annotated[int, Field(ge=1, le=1000)] = 5
    base_url: KlingBaseUrl = None

    @model_validator(mode="after")
    def _one_secret_reference(self) -> CredentialEntry:
        secret_refs = sum(ref is not None for ref in (self.secret_key_env, self.secret_key_file))
        api_key_refs = sum(ref is not None for ref in (self.api_key_env, self.api_key_file))
        if self.access_key is not None:
            if secret_refs != 1 or api_key_refs:
                raise ValueError("give exactly one of secret_key_env or secret_key_file (secrets are never inline)")
        elif self.name is None or api_key_refs != 1 or secret_refs:
            raise ValueError("give access_key and a secret key reference, or name and exactly one of api_key_env "
                             "or api_key_file (secrets are never inline)")  # fmt: skip
        return self

    @property
    def static_key(self) -> bool:
        return self.access_key is None

    @property
    def reference(self) -> str:
        """What the file names it by in what it reports: its name, else its access key."""
        reference = self.name or self.access_key
        assert reference is not None  # the validator saw to it
        return reference

    @property
    def references(self) -> list[str]:
        """What the file's tenants may call it: its name and its access key, whichever it has."""
        return [reference for reference in (self.name, self.access_key) if reference is not None]


class TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: TenantName
    credentials: Annotated[list[str], Field(min_length=1)]
    policy: PolicyIn = Field(default_factory=PolicyIn)
    limits: LimitsIn = Field(default_factory=LimitsIn)


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    credentials: list[CredentialEntry] = Field(default_factory=list)
    tenants: list[TenantEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_references(self) -> TenantsFile:
        references = [reference for entry in self.credentials for reference in entry.references]
        repeated = sorted({reference for reference in references if references.count(reference) > 1})
        if repeated:
            raise ValueError(f"more than one [[credentials]] entry is called {', '.join(repeated)}")
        return self


@dataclass(frozen=True)
class Applied:
    created: list[str]
    updated: list[str]


def load_tenants_file(path: str) -> TenantsFile:
    try:
        return TenantsFile.model_validate(tomllib.loads(Path(path).read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TenantsFileError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        raise TenantsFileError(f"{path}: {exc}") from exc


def _secret_of(entry: CredentialEntry, environ: Mapping[str, str]) -> str:
    """The secret key, or the static API key, the entry refers to."""
    variable, file = entry.secret_key_env or entry.api_key_env, entry.secret_key_file or entry.api_key_file
    if variable is not None:
        secret = environ.get(variable, "").strip()
        if not secret:
            raise TenantsFileError(f"credential {entry.reference}: ${variable} is not set")
    else:
        assert file is not None
        try:
            secret = Path(file).read_text().strip()
        except OSError as exc:
            raise TenantsFileError(f"credential {entry.reference}: cannot read {file}") from exc
    if entry.static_key:
        try:
            check_static_api_key(secret)
        except ValueError as exc:  # says nothing of the key itself
            raise TenantsFileError(f"credential {entry.reference}: the API key {exc}") from exc
    return secret


async def apply_tenants_file(
    directory: TenantDirectory, spec: TenantsFile, environ: Mapping[str, str] | None = None
) -> Applied:
    """Create or update what the file names; returns what changed, by name."""
    environ = os.environ if environ is None else environ
    applied = Applied(created=[], updated=[])
    credential_ids: dict[str, str] = {}
    for entry in spec.credentials:
        credential_id = await _apply_credential(directory, entry, _secret_of(entry, environ), applied)
        credential_ids.update(dict.fromkeys(entry.references, credential_id))
    for tenant_entry in spec.tenants:
        unknown = [key for key in tenant_entry.credentials if key not in credential_ids]
        if unknown:
            raise TenantsFileError(f"tenant {tenant_entry.name}: no [[credentials]] entry for {', '.join(unknown)} "
                                   "(by access key, or name)")  # fmt: skip
        ids = tuple(credential_ids[key] for key in tenant_entry.credentials)
        await _apply_tenant(directory, tenant_entry, ids, applied)
    return applied


async def _apply_credential(
    directory: TenantDirectory, entry: CredentialEntry, secret: str, applied: Applied, *, retry: bool = True
) -> str:
    # A static key is found by its label: a new key (rotated at Kling) is a new credential, which the tenants naming
    # it move to; tasks under way keep the one they started on.
    access_key = directory.api_key_label(secret) if entry.static_key else entry.access_key
    assert access_key is not None
    existing = await directory.store.find_credential(access_key)
    if existing is None:
        try:
            # Not reused: another replica creating it between our look-up and now must not count as our creation.
            created = await directory.add_credential(access_key, secret, entry.concurrency, base_url=entry.base_url,
                                                     static_key=entry.static_key, reuse=False)  # fmt: skip
        except Conflict:
            if not retry:
                raise
            # Another replica applying the same file at the same moment created it first: its record is there.
            return await _apply_credential(directory, entry, secret, applied, retry=False)
        applied.created.append(f"credential {entry.reference}")
        return created.id
    current = directory.kling_credentials(existing).secret_key
    changed = (not hmac.compare_digest(current.encode(), secret.encode()) or existing.concurrency != entry.concurrency
               or existing.base_url != entry.base_url)  # fmt: skip
    if changed:
        await directory.update_credential(existing, secret, entry.concurrency, entry.base_url)
        applied.updated.append(f"credential {entry.reference}")
    return existing.id


async def _apply_tenant(
    directory: TenantDirectory,
    entry: TenantEntry,
    credential_ids: tuple[str, ...],
    applied: Applied,
    *,
    retry: bool = True,
) -> None:
    policy, limits = entry.policy.policy(), entry.limits.limits()
    existing = await directory.store.find_tenant(entry.name)
    if existing is None:
        try:
            await directory.create_tenant(entry.name, credential_ids, policy, limits)
        except Conflict:
            if not retry:
                raise
            # Another replica applying the same file at the same moment created it first: its record is there.
            await _apply_tenant(directory, entry, credential_ids, applied, retry=False)
            return
        applied.created.append(f"tenant {entry.name}")
    elif (existing.credential_ids, existing.policy, existing.limits) != (credential_ids, policy, limits):
        await directory.update_tenant(existing, credential_ids=credential_ids, policy=policy, limits=limits)
        applied.updated.append(f"tenant {entry.name}")
