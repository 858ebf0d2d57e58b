"""Tenancy through the running gateway: revocation across replicas, OAuth tokens, policy, usage, audit,
the tenants file, and refusals that need no store lookup."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import pytest
from redis.asyncio import Redis

from app.config import Settings
from app.main import admin_directory
from app.simulator import SimAccount, SimulatorConfig, create_simulator_app
from app.tenants import KeyFormat
from app.tenants_file import TenantsFileError, apply_tenants_file, load_tenants_file
from tests.conftest import (
    ADMIN,
    ADMIN_TOKEN,
    KEY_PEPPER,
    MASTER_KEY,
    PRIMARY,
    RSA_KEY,
    SECONDARY,
    Issuer,
    RunningGateway,
    Simulator,
    bearer,
    gateway_settings,
    hand_made,
    mcp_client,
    redis_gateway_settings,
    replica_env,
    running_gateway,
    text_of,
)
from tests.servers import gateway_process, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
async def second_replica(simulator: Simulator, redis: Redis, redis_url: str) -> AsyncIterator[str]:
    """Another gateway process (`kling-gateway serve`) on the same Redis; yields its base URL."""
    env = replica_env(redis_url, simulator.url)
    async with gateway_process(env) as replica:
        yield replica.url


async def test_a_key_revoked_on_one_replica_is_refused_by_the_other_within_a_second(
    redis_gateway: RunningGateway, second_replica: str
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    headers = bearer(api_key)
    warm = await redis_gateway.http.post(f"{second_replica}/generate", json={"prompt": "x"}, headers=headers)
    assert warm.status_code == 202  # the other replica now holds the key in its cache

    revoked_at = time.monotonic()
    response = await redis_gateway.http.delete(f"{redis_gateway.url}/admin/keys/{api_key.split('_')[1]}", headers=ADMIN)
    assert response.status_code == 204
    with anyio.fail_after(1.0):
        # The replica exposes no revocation event: asking it is the observation.
        while (await redis_gateway.http.get(f"{second_replica}/usage", headers=headers)).status_code != 401:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    delay = time.monotonic() - revoked_at
    print(f"revocation reached the other replica in {delay * 1000:.1f} ms")
    assert delay < 1.0


async def test_redis_holds_no_plaintext_secret_after_a_full_run(redis_gateway: RunningGateway, redis: Redis) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    with anyio.fail_after(20):
        done = await redis_gateway.http.post(
            f"{redis_gateway.url}/generate", json={"prompt": "a fox", "wait_seconds": 10}, headers=bearer(api_key)
        )
    assert done.json()["status"] == "succeeded"
    secrets = [PRIMARY.secret_key, api_key, api_key.split("_")[2][:32], ADMIN_TOKEN, KEY_PEPPER, MASTER_KEY]
    keys = await redis.keys("*")
    assert keys
    for key in keys:
        dumped = repr(await read_any(redis, key))
        for secret in secrets:
            assert secret not in dumped, key


async def read_any(redis: Redis, key: bytes | str) -> object:
    kind = await redis.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind == "string":
        return await redis.get(key)
    if kind == "set":
        return await redis.smembers(key)
    if kind == "hash":
        return await redis.hgetall(key)
    if kind == "stream":
        return await redis.xrange(key)
    if kind == "zset":
        return await redis.zrange(key, 0, -1)
    if kind == "none":  # removed between listing and reading (a lease released meanwhile)
        return None
    raise AssertionError(f"unexpected Redis type {kind} at {key!r}")


async def test_refusals_that_the_format_decides_cost_no_store_lookup(
    redis_gateway: RunningGateway, redis: Redis
) -> None:
    await redis_gateway.new_api_key("acme")
    _, _, other_environment = KeyFormat("staging").new()
    candidates = [
        "kgw_AAAAAAAAAAAA_" + "B" * 38,  # a checksum that does not match
        other_environment,
        "x" * 9000,  # oversized
        "garbage",
    ]
    before = await get_commands(redis)
    for token in candidates:
        response = await redis_gateway.http.post(
            f"{redis_gateway.url}/generate", json={"prompt": "x"}, headers=bearer(token)
        )
        assert response.status_code == 401
    assert await get_commands(redis) == before


async def get_commands(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("get", "mget", "hgetall"))


async def test_another_tenants_task_is_an_error_result_over_mcp(gateway: RunningGateway) -> None:
    acme = await gateway.new_api_key("acme")
    globex = await gateway.new_api_key("globex", SECONDARY)
    task = (await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers=bearer(acme))).json()
    async with mcp_client(gateway, globex) as client:
        result = await client.call_tool("check_image_status", {"task_id": task["task_id"], "wait_seconds": 0})
    assert result.is_error
    assert isinstance(result.structured_content, dict)
    assert result.structured_content["error"]["type"] == "not_found"


async def test_tenant_policy_limits_models_images_and_sets_the_default(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    tenant_id = (await gateway.http.get(f"{gateway.url}/admin/tenants", headers=ADMIN)).json()[0]["id"]
    policy = {"allowed_models": ["kling-v2.1", "kling-v3"], "default_model": "kling-v2-1", "max_images_per_request": 2}
    updated = await gateway.http.put(f"{gateway.url}/admin/tenants/{tenant_id}/policy", json=policy, headers=ADMIN)
    assert updated.json()["policy"]["allowed_models"] == ["kling-v2-1", "kling-v3"]

    async def generate(body: dict[str, Any]) -> httpx2.Response:
        return await gateway.http.post(f"{gateway.url}/generate", json=body, headers=bearer(api_key))

    defaulted = await generate({"prompt": "x"})
    assert defaulted.json()["model_name"] == "kling-v2-1"
    refused_model = await generate({"prompt": "x", "model_name": "kling-v1"})
    assert (refused_model.status_code, refused_model.json()["error"]["field"]) == (422, "model_name")
    refused_count = await generate({"prompt": "x", "num_images": 3})
    assert (refused_count.status_code, refused_count.json()["error"]["field"]) == (422, "num_images")


async def test_usage_counts_requests_tasks_and_images_per_key(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    for images in (1, 3):
        body = {"prompt": "x", "num_images": images}
        assert (await gateway.http.post(f"{gateway.url}/generate", json=body, headers=bearer(api_key))).is_success
    [today] = (await gateway.http.get(f"{gateway.url}/usage", headers=bearer(api_key))).json()
    assert today["total"] == {"requests": 2, "tasks": 2, "images": 4}
    assert today["by_key"] == {api_key.split("_")[1]: {"requests": 2, "tasks": 2, "images": 4}}
    everyone = (await gateway.http.get(f"{gateway.url}/admin/usage", headers=ADMIN)).json()
    assert [days[0]["total"]["images"] for days in everyone.values()] == [4]


async def test_with_redis_usage_shows_at_once_where_counted_and_a_stopping_replica_writes_what_it_holds(
    simulator: Simulator, redis_gateway: RunningGateway, redis_url: str
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    body, headers = {"prompt": "x", "num_images": 2}, bearer(api_key)
    # Counts wait in the replica for an hour here, so only a read through it or its stop can write them.
    async with running_gateway(redis_gateway_settings(simulator, redis_url, usage_flush_seconds=3600)) as counting:
        assert (await counting.http.post(f"{counting.url}/generate", json=body, headers=headers)).is_success
        # Not written yet: another replica reads what is in Redis, and the counting one holds the request.
        assert (await redis_gateway.http.get(f"{redis_gateway.url}/usage", headers=headers)).json() == []
        [today] = (await counting.http.get(f"{counting.url}/usage", headers=headers)).json()
        assert today["total"] == {"requests": 1, "tasks": 1, "images": 2}
        assert (await counting.http.post(f"{counting.url}/generate", json=body, headers=headers)).is_success
    [today] = (await redis_gateway.http.get(f"{redis_gateway.url}/usage", headers=headers)).json()
    assert today["total"] == {"requests": 2, "tasks": 2, "images": 4}


async def test_admin_changes_are_audited_without_secrets(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    key_id = api_key.split("_")[1]
    rotated = await gateway.http.post(f"{gateway.url}/admin/keys/{key_id}/rotate", json={}, headers=ADMIN)
    assert rotated.status_code == 201
    entries = (await gateway.http.get(f"{gateway.url}/admin/audit", headers=ADMIN)).json()
    assert [entry["action"] for entry in entries] == ["key.rotate", "key.issue", "tenant.create", "credential.create"]
    assert PRIMARY.secret_key not in str(entries)
    assert api_key not in str(entries)


async def test_a_rotated_key_and_its_successor_both_work_during_the_overlap(gateway: RunningGateway) -> None:
    old_key = await gateway.new_api_key("acme")
    rotated = await gateway.http.post(
        f"{gateway.url}/admin/keys/{old_key.split('_')[1]}/rotate", json={"overlap_seconds": 600}, headers=ADMIN
    )
    new_key = rotated.json()["api_key"]
    for key in (old_key, new_key):
        assert (await gateway.http.get(f"{gateway.url}/usage", headers=bearer(key))).status_code == 200
    listed = (await gateway.http.get(f"{gateway.url}/admin/tenants", headers=ADMIN)).json()[0]["id"]
    keys = (await gateway.http.get(f"{gateway.url}/admin/tenants/{listed}/keys", headers=ADMIN)).json()
    assert [key["expires_at"] is not None for key in keys] == [True, False]
    assert keys[0]["last_used_at"] is not None


async def test_the_tenants_file_is_applied_at_start_and_again_without_changes(
    simulator: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_KLING_SECRET", PRIMARY.secret_key)
    tenants_file = tmp_path / "tenants.toml"
    tenants_file.write_text(
        f"""
