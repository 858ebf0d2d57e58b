"""The tenant store contract, run against both backends; key format, lifecycle and sealed secrets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app.errors import Conflict, InvalidRequest, NotFound
from app.sealing import SealingError, SecretSealer, new_master_key
from app.tenants import KeyFormat, MemoryTenantStore, RedisTenantStore, TenantDirectory, TenantPolicy

pytestmark = pytest.mark.anyio
PEPPER = b"p" * 32
ACCESS_KEY = "ak-acme"
SECRET_KEY = "sk-acme-" + "s" * 32


def directory_on(store: MemoryTenantStore | RedisTenantStore, sealer: SecretSealer | None = None) -> TenantDirectory:
    return TenantDirectory(store, PEPPER, sealer or SecretSealer.ephemeral())


@pytest.fixture(params=["memory", "redis"])
async def directory(request: pytest.FixtureRequest) -> AsyncIterator[TenantDirectory]:
    if request.param == "memory":
        yield directory_on(MemoryTenantStore())
        return
    redis = Redis.from_url(request.getfixturevalue("redis_url"))
    await redis.flushdb()
    yield directory_on(RedisTenantStore(redis))
    await redis.aclose()


async def new_tenant(directory: TenantDirectory, name: str = "acme") -> str:
    credential = await directory.add_credential(ACCESS_KEY, SECRET_KEY, concurrency=7)
    return (await directory.create_tenant(name, (credential.id,))).id


async def test_a_created_tenant_can_be_read_back_found_and_listed(directory: TenantDirectory) -> None:
    tenant_id = await new_tenant(directory)
    tenant = await directory.get_tenant(tenant_id)
    assert await directory.store.find_tenant("acme") == tenant
    assert [listed.id for listed in await directory.store.list_tenants()] == [tenant_id]
    assert await directory.store.get_tenant("t_missing") is None


async def test_tenant_names_are_unique(directory: TenantDirectory) -> None:
    await new_tenant(directory)
    with pytest.raises(Conflict):
        await new_tenant(directory)


async def test_tenants_sharing_a_kling_account_share_one_credential(directory: TenantDirectory) -> None:
    first = await directory.get_tenant(await new_tenant(directory, "acme"))
    second = await directory.get_tenant(await new_tenant(directory, "acme-labs"))
    assert first.credential_ids == second.credential_ids
    assert len(await directory.store.list_credentials()) == 1
    with pytest.raises(Conflict):
        await directory.add_credential(ACCESS_KEY, "another-secret-" + "x" * 32)


async def test_a_tenant_needs_existing_credentials(directory: TenantDirectory) -> None:
    with pytest.raises(InvalidRequest):
        await directory.create_tenant("acme", ("c_missing",))
    with pytest.raises(InvalidRequest):
        await directory.create_tenant("acme", ())


async def test_policy_and_credentials_of_a_tenant_can_be_changed(directory: TenantDirectory) -> None:
    tenant = await directory.get_tenant(await new_tenant(directory))
    other = await directory.add_credential("ak-other", "sk-other-" + "o" * 32)
    policy = TenantPolicy(allowed_models=("kling-v1.5",), default_model="kling-v1-5", max_images_per_request=2)
    await directory.update_tenant(tenant, credential_ids=(other.id,), policy=policy)
    stored = await directory.get_tenant(tenant.id)
    assert stored.credential_ids == (other.id,)
    assert stored.policy.allowed_models == ("kling-v1-5",)


async def test_an_issued_key_resolves_to_its_tenant_and_kling_account(directory: TenantDirectory) -> None:
    tenant_id = await new_tenant(directory)
    issued = await directory.issue_key(tenant_id, label="ci")
    caller = await directory.resolve_key(issued.api_key)
    assert caller is not None
    assert (caller.key.key_id, caller.key.label, caller.tenant.id) == (issued.record.key_id, "ci", tenant_id)
    assert (caller.kling.access_key, caller.kling.secret_key, caller.concurrency) == (ACCESS_KEY, SECRET_KEY, 7)


async def test_a_wrong_secret_for_a_known_key_id_does_not_resolve(directory: TenantDirectory) -> None:
    issued = await directory.issue_key(await new_tenant(directory))
    _, other_secret, _ = directory.key_format.new()
    forged = directory.key_format.compose(issued.record.key_id, other_secret)  # valid shape and checksum
    assert directory.key_format.parse(forged) is not None
    assert await directory.resolve_key(forged) is None


async def test_a_revoked_key_no_longer_resolves_and_stays_listed(directory: TenantDirectory) -> None:
    tenant_id = await new_tenant(directory)
    issued = await directory.issue_key(tenant_id)
    revoked = await directory.revoke_key(issued.record.key_id)
    assert revoked.revoked_at is not None
    assert await directory.resolve_key(issued.api_key) is None
    [listed] = await directory.store.list_keys(tenant_id)
    assert listed.revoked_at is not None


async def test_an_expired_key_no_longer_resolves(directory: TenantDirectory) -> None:
    issued = await directory.issue_key(await new_tenant(directory), expires_at=time.time() - 1)
    assert await directory.resolve_key(issued.api_key) is None


async def test_rotating_a_key_keeps_the_old_one_for_the_overlap_only(directory: TenantDirectory) -> None:
    tenant_id = await new_tenant(directory)
    old = await directory.issue_key(tenant_id, label="laptop")
    new = await directory.rotate_key(old.record.key_id, overlap_s=3600)
    assert new.record.label == "laptop"
    assert await directory.resolve_key(new.api_key) is not None
    assert await directory.resolve_key(old.api_key) is not None
    old_record = await directory.get_key(old.record.key_id)
    assert old_record.expires_at is not None
    assert 3500 < old_record.expires_at - time.time() <= 3600
    immediate = await directory.rotate_key(new.record.key_id, overlap_s=0)
    assert await directory.resolve_key(new.api_key) is None
    assert await directory.resolve_key(immediate.api_key) is not None


async def test_last_use_is_recorded_per_key(directory: TenantDirectory) -> None:
    issued = await directory.issue_key(await new_tenant(directory))
    await directory.store.touch_key(issued.record.key_id, 1234.5)
    assert await directory.store.last_used([issued.record.key_id, "unknown"]) == {issued.record.key_id: 1234.5}


async def test_keys_for_unknown_tenants_or_ids_are_not_found(directory: TenantDirectory) -> None:
    with pytest.raises(NotFound):
        await directory.issue_key("t_missing")
    with pytest.raises(NotFound):
        await directory.revoke_key("AAAAAAAAAAAA")


def test_a_mistyped_key_fails_its_checksum() -> None:
    key_format = KeyFormat()
    _, _, api_key = key_format.new()
    assert key_format.parse(api_key) is not None
    position = len(api_key) - 10
    typo = api_key[:position] + ("A" if api_key[position] != "A" else "B") + api_key[position + 1 :]
    assert key_format.parse(typo) is None


def test_keys_of_another_environment_are_not_ours() -> None:
    _, _, test_key = KeyFormat("test").new()
    _, _, live_key = KeyFormat().new()
    assert test_key.startswith("kgw_test_")
    assert KeyFormat().parse(test_key) is None
    assert KeyFormat("test").parse(live_key) is None
    assert KeyFormat().is_gateway_key(test_key)


@pytest.mark.parametrize(
    "api_key",
    ["", "kgw_", "kgw_short_secret", "sk_AAAAAAAAAAAA_" + "B" * 38, "kgw_AAAAAAAAAAAA_" + "B" * 37, "kgw_" + "A" * 500],
)
def test_malformed_keys_are_recognised_without_a_lookup(api_key: str) -> None:
    assert KeyFormat().parse(api_key) is None


async def test_redis_holds_no_plaintext_kling_secret_or_api_key(redis: Redis) -> None:
    directory = directory_on(RedisTenantStore(redis))
    issued = await directory.issue_key(await new_tenant(directory))
    secret_part = issued.api_key.split("_")[2]
    for key in await redis.keys("*"):
        kind = await redis.type(key)
        value = await redis.get(key) if kind == b"string" else await redis.smembers(key)
        dumped = repr(value).encode()
        assert SECRET_KEY.encode() not in dumped
        assert secret_part[:32].encode() not in dumped


async def test_a_new_master_key_reseals_every_secret_and_the_old_key_can_then_go(redis: Redis) -> None:
    old_key, new_key = new_master_key().encode(), new_master_key().encode()
    store = RedisTenantStore(redis)
    await new_tenant(directory_on(store, SecretSealer([old_key])))
    rotating = directory_on(store, SecretSealer([new_key, old_key]))
    assert await rotating.reseal_all() == 1
    [credential] = await store.list_credentials()
    assert directory_on(store, SecretSealer([new_key])).kling_credentials(credential).secret_key == SECRET_KEY
    with pytest.raises(SealingError):
        directory_on(store, SecretSealer([old_key])).kling_credentials(credential)


def test_a_sealed_secret_does_not_open_for_another_record() -> None:
    sealer = SecretSealer.ephemeral()
    sealed = sealer.seal("c_one", "secret")
    assert sealer.open("c_one", sealed) == "secret"
    with pytest.raises(SealingError):
        sealer.open("c_two", sealed)
