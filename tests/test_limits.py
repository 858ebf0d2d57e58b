"""Limits through running gateways on real Redis: exact across replicas, leak-proof, and safe when Redis fails."""

from __future__ import annotations

import re
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx2
import pytest
from redis.asyncio import Redis

from tests.conftest import (
    ADMIN,
    RunningGateway,
    Simulator,
    bearer,
    gateway_settings,
    mcp_client,
    redis_gateway_settings,
    replica_env,
    running_gateway,
)
from tests.servers import RedisProcess, gateway_process

pytestmark = pytest.mark.anyio
SHARED_ACCOUNT = {"access_key": "ak-shared", "secret_key": "sk-shared-" + "z" * 32}


async def set_limits(gateway: RunningGateway, **limits: int) -> None:
    tenant_id = (await gateway.http.get(f"{gateway.url}/admin/tenants", headers=ADMIN)).json()[-1]["id"]
    body = {"requests_per_minute": 1000, "concurrent_tasks": 100, "images_per_day": 10_000} | limits
    response = await gateway.http.put(f"{gateway.url}/admin/tenants/{tenant_id}/limits", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text


async def burst(http: httpx2.AsyncClient, urls: list[str], count: int, headers: dict[str, str],
                body: dict[str, Any]) -> list[httpx2.Response]:  # fmt: skip
    """`count` simultaneous submissions, spread over the replicas at `urls`."""
    responses: list[httpx2.Response] = []

    async def submit(index: int) -> None:
        responses.append(await http.post(f"{urls[index % len(urls)]}/generate", json=body, headers=headers))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for index in range(count):
                group.start_soon(submit, index)
    return responses


ACCOUNT_SLOTS_ADMITTED = re.escape('kgw_limiter_decisions_total{limit="kling_account",result="admitted"}')


async def account_slots_admitted(http: httpx2.AsyncClient, urls: list[str]) -> float:
    """Account slots the replicas at `urls` counted as admitted (`/metrics`), in all."""
    total = 0.0
    for url in urls:
        metrics = (await http.get(f"{url}/metrics")).text
        found = re.search(rf"^{ACCOUNT_SLOTS_ADMITTED} (\S+)$", metrics, re.MULTILINE)
        total += float(found.group(1)) if found else 0.0
    return total


def statuses(responses: list[httpx2.Response]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for response in responses:
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
    return counts


@pytest.fixture
async def replica_b(simulator: Simulator, redis: Redis, redis_url: str) -> AsyncIterator[str]:
    async with gateway_process(replica_env(redis_url, simulator.url)) as replica:
        yield replica.url


async def test_forty_simultaneous_submissions_over_two_replicas_admit_exactly_ten_per_minute(
    redis_gateway: RunningGateway, replica_b: str
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    await set_limits(redis_gateway, requests_per_minute=10)
    responses = await burst(redis_gateway.http, [redis_gateway.url, replica_b], 40, bearer(api_key), {"prompt": "x"})
    assert statuses(responses) == {202: 10, 429: 30}
    refused = next(response for response in responses if response.status_code == 429)
    assert refused.json()["error"]["limit"] == "requests_per_minute"
    assert int(refused.headers["retry-after"]) >= 1


@pytest.mark.sim_delay(5.0)
async def test_eight_simultaneous_against_three_concurrent_tasks_admit_three(
    redis_gateway: RunningGateway, replica_b: str
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    await set_limits(redis_gateway, concurrent_tasks=3)
    responses = await burst(redis_gateway.http, [redis_gateway.url, replica_b], 8, bearer(api_key), {"prompt": "x"})
    assert statuses(responses) == {202: 3, 429: 5}
    assert {r.json()["error"]["limit"] for r in responses if r.status_code == 429} == {"concurrent_tasks"}


async def test_a_daily_quota_of_five_images_refuses_the_third_two_image_request(
    redis_gateway: RunningGateway,
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    await set_limits(redis_gateway, images_per_day=5)
    answers = []
    for _ in range(3):
        response = await redis_gateway.http.post(
            f"{redis_gateway.url}/generate", json={"prompt": "x", "num_images": 2}, headers=bearer(api_key)
        )
        answers.append(response)
    assert [response.status_code for response in answers] == [202, 202, 429]
    assert answers[1].json()["quota"]["images_today"] == 1
    assert answers[2].json()["error"]["limit"] == "images_per_day"


async def test_more_images_than_the_account_runs_at_once_is_refused_before_anything_is_charged(
    redis_gateway: RunningGateway, simulator: Simulator
) -> None:
    api_key = await redis_gateway.new_api_key("acme", concurrency=4)
    await set_limits(redis_gateway, requests_per_minute=2)
    too_many = [
        await redis_gateway.http.post(
            f"{redis_gateway.url}/generate", json={"prompt": "x", "num_images": 9}, headers=bearer(api_key)
        )
        for _ in range(3)
    ]
    assert {response.status_code for response in too_many} == {422}
    assert too_many[0].json()["error"]["field"] == "num_images"
    assert "at most 4 images at once" in too_many[0].json()["error"]["message"]
    fitting = await redis_gateway.http.post(
        f"{redis_gateway.url}/generate", json={"prompt": "x", "num_images": 4}, headers=bearer(api_key)
    )
    assert fitting.status_code == 202, fitting.text  # the refusals took none of the two requests a minute
    assert fitting.json()["quota"]["requests_this_minute"] == 1
    assert (await simulator.stats())["create_attempts"] == 1


@pytest.mark.sim_delay(30.0)
async def test_submissions_refused_for_want_of_an_account_slot_cost_no_rate(
    simulator: Simulator, redis: Redis, redis_url: str
) -> None:
    settings = redis_gateway_settings(simulator, redis_url, queue_timeout_seconds=0.3)
    async with running_gateway(settings) as running:
        api_key = await running.new_api_key("acme", concurrency=1)
        await set_limits(running, requests_per_minute=2)
        answers = [
            await running.http.post(f"{running.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
            for _ in range(3)
        ]
    assert [answer.status_code for answer in answers] == [202, 429, 429]
    assert answers[0].json()["quota"]["requests_this_minute"] == 1  # two a minute, as set
    # Both waited for the account's one slot, held by the first task, and were refused for it; neither was charged,
    # or the third would have been refused by the rate (two a minute) before it could wait.
    assert [answer.json()["error"]["limit"] for answer in answers[1:]] == ["kling_account", "kling_account"]


async def test_submissions_kling_refuses_with_1303_until_their_deadline_cost_no_rate(simulator: Simulator) -> None:
    await simulator.control("faults", {"code": 1303, "http_status": 429, "times": 100, "path": "create"})
    async with running_gateway(gateway_settings(simulator, queue_timeout_seconds=0.5)) as running:
        api_key = await running.new_api_key("acme")
        await set_limits(running, requests_per_minute=2)
        answers = [
            await running.http.post(f"{running.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
            for _ in range(3)
        ]
    # Another client of the account held its slots: a refusal on concurrency, which leaves the rate as it was.
    assert [(answer.status_code, answer.json()["error"]["limit"]) for answer in answers] == [(429, "kling_account")] * 3


async def test_two_tenants_sharing_a_four_slot_account_complete_ten_tasks_without_a_1303(
    redis_gateway: RunningGateway, replica_b: str, simulator: Simulator
) -> None:
    await simulator.control("accounts", SHARED_ACCOUNT | {"concurrency": 4})
    http, admin = redis_gateway.http, f"{redis_gateway.url}/admin"
    credential = (await http.post(f"{admin}/credentials", json=SHARED_ACCOUNT | {"concurrency": 4},
                                  headers=ADMIN)).json()  # fmt: skip
    keys = []
    for name in ("acme", "globex"):
        tenant = (await http.post(f"{admin}/tenants", json={"name": name, "credential_ids": [credential["id"]]},
                                  headers=ADMIN)).json()  # fmt: skip
        keys.append((await http.post(f"{admin}/tenants/{tenant['id']}/keys", json={}, headers=ADMIN)).json()["api_key"])
    task_ids: list[tuple[str, str]] = []

    async def submit(index: int) -> None:
        api_key = keys[index % 2]
        url = (redis_gateway.url, replica_b)[index % 2]
        body = {"prompt": f"task {index}", "num_images": 1 + index % 2}
        response = await http.post(f"{url}/generate", json=body, headers=bearer(api_key))
        assert response.status_code == 202, response.text
        task_ids.append((api_key, response.json()["task_id"]))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for index in range(10):
                group.start_soon(submit, index)
        for api_key, task_id in task_ids:
            done = await http.get(f"{redis_gateway.url}/tasks/{task_id}", params={"wait_seconds": 30},
                                  headers=bearer(api_key))  # fmt: skip
            assert done.json()["status"] == "succeeded"
    stats = await simulator.stats()
    assert (stats["creates"], stats["rejected_1303"]) == (10, 0)


@pytest.mark.sim_delay(60.0)
async def test_leases_of_a_killed_replica_come_back_by_expiry(
    redis_gateway: RunningGateway, redis_url: str, simulator: Simulator
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    await set_limits(redis_gateway, concurrent_tasks=1)
    env = replica_env(redis_url, simulator.url, lease_ttl_seconds="1")
    async with gateway_process(env) as doomed:
        held = await redis_gateway.http.post(f"{doomed.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
        assert held.status_code == 202
        doomed.process.send_signal(signal.SIGKILL)
        await doomed.process.wait()
    killed_at = time.monotonic()
    refused = await redis_gateway.http.post(
        f"{redis_gateway.url}/generate", json={"prompt": "y"}, headers=bearer(api_key)
    )
    assert refused.status_code == 429
    with anyio.fail_after(5):
        # No event marks a lease's expiry in Redis: asking again is the observation.
        while (await redis_gateway.http.post(f"{redis_gateway.url}/generate", json={"prompt": "y"},  # noqa: ASYNC110
                                             headers=bearer(api_key))).status_code == 429:  # fmt: skip
            await anyio.sleep(0.1)
    assert time.monotonic() - killed_at < 3


async def tenant_holding_the_only_slot(gateway: RunningGateway, simulator: Simulator) -> tuple[dict[str, Any], str]:
    """A tenant on a one-slot Kling account, whose slot a running task holds; returns (tenant, API key)."""
    await simulator.control("accounts", SHARED_ACCOUNT | {"concurrency": 1})
    http, admin = gateway.http, f"{gateway.url}/admin"
    body = {"name": "acme", "kling": SHARED_ACCOUNT | {"concurrency": 1}}
    tenant = (await http.post(f"{admin}/tenants", json=body, headers=ADMIN)).json()
    api_key = (await http.post(f"{admin}/tenants/{tenant['id']}/keys", json={}, headers=ADMIN)).json()["api_key"]
    first = await http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
    assert first.status_code == 202  # holds the account's only slot while the simulator's task runs
    return tenant, api_key


@pytest.mark.sim_delay(60.0)
async def test_a_cancelled_call_frees_its_lease_and_queue_place_at_once(
    redis_gateway: RunningGateway, simulator: Simulator, redis: Redis
) -> None:
    tenant, api_key = await tenant_holding_the_only_slot(redis_gateway, simulator)
    queue = f"kgw:gov:{{c:{tenant['credential_ids'][0]}}}:queue"
    leases = f"kgw:rl:{{t:{tenant['id']}}}:leases"

    async with mcp_client(redis_gateway, api_key) as client, anyio.create_task_group() as group:

        async def queued_call() -> None:
            await client.call_tool("generate_image", {"prompt": "queued", "wait_seconds": 0})
            pytest.fail("the call should have been waiting for a slot")

        group.start_soon(queued_call)
        with anyio.fail_after(5):
            while await redis.zcard(queue) != 1:  # noqa: ASYNC110 - Redis state is the observation
                await anyio.sleep(0.02)
        assert await redis.zcard(leases) == 2
        group.cancel_scope.cancel()  # the client gives the call up
    with anyio.fail_after(2):
        while await redis.zcard(queue) or await redis.zcard(leases) != 1:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    assert (await simulator.stats())["creates"] == 1


@pytest.mark.sim_delay(60.0)
async def test_submissions_the_rate_limit_refuses_leave_no_account_slot_taken(
    redis_gateway: RunningGateway, replica_b: str, simulator: Simulator, redis: Redis
) -> None:
    """A submission tries for its account's slot while its admission is decided (one round trip): the slot of one
    refused comes back at once, not when its lease lapses, and no refused one joins the queue or counts as
    admitted to the account."""
    await simulator.control("accounts", SHARED_ACCOUNT | {"concurrency": 4})
    http, admin = redis_gateway.http, f"{redis_gateway.url}/admin"
    body = {"name": "acme", "kling": SHARED_ACCOUNT | {"concurrency": 4}}
    tenant = (await http.post(f"{admin}/tenants", json=body, headers=ADMIN)).json()
    api_key = (await http.post(f"{admin}/tenants/{tenant['id']}/keys", json={}, headers=ADMIN)).json()["api_key"]
    await set_limits(redis_gateway, requests_per_minute=2)
    slots = f"kgw:gov:{{c:{tenant['credential_ids'][0]}}}"
    replicas = [redis_gateway.url, replica_b]
    admitted_before = await account_slots_admitted(http, replicas)
    responses = await burst(http, replicas, 12, bearer(api_key), {"prompt": "x"})
    assert statuses(responses) == {202: 2, 429: 10}
    assert await account_slots_admitted(http, replicas) - admitted_before == 2
    # The two admitted tasks run for a minute; every refused submission is answered, its slot given back.
    assert await redis.zcard(f"{slots}:leases") == 2
    assert await redis.zcard(f"{slots}:queue") == 0
    assert (await simulator.stats())["creates"] == 2


@pytest.fixture
def restartable_redis() -> Iterator[RedisProcess]:
    with tempfile.TemporaryDirectory() as workdir:
        redis = RedisProcess(workdir)
        redis.start()
        try:
            yield redis
        finally:
            redis.stop()


async def test_while_redis_is_away_generation_gets_503_and_service_resumes_by_itself(
    simulator: Simulator, restartable_redis: RedisProcess
) -> None:
    async with running_gateway(redis_gateway_settings(simulator, restartable_redis.url)) as running:
        url, http = running.url, running.http
        headers = bearer(await running.new_api_key("acme"))
        assert (await http.post(f"{url}/generate", json={"prompt": "x"}, headers=headers)).status_code == 202

        restartable_redis.stop()
        started = time.monotonic()
        with anyio.fail_after(10):
            down = await http.post(f"{url}/generate", json={"prompt": "x"}, headers=headers)
        assert down.status_code == 503
        assert int(down.headers["retry-after"]) >= 1
        assert time.monotonic() - started < 5  # no hang
        assert (await http.get(f"{url}/readyz")).status_code == 503

        restartable_redis.start()
        with anyio.fail_after(10):
            while (await http.post(f"{url}/generate", json={"prompt": "x"}, headers=headers)).status_code != 202:  # noqa: ASYNC110
                await anyio.sleep(0.2)  # the pool reconnects on its own; asking again is the observation
        assert (await http.get(f"{url}/readyz")).status_code == 200


async def test_an_mcp_call_over_a_limit_is_an_error_result_naming_the_limit(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    await set_limits(gateway, requests_per_minute=1)
    async with mcp_client(gateway, api_key) as client:
        first = await client.call_tool("generate_image", {"prompt": "x", "wait_seconds": 0})
        second = await client.call_tool("generate_image", {"prompt": "y", "wait_seconds": 0})
    assert not first.is_error
    assert isinstance(first.structured_content, dict)
    assert first.structured_content["quota"]["requests_this_minute"] == 0
    assert second.is_error
    assert isinstance(second.structured_content, dict)
    error = second.structured_content["error"]
    assert (error["type"], error["limit"]) == ("rate_limited", "requests_per_minute")
    assert error["retry_after"] >= 1


@pytest.mark.sim_delay(3.0)
async def test_a_failed_status_query_after_the_create_still_returns_the_task(
    gateway: RunningGateway, simulator: Simulator
) -> None:
    await simulator.control("faults", {"code": 5001, "http_status": 503, "times": 100, "path": "query"})
    api_key = await gateway.new_api_key("acme")
    with anyio.fail_after(10):
        response = await gateway.http.post(
            f"{gateway.url}/generate", json={"prompt": "x", "wait_seconds": 1}, headers=bearer(api_key)
        )
    assert response.status_code == 202
    assert response.json()["task_id"]


async def test_a_create_whose_answer_times_out_is_found_and_adopted_not_paid_twice(simulator: Simulator) -> None:
    await simulator.control("slow", {"seconds": 2.0, "times": 1, "path": "create"})
    async with running_gateway(gateway_settings(simulator, kling_timeout_seconds=0.5)) as running:
        api_key = await running.new_api_key("acme")
        response = await running.http.post(f"{running.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
    # The adopted task may already have finished while its lost answer was awaited: 200 is fine too.
    assert response.status_code in (200, 202)
    assert response.json()["task_id"]
    assert (await simulator.stats())["creates"] == 1


async def test_the_tenants_default_model_applies_over_mcp(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    tenant_id = (await gateway.http.get(f"{gateway.url}/admin/tenants", headers=ADMIN)).json()[0]["id"]
    policy = {"allowed_models": ["kling-v2-1"], "default_model": "kling-v2-1"}
    await gateway.http.put(f"{gateway.url}/admin/tenants/{tenant_id}/policy", json=policy, headers=ADMIN)
    async with mcp_client(gateway, api_key) as client:
        result = await client.call_tool("generate_image", {"prompt": "x", "wait_seconds": 0})
    assert not result.is_error
    assert isinstance(result.structured_content, dict)
    assert result.structured_content["model_name"] == "kling-v2-1"


@pytest.mark.sim_delay(60.0)
async def test_a_rest_caller_hanging_up_frees_its_lease_and_queue_place_at_once(
    redis_gateway: RunningGateway, simulator: Simulator, redis: Redis
) -> None:
    tenant, api_key = await tenant_holding_the_only_slot(redis_gateway, simulator)
    queue = f"kgw:gov:{{c:{tenant['credential_ids'][0]}}}:queue"
    leases = f"kgw:rl:{{t:{tenant['id']}}}:leases"

    async with anyio.create_task_group() as group:

        async def queued_call() -> None:
            async with httpx2.AsyncClient(timeout=30) as caller:
                await caller.post(f"{redis_gateway.url}/generate", json={"prompt": "y"}, headers=bearer(api_key))

        group.start_soon(queued_call)
        with anyio.fail_after(5):
            while await redis.zcard(queue) != 1:  # noqa: ASYNC110 - Redis state is the observation
                await anyio.sleep(0.02)
        assert await redis.zcard(leases) == 2
        group.cancel_scope.cancel()  # the caller hangs up
    with anyio.fail_after(2):
        while await redis.zcard(queue) or await redis.zcard(leases) != 1:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    assert (await simulator.stats())["creates"] == 1


@pytest.mark.sim_delay(4.0)
async def test_a_running_tasks_lease_is_renewed_while_its_follower_waits_for_callbacks(
    redis_gateway: RunningGateway, redis_url: str, simulator: Simulator
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    await set_limits(redis_gateway, concurrent_tasks=1)
    # With a public URL Kling calls back and polling waits 5 s and more between turns: longer than this 1 s lease.
    env = replica_env(redis_url, simulator.url, lease_ttl_seconds="1", public_url="http://127.0.0.1:9")
    async with gateway_process(env) as replica:
        held = await redis_gateway.http.post(f"{replica.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
        assert held.status_code == 202, held.text
        await anyio.sleep(2.5)  # two lease lifetimes pass while the task runs at Kling (4 s)
        refused = await redis_gateway.http.post(f"{replica.url}/generate", json={"prompt": "y"},
                                                headers=bearer(api_key))  # fmt: skip
    assert refused.status_code == 429
    assert refused.json()["error"]["limit"] == "concurrent_tasks"


@pytest.mark.sim_delay(30.0)
async def test_a_running_tasks_lease_that_redis_lost_is_taken_again_and_reported(
    redis_gateway: RunningGateway, redis: Redis, redis_url: str, simulator: Simulator
) -> None:
    api_key = await redis_gateway.new_api_key("acme")
    await set_limits(redis_gateway, concurrent_tasks=1)
    tenant_id = (await redis_gateway.http.get(f"{redis_gateway.url}/admin/tenants", headers=ADMIN)).json()[-1]["id"]
    leases = f"kgw:rl:{{t:{tenant_id}}}:leases"
    env = replica_env(redis_url, simulator.url, lease_ttl_seconds="1", public_url="http://127.0.0.1:9")
    async with gateway_process(env) as replica:
        held = await redis_gateway.http.post(f"{replica.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
        assert held.status_code == 202, held.text
        await redis.delete(leases, f"kgw:rl:{{t:{tenant_id}}}:weights")  # as a Redis restarted without its data
        with anyio.fail_after(5):
            while not await redis.exists(leases):  # noqa: ASYNC110 - Redis's state is the observation
                await anyio.sleep(0.05)
        refused = await redis_gateway.http.post(f"{replica.url}/generate", json={"prompt": "y"},
                                                headers=bearer(api_key))  # fmt: skip
        metrics = (await redis_gateway.http.get(f"{replica.url}/metrics")).text
    assert refused.status_code == 429
    assert refused.json()["error"]["limit"] == "concurrent_tasks"
    retaken = re.search(r'^kgw_leases_retaken_total\{kind="tenant"\} (\S+)$', metrics, re.MULTILINE)
    assert retaken is not None
    assert float(retaken[1]) >= 1  # more, should the replica stall past its 1 s lease again
