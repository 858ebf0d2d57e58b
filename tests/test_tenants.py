"""The tenant store contract, run against both backends, and the key format and hashing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app.errors import Conflict, NotFound
from app.kling import KlingCredentials
from app.tenants import MemoryTenantStore, RedisTenantStore, TenantDirectory, parse_api_key

pytestmark = pytest.mark.anyio
PEPPER = b"p" * 32
KLING = KlingCredentials("ak-acme", "sk-acme-" + "s" * 32)


@pytest.fixture(params=["memory", "redis"])
async def directory(request: pytest.FixtureRequest) -> AsyncIterator[TenantDirectory]:
    if request.param == "memory":
        yield TenantDirectory(MemoryTenantStore(), PEPPER)
        return
    redis = Redis.from_url(request.getfixturevalue("redis_url"))
    await redis.flushdb()
    yield TenantDirectory(RedisTenantStore(redis), PEPPER)
    await redis.aclose()


async def test_a_created_tenant_can_be_read_back_and_listed(directory: TenantDirectory) -> None:
    tenant = await directory.create_tenant("acme", KLING, concurrency=7)
    assert await directory.store.get_tenant(tenant.id) == tenant
    assert [listed.id for listed in await directory.store.list_tenants()] == [tenant.id]
    assert await directory.store.get_tenant("t_missing") is None


async def test_tenant_names_are_unique(directory: TenantDirectory) -> None:
    await directory.create_tenant("acme", KLING)
    with pytest.raises(Conflict):
        await directory.create_tenant("acme", KLING)


async def test_an_issued_key_verifies_to_its_tenant(directory: TenantDirectory) -> None:
    tenant = await directory.create_tenant("acme", KLING)
    issued = await directory.issue_key(tenant.id, label="ci")
    assert parse_api_key(issued.api_key) is not None
    verified = await directory.verify_key(issued.api_key)
    assert verified is not None
    record, found = verified
    assert (record.key_id, record.label, found.id) == (issued.record.key_id, "ci", tenant.id)
    assert found.kling == KLING


async def test_a_wrong_secret_for_a_known_key_id_does_not_verify(directory: TenantDirectory) -> None:
    tenant = await directory.create_tenant("acme", KLING)
    issued = await directory.issue_key(tenant.id)
    forged = issued.api_key[:-4] + ("AAAA" if not issued.api_key.endswith("AAAA") else "BBBB")
    assert await directory.verify_key(forged) is None


async def test_a_revoked_key_no_longer_verifies_and_stays_listed(directory: TenantDirectory) -> None:
    tenant = await directory.create_tenant("acme", KLING)
    issued = await directory.issue_key(tenant.id)
    revoked = await directory.revoke_key(issued.record.key_id)
    assert revoked.revoked_at is not None
    assert await directory.verify_key(issued.api_key) is None
    [listed] = await directory.store.list_keys(tenant.id)
    assert not listed.active


async def test_keys_for_unknown_tenants_or_ids_are_not_found(directory: TenantDirectory) -> None:
    with pytest.raises(NotFound):
        await directory.issue_key("t_missing")
    with pytest.raises(NotFound):
        await directory.revoke_key("AAAAAAAAAAAA")


@pytest.mark.parametrize(
    "api_key",
    [
        "",
        "kgw_",
        "kgw_short_secret",
        "sk_AAAAAAAAAAAA_" + "B" * 32,
        "kgw_AAAAAAAAAAAA_" + "B" * 31,
        "kgw_AAAA-AAAAAAA_" + "B" * 32,
    ],
)
def test_malformed_keys_are_recognised_without_a_lookup(api_key: str) -> None:
    assert parse_api_key(api_key) is None


async def test_redis_never_holds_a_key_secret(redis: Redis) -> None:
    directory = TenantDirectory(RedisTenantStore(redis), PEPPER)
    tenant = await directory.create_tenant("acme", KLING)
    issued = await directory.issue_key(tenant.id)
    secret = issued.api_key.rsplit("_", 1)[1]
    for key in await redis.keys("*"):
        value = await redis.get(key) if await redis.type(key) == b"string" else await redis.smembers(key)
        assert secret.encode() not in repr(value).encode()
