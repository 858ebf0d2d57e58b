"""The REST edge: POST /generate, GET /tasks/{id}, errors as JSON, tenant isolation, health and docs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from tests.conftest import ADMIN, SECONDARY, RunningGateway, Simulator, bearer, gateway_settings, running_gateway

pytestmark = pytest.mark.anyio


async def test_submit_returns_202_and_polling_the_task_returns_its_images(gateway: RunningGateway) -> None:
    headers = bearer(await gateway.new_api_key("acme"))
    submitted = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "a red fox"}, headers=headers)
    assert submitted.status_code == 202
    task = submitted.json()
    assert task["status"] in ("submitted", "processing")
    assert task["images"] == []

    with anyio.fail_after(20):
        polled = await gateway.http.get(
            f"{gateway.url}/tasks/{task['task_id']}", params={"wait_seconds": 15}, headers=headers
        )
    assert polled.status_code == 200
    assert polled.json()["status"] == "succeeded"
    image = await gateway.http.get(polled.json()["images"][0]["url"])
    assert image.headers["content-type"] == "image/png"


async def test_waiting_on_submit_returns_200_with_the_images(gateway: RunningGateway) -> None:
    headers = bearer(await gateway.new_api_key("acme"))
    with anyio.fail_after(20):
        response = await gateway.http.post(
            f"{gateway.url}/generate", json={"prompt": "two cats", "num_images": 2, "wait_seconds": 15}, headers=headers
        )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "succeeded"
    assert len(body["images"]) == 2
    assert body["images_expire_at"] > body["created_at"]


async def test_another_tenants_task_is_not_found(gateway: RunningGateway) -> None:
    acme = bearer(await gateway.new_api_key("acme"))
    globex = bearer(await gateway.new_api_key("globex", SECONDARY))
    task = (await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "a fox"}, headers=acme)).json()

    foreign = await gateway.http.get(f"{gateway.url}/tasks/{task['task_id']}", headers=globex)
    assert foreign.status_code == 404
    assert foreign.json()["error"]["type"] == "not_found"
    assert (await gateway.http.get(f"{gateway.url}/tasks/{task['task_id']}", headers=acme)).status_code == 200


async def test_each_tenant_is_billed_to_its_own_kling_account(gateway: RunningGateway, simulator: Simulator) -> None:
    globex = bearer(await gateway.new_api_key("globex", SECONDARY))
    response = await gateway.http.post(
        f"{gateway.url}/generate", json={"prompt": "a fox", "num_images": 3}, headers=globex
    )
    assert response.status_code == 202
    in_flight = (await simulator.stats())["in_flight"]
    assert isinstance(in_flight, dict)
    assert in_flight.get(SECONDARY.access_key) == 3
    assert not in_flight.get("ak-primary")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "num_images": 10}, "num_images"),
        ({"prompt": "x", "num_images": "2"}, "num_images"),
        ({"prompt": "x", "unknown": 1}, "unknown"),
        ({}, "prompt"),
        ({"prompt": "x", "ref_image_url": "/etc/passwd"}, "ref_image_url"),
        ({"prompt": "x", "ref_image_url": "https://example.com/a.png", "negative_prompt": "no"}, "negative_prompt"),
        ({"prompt": "x", "model_name": "kling-v2-new"}, "ref_image_url"),
        ({"prompt": "x", "wait_seconds": -1}, "wait_seconds"),
    ],
)
async def test_bad_input_gets_422_naming_the_field_and_reaches_nothing(
    gateway: RunningGateway, simulator: Simulator, body: dict[str, Any], field: str
) -> None:
    headers = bearer(await gateway.new_api_key("acme"))
    response = await gateway.http.post(f"{gateway.url}/generate", json=body, headers=headers)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field
    assert (await simulator.stats())["creates"] == 0


async def test_malformed_json_gets_422(gateway: RunningGateway) -> None:
    headers = {**bearer(await gateway.new_api_key("acme")), "Content-Type": "application/json"}
    response = await gateway.http.post(f"{gateway.url}/generate", content=b"{not json", headers=headers)
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-gateway-key"},
        {"Authorization": "Bearer kgw_AAAAAAAAAAAA_" + "B" * 32},
        {"X-API-Key": "kgw_AAAAAAAAAAAA_" + "B" * 32},
    ],
)
async def test_missing_malformed_or_unknown_keys_get_401(gateway: RunningGateway, headers: dict[str, str]) -> None:
    response = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["type"] == "unauthorized"


async def test_x_api_key_header_is_accepted(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    response = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers={"X-API-Key": api_key})
    assert response.status_code == 202


async def test_a_revoked_key_is_refused_at_once(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    key_id = api_key.split("_")[1]
    revoked = await gateway.http.delete(f"{gateway.url}/admin/keys/{key_id}", headers=ADMIN)
    assert revoked.status_code == 204
    response = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers=bearer(api_key))
    assert response.status_code == 401


async def test_a_malformed_idempotency_key_header_is_refused_by_name(
    gateway: RunningGateway, simulator: Simulator
) -> None:
    headers = {**bearer(await gateway.new_api_key("acme")), "Idempotency-Key": "has spaces"}
    response = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "a fox"}, headers=headers)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "Idempotency-Key"
    assert (await simulator.stats())["creates"] == 0


async def test_the_same_idempotency_key_replays_the_same_task(gateway: RunningGateway, simulator: Simulator) -> None:
    headers = {**bearer(await gateway.new_api_key("acme")), "Idempotency-Key": "order-42"}
    first = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "a fox"}, headers=headers)
    second = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "a fox"}, headers=headers)
    assert first.json()["task_id"] == second.json()["task_id"]
    assert (await simulator.stats())["creates"] == 1

    changed = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "a wolf"}, headers=headers)
    assert changed.status_code == 422
    assert changed.json()["error"]["field"] == "idempotency_key"


async def test_a_key_used_again_with_other_arguments_after_its_day_creates_a_new_task(
    redis_gateway: RunningGateway, simulator: Simulator, redis: Redis
) -> None:
    headers = {**bearer(await redis_gateway.new_api_key("acme")), "Idempotency-Key": "order-43"}
    fox = await redis_gateway.http.post(f"{redis_gateway.url}/generate", json={"prompt": "a fox"}, headers=headers)
    (record,) = await redis.keys("kgw:idem:*")
    await redis.delete(record)  # what its 24 hours do
    wolf = await redis_gateway.http.post(f"{redis_gateway.url}/generate", json={"prompt": "a wolf"}, headers=headers)
    assert (fox.status_code, wolf.status_code) == (202, 202), wolf.text
    assert wolf.json()["task_id"] != fox.json()["task_id"]  # not the fox's task, whose images are of a fox
    assert (await simulator.stats())["creates"] == 2


async def test_concurrent_duplicates_with_one_idempotency_key_create_one_task(
    gateway: RunningGateway, simulator: Simulator
) -> None:
    headers = bearer(await gateway.new_api_key("acme"))
    body = {"prompt": "a fox", "idempotency_key": "burst-1"}
    task_ids: list[str] = []

    async def submit() -> None:
        response = await gateway.http.post(f"{gateway.url}/generate", json=body, headers=headers)
        assert response.status_code == 202, response.text
        task_ids.append(response.json()["task_id"])

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(submit)
    assert len(set(task_ids)) == 1
    assert (await simulator.stats())["creates"] == 1


async def test_a_1303_from_kling_means_no_slot_yet_and_is_waited_out(
    gateway: RunningGateway, simulator: Simulator
) -> None:
    await simulator.control("faults", {"code": 1303, "http_status": 429, "times": 1, "path": "create"})
    headers = bearer(await gateway.new_api_key("acme"))
    with anyio.fail_after(20):
        response = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 202
    stats = await simulator.stats()
    assert (stats["rejected_1303"], stats["creates"]) == (1, 1)


async def test_kling_busy_past_the_queue_timeout_becomes_429_with_retry_after(simulator: Simulator) -> None:
    await simulator.control("faults", {"code": 1303, "http_status": 429, "times": 10, "path": "create"})
    async with running_gateway(gateway_settings(simulator, queue_timeout_seconds=0.5)) as running:
        response = await running.http.post(
            f"{running.url}/generate", json={"prompt": "x"}, headers=bearer(await running.new_api_key("a"))
        )
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"]["limit"] == "kling_account"


async def test_a_malformed_kling_answer_becomes_502(gateway: RunningGateway, simulator: Simulator) -> None:
    await simulator.control("malformed", {"times": 1, "path": "create"})
    headers = bearer(await gateway.new_api_key("acme"))
    response = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_unavailable"


async def test_health_readiness_and_docs_are_served(gateway: RunningGateway) -> None:
    assert (await gateway.http.get(f"{gateway.url}/healthz")).json() == {"status": "ok"}
    assert (await gateway.http.get(f"{gateway.url}/readyz")).status_code == 200
    assert (await gateway.http.get(f"{gateway.url}/docs")).status_code == 200
    schema = (await gateway.http.get(f"{gateway.url}/openapi.json")).json()
    assert {"/generate", "/tasks/{task_id}", "/admin/tenants"} <= set(schema["paths"])


async def test_rest_works_the_same_on_the_redis_store(redis_gateway: RunningGateway) -> None:
    headers = bearer(await redis_gateway.new_api_key("acme"))
    with anyio.fail_after(20):
        response = await redis_gateway.http.post(
            f"{redis_gateway.url}/generate", json={"prompt": "a fox", "wait_seconds": 15}, headers=headers
        )
    assert response.status_code == 200
    task_id = response.json()["task_id"]
    assert (await redis_gateway.http.get(f"{redis_gateway.url}/tasks/{task_id}", headers=headers)).status_code == 200


async def test_an_oversized_body_is_refused_with_413_before_parsing(simulator: Simulator) -> None:
    async with running_gateway(gateway_settings(simulator, max_body_bytes=4096)) as running:
        url, http = running.url, running.http
        response = await http.post(f"{url}/generate", json={"prompt": "x" * 5000})

        async def chunks() -> AsyncIterator[bytes]:
            for chunk in (b'{"prompt": "', b"x" * 5000, b'"}'):
                yield chunk

        chunked = await http.post(f"{url}/generate", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "payload_too_large"
    assert chunked.status_code == 413


async def streamed_statuses(gateway: RunningGateway) -> list[str]:
    """Create a task (wait 0) and follow its events stream to the end; the statuses it sent."""
    headers = bearer(await gateway.new_api_key("acme"))
    body = {"prompt": "x", "wait_seconds": 0}
    task = (await gateway.http.post(f"{gateway.url}/generate", json=body, headers=headers)).json()
    statuses: list[str] = []
    with anyio.fail_after(20):
        async with gateway.http.stream(
            "GET", f"{gateway.url}/tasks/{task['task_id']}/events", headers=headers
        ) as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            async for line in events.aiter_lines():
                if line.startswith("data: "):
                    statuses.append(json.loads(line.removeprefix("data: "))["status"])
    return statuses


@pytest.mark.sim_delay(1.0)
async def test_the_events_stream_reports_each_status_and_ends_with_the_result(gateway: RunningGateway) -> None:
    statuses = await streamed_statuses(gateway)
    assert statuses[-1] == "succeeded"
    # Each status once, in the order a task goes through them.
    assert statuses == [s for s in ("submitted", "processing", "succeeded") if s in statuses]
    assert "processing" in statuses or "submitted" in statuses


@pytest.mark.sim_delay(1.0)
async def test_the_events_stream_follows_a_task_where_callers_may_not_wait_at_all(simulator: Simulator) -> None:
    # A wait limit of 0 caps what callers wait for, not the stream's own rounds (which would then never pause).
    async with running_gateway(gateway_settings(simulator, max_wait_seconds=0)) as gateway:
        statuses = await streamed_statuses(gateway)
    assert statuses[-1] == "succeeded"


async def test_the_events_stream_of_another_tenants_task_is_404(gateway: RunningGateway) -> None:
    acme = bearer(await gateway.new_api_key("acme"))
    globex = bearer(await gateway.new_api_key("globex", SECONDARY))
    task = (await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers=acme)).json()
    response = await gateway.http.get(f"{gateway.url}/tasks/{task['task_id']}/events", headers=globex)
    assert response.status_code == 404


async def test_a_path_nothing_serves_answers_the_json_404_every_rest_error_has(gateway: RunningGateway) -> None:
    """Only /mcp and the legacy SSE paths go to the MCP transports; anything else unknown is the REST API's 404."""
    for path in ("/nope", "/sse/extra", "/messages", "/tasks", "/mcpx"):
        response = await gateway.http.get(f"{gateway.url}{path}")
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found", path
    unauthenticated = await gateway.http.post(f"{gateway.url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert unauthenticated.status_code == 401