[[credentials]]
access_key = "{PRIMARY.access_key}"
secret_key_env = "ACME_KLING_SECRET"
concurrency = 4

[[tenants]]
name = "acme"
credentials = ["{PRIMARY.access_key}"]
[tenants.policy]
max_images_per_request = 2
"""
    )
    async with running_gateway(gateway_settings(simulator, tenants_file=str(tenants_file))) as running:
        url, http = running.url, running.http
        [tenant] = (await http.get(f"{url}/admin/tenants", headers=ADMIN)).json()
        assert tenant["policy"]["max_images_per_request"] == 2
        issued = (await http.post(f"{url}/admin/tenants/{tenant['id']}/keys", json={}, headers=ADMIN)).json()
        response = await http.post(f"{url}/generate", json={"prompt": "x"}, headers=bearer(issued["api_key"]))
        assert response.status_code == 202
    # Applying the same file to the same store again changes nothing.
    applied = await apply_tenants_file(running.gateway.directory, load_tenants_file(str(tenants_file)))
    assert (applied.created, applied.updated) == ([], [])


async def test_a_tenants_file_with_an_inline_secret_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "tenants.toml"
    bad.write_text('[[credentials]]\naccess_key = "ak"\nsecret_key = "inline"\n')
    with pytest.raises(TenantsFileError, match="secret_key"):
        load_tenants_file(str(bad))


# --- OAuth bearer tokens from a configured issuer ---


@pytest.fixture
async def oauth_gateway(simulator: Simulator, issuer: Issuer) -> AsyncIterator[RunningGateway]:
    settings = gateway_settings(simulator, public_url="https://mcp.example.com", oidc_issuer=issuer.url)
    async with running_gateway(settings) as running:
        yield running


def token_for(issuer: Issuer, **claims: object) -> str:
    payload = issuer.claims(**({"aud": "https://mcp.example.com/mcp", "tenant": "acme"} | claims))
    return jwt.encode(payload, RSA_KEY, algorithm="RS256", headers={"kid": "k1"})


async def test_an_oauth_token_for_a_tenant_generates_over_mcp(oauth_gateway: RunningGateway, issuer: Issuer) -> None:
    await oauth_gateway.new_api_key("acme")
    async with mcp_client(oauth_gateway, token_for(issuer)) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("generate_image", {"prompt": "a fox"})
    assert not result.is_error, text_of(result)


@pytest.mark.parametrize(
    ("claims", "status", "error"),
    [
        ({"exp": int(time.time()) - 3600}, 401, "invalid_token"),
        ({"aud": "https://elsewhere.example.com/mcp"}, 401, "invalid_token"),
        ({"iss": "https://evil.example.com"}, 401, "invalid_token"),
        ({"tenant": "nobody"}, 401, "invalid_token"),
        ({"scope": "images:read"}, 403, "insufficient_scope"),
    ],
)
async def test_bad_oauth_tokens_are_refused_with_a_pointer_to_the_metadata(
    oauth_gateway: RunningGateway, issuer: Issuer, claims: dict[str, object], status: int, error: str
) -> None:
    await oauth_gateway.new_api_key("acme")
    response = await oauth_gateway.http.post(
        f"{oauth_gateway.url}/generate", json={"prompt": "x"}, headers=bearer(token_for(issuer, **claims))
    )
    assert response.status_code == status
    challenge = response.headers["www-authenticate"]
    assert f'error="{error}"' in challenge
    assert 'resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/mcp"' in challenge


async def test_an_alg_none_token_is_refused(oauth_gateway: RunningGateway, issuer: Issuer) -> None:
    token = hand_made({"alg": "none", "typ": "JWT"}, issuer.claims(aud="https://mcp.example.com/mcp"))
    response = await oauth_gateway.http.post(f"{oauth_gateway.url}/mcp", json={}, headers=bearer(token))
    assert response.status_code == 401


async def test_protected_resource_metadata_is_published_only_with_an_issuer(
    oauth_gateway: RunningGateway, gateway: RunningGateway, issuer: Issuer
) -> None:
    document = (await oauth_gateway.http.get(f"{oauth_gateway.url}/.well-known/oauth-protected-resource/mcp")).json()
    assert document["resource"] == "https://mcp.example.com/mcp"
    assert document["authorization_servers"] == [issuer.url]
    plain = await gateway.http.get(f"{gateway.url}/.well-known/oauth-protected-resource/mcp")
    assert plain.status_code in (401, 404)
    unauthorized = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"})
    assert "resource_metadata" not in unauthorized.headers["www-authenticate"]


async def test_a_task_is_followed_on_its_own_kling_account_after_the_tenant_moves_to_another(
    gateway: RunningGateway,
) -> None:
    api_key = await gateway.new_api_key("acme")
    task = (await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))).json()
    body = {"access_key": SECONDARY.access_key, "secret_key": SECONDARY.secret_key}
    credential = (await gateway.http.post(f"{gateway.url}/admin/credentials", json=body, headers=ADMIN)).json()
    tenant_id = (await gateway.http.get(f"{gateway.url}/admin/tenants", headers=ADMIN)).json()[0]["id"]
    moved = await gateway.http.put(
        f"{gateway.url}/admin/tenants/{tenant_id}/credentials",
        json={"credential_ids": [credential["id"]]},
        headers=ADMIN,
    )
    assert moved.status_code == 200
    with anyio.fail_after(20):
        followed = await gateway.http.get(
            f"{gateway.url}/tasks/{task['task_id']}", params={"wait_seconds": 10}, headers=bearer(api_key)
        )
    assert followed.json()["status"] == "succeeded"


async def test_two_replicas_applying_the_same_tenants_file_at_once_make_one_tenant(
    redis: Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_KLING_SECRET", PRIMARY.secret_key)
    tenants_file = tmp_path / "tenants.toml"
    tenants_file.write_text(
        f'[[credentials]]\naccess_key = "{PRIMARY.access_key}"\nsecret_key_env = "ACME_KLING_SECRET"\n\n'
        f'[[tenants]]\nname = "acme"\ncredentials = ["{PRIMARY.access_key}"]\n'
    )
    settings = Settings.model_validate({"redis_url": redis_url, "key_pepper": KEY_PEPPER, "master_key": MASTER_KEY})
    clients = [Redis.from_url(redis_url) for _ in range(2)]  # two replicas: each its own connections
    replicas = [admin_directory(settings, client)[0] for client in clients]
    entries = load_tenants_file(str(tenants_file))
    try:
        # Both find nothing and create at the same moment: the loser of each record finds the winner's, at once.
        # Each record is created exactly once, though not always by the same replica: one may win the
        # credential and the other the tenant.
        applied = await asyncio.gather(*(apply_tenants_file(directory, entries) for directory in replicas))
        created = sorted(name for result in applied for name in result.created)
        assert created == [f"credential {PRIMARY.access_key}", "tenant acme"]
        assert [result.updated for result in applied] == [[], []]
        assert [tenant.name for tenant in await replicas[0].store.list_tenants()] == ["acme"]
        assert len(await replicas[1].store.list_credentials()) == 1
    finally:
        for client in clients:
            await client.aclose()


# --- a Kling account on another of Kling's sites (its own base URL) ---


@pytest.fixture
async def china_site(simulator: Simulator) -> AsyncIterator[Simulator]:
    """A second Kling API, as api-beijing is to api-singapore: it knows only its own accounts."""
    config = SimulatorConfig(accounts=(CHINA_ACCOUNT,), delay=0.3)
    async with serve(create_simulator_app(config)) as url, httpx2.AsyncClient(timeout=10) as http:
        yield Simulator(url=url, http=http)


CHINA_ACCOUNT = SimAccount(access_key="ak-china", secret_key="sk-china-" + "c" * 40, concurrency=5)


async def test_a_tenant_whose_kling_account_names_its_own_base_url_runs_its_tasks_there(
    gateway: RunningGateway, simulator: Simulator, china_site: Simulator
) -> None:
    kling = {"access_key": CHINA_ACCOUNT.access_key, "secret_key": CHINA_ACCOUNT.secret_key,
             "base_url": china_site.url + "/"}  # fmt: skip
    created = await gateway.http.post(f"{gateway.url}/admin/tenants", json={"name": "beijing", "kling": kling},
                                      headers=ADMIN)  # fmt: skip
    assert created.status_code == 201, created.text
    issued = await gateway.http.post(f"{gateway.url}/admin/tenants/{created.json()['id']}/keys", json={},
                                     headers=ADMIN)  # fmt: skip
    china_key, global_key = issued.json()["api_key"], await gateway.new_api_key("singapore")
    async with mcp_client(gateway.url, china_key) as session:
        result = await session.call_tool("generate_image", {"prompt": "a pagoda", "wait_seconds": 20})
    assert not result.is_error, text_of(result)
    done = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "a harbour", "wait_seconds": 20},
                                   headers=bearer(global_key))  # fmt: skip
    assert done.status_code == 200, done.text
    assert ((await china_site.stats())["creates"], (await simulator.stats())["creates"]) == (1, 1)
    listed = (await gateway.http.get(f"{gateway.url}/admin/credentials", headers=ADMIN)).json()
    assert {c["access_key"]: c["base_url"] for c in listed} == {CHINA_ACCOUNT.access_key: china_site.url,
                                                                PRIMARY.access_key: None}  # fmt: skip


@pytest.mark.parametrize("base_url", ["ftp://api-beijing.klingai.com", "api-beijing.klingai.com",
                                      "https://user:pw@api-beijing.klingai.com", "https://a.com/?x=1",
                                      "https://a.com:99999", "https://a.com:port"])  # fmt: skip
async def test_a_kling_base_url_that_is_not_a_plain_http_url_is_refused_naming_it(
    gateway: RunningGateway, base_url: str
) -> None:
    body = {"access_key": "ak", "secret_key": "sk-" + "s" * 32, "base_url": base_url}
    refused = await gateway.http.post(f"{gateway.url}/admin/credentials", json=body, headers=ADMIN)
    assert refused.status_code == 422
    assert refused.json()["error"]["field"].endswith("base_url")


async def test_the_tenants_file_sets_and_changes_an_accounts_base_url(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    settings = Settings.model_validate({"redis_url": redis_url, "key_pepper": KEY_PEPPER, "master_key": MASTER_KEY})
    directory = admin_directory(settings, redis)[0]
    secret = {"CHINA_SECRET": CHINA_ACCOUNT.secret_key}
    file = tmp_path / "tenants.toml"
    changes = [
        ("https://api-beijing.klingai.com/", "created"),
        ("https://kling.example.cn", "updated"),
        (None, "updated"),
    ]
    for base_url, expected in changes:
        line = f'base_url = "{base_url}"\n' if base_url else ""
        file.write_text(f'[[credentials]]\naccess_key = "{CHINA_ACCOUNT.access_key}"\nsecret_key_env = "CHINA_SECRET"\n'
                        + line)  # fmt: skip
        applied = await apply_tenants_file(directory, load_tenants_file(str(file)), secret)
        assert getattr(applied, expected) == [f"credential {CHINA_ACCOUNT.access_key}"]
        (credential,) = await directory.store.list_credentials()
        assert credential.base_url == (base_url.rstrip("/") if base_url else None)
        assert directory.kling_credentials(credential).base_url == (credential.base_url or "")
    # Unset, it is not stored at all: replicas of the version before base_url existed still read the record.
    stored = await redis.get(f"kgw:credential:{credential.id}")
    assert stored is not None
    assert "base_url" not in json.loads(stored)


# --- a Kling account by its static API key ---

CONSOLE_KEY = "kling-console-key-" + "q" * 40


async def test_a_tenant_on_a_static_api_key_generates_and_the_key_is_never_shown(
    gateway: RunningGateway, simulator: Simulator
) -> None:
    await simulator.control("accounts", {"access_key": "ak-console", "secret_key": "sk-console-" + "c" * 32,
                                         "api_key": CONSOLE_KEY})  # fmt: skip
    body = {"name": "console", "kling": {"api_key": CONSOLE_KEY}}
    created = await gateway.http.post(f"{gateway.url}/admin/tenants", json=body, headers=ADMIN)
    assert created.status_code == 201, created.text
    issued = await gateway.http.post(f"{gateway.url}/admin/tenants/{created.json()['id']}/keys", json={},
                                     headers=ADMIN)  # fmt: skip
    done = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "a kite", "wait_seconds": 20},
                                   headers=bearer(issued.json()["api_key"]))  # fmt: skip
    assert done.status_code == 200, done.text
    (credential,) = (await gateway.http.get(f"{gateway.url}/admin/credentials", headers=ADMIN)).json()
    assert credential["kind"] == "api_key"
    assert credential["access_key"].startswith("key-")
    audit = (await gateway.http.get(f"{gateway.url}/admin/audit", headers=ADMIN)).text
    assert CONSOLE_KEY not in audit + str(credential)


@pytest.mark.parametrize(
    ("kling", "field"),
    [
        ({"api_key": CONSOLE_KEY, "access_key": "ak"}, "api_key"),
        ({"api_key": CONSOLE_KEY[:10] + "\n" + CONSOLE_KEY[10:]}, "api_key"),
        ({"api_key": "with space " + CONSOLE_KEY}, "api_key"),
        ({"access_key": "ak"}, "access_key"),
        ({}, "access_key"),
    ],
)
async def test_a_kling_account_is_given_by_its_two_keys_or_by_an_api_key_not_both(
    gateway: RunningGateway, kling: dict[str, str], field: str
) -> None:
    refused = await gateway.http.post(f"{gateway.url}/admin/tenants", json={"name": "x", "kling": kling}, headers=ADMIN)
    assert refused.status_code == 422
    assert refused.json()["error"]["field"].endswith(field)  # "kling.api_key" where the key itself is wrong


async def test_the_tenants_file_names_a_static_api_key_and_tenants_refer_to_it_by_that_name(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    settings = Settings.model_validate({"redis_url": redis_url, "key_pepper": KEY_PEPPER, "master_key": MASTER_KEY})
    directory = admin_directory(settings, redis)[0]
    file = tmp_path / "tenants.toml"
    file.write_text('[[credentials]]\nname = "console"\napi_key_env = "CONSOLE_KEY"\n\n'
                    '[[tenants]]\nname = "acme"\ncredentials = ["console"]\n')  # fmt: skip
    applied = await apply_tenants_file(directory, load_tenants_file(str(file)), {"CONSOLE_KEY": CONSOLE_KEY})
    assert applied.created == ["credential console", "tenant acme"]
    (credential,) = await directory.store.list_credentials()
    kling = directory.kling_credentials(credential)
    assert (kling.static_key, kling.secret_key) == (True, CONSOLE_KEY)
    (tenant,) = await directory.store.list_tenants()
    assert tenant.credential_ids == (credential.id,)
    again = await apply_tenants_file(directory, load_tenants_file(str(file)), {"CONSOLE_KEY": CONSOLE_KEY})
    assert (again.created, again.updated) == ([], [])

    file.write_text('[[credentials]]\nname = "console"\napi_key_env = "K"\nsecret_key_env = "S"\n')
    with pytest.raises(TenantsFileError, match="exactly one of api_key_env"):
        load_tenants_file(str(file))
    file.write_text('[[credentials]]\nname = "console"\napi_key = "inline-by-mistake-0123"\n')
    with pytest.raises(TenantsFileError) as inline:
        load_tenants_file(str(file))
    assert "inline-by-mistake-0123" not in str(inline.value)  # the error names the field, never its value
    file.write_text('[[credentials]]\nname = "console"\napi_key_env = "K"\n\n'
                    '[[credentials]]\nname = "console"\napi_key_env = "L"\n')  # fmt: skip
    with pytest.raises(TenantsFileError, match=r"more than one .* called console"):
        load_tenants_file(str(file))
