"""Kling's callbacks: received by any replica, they finish waits on every replica at once."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import replace

import anyio
import pytest
from redis.asyncio import Redis

from app.callbacks import CallbackTokens, TaskUpdates, verify_standard_webhook
from app.models import TaskStatus
from app.tasks import MemoryTaskStore, RedisTaskStore, TaskRecord, TaskStore
from tests.conftest import (
    RunningGateway,
    Simulator,
    bearer,
    gateway_settings,
    redis_gateway_settings,
    replica_env,
    running_gateway,
)
from tests.servers import free_port, gateway_process

pytestmark = pytest.mark.anyio


@pytest.mark.sim_delay(1.0)
async def test_a_wait_on_one_replica_ends_from_a_callback_received_by_another(
    simulator: Simulator, redis: Redis, redis_url: str
) -> None:
    async with gateway_process(replica_env(redis_url, simulator.url)) as receiver:
        # This replica polls only every 10 s: only a callback can end its wait within a second or so.
        settings = redis_gateway_settings(simulator, redis_url, public_url=receiver.url, poll_interval_seconds=10)
        async with running_gateway(settings) as waiter:
            headers = bearer(await waiter.new_api_key("acme"))
            with anyio.fail_after(8):  # the replica's first poll would come only after 10 s
                response = await waiter.http.post(
                    f"{waiter.url}/generate", json={"prompt": "x", "wait_seconds": 15}, headers=headers
                )
    assert response.json()["status"] == "succeeded"
    sent = (await simulator.stats())["callbacks_sent"]
    assert isinstance(sent, int)
    assert sent >= 1


@pytest.mark.sim_delay(0.5)
async def test_with_callbacks_lost_the_fallback_polls_of_one_accounts_tasks_share_a_list_call(
    simulator: Simulator,
) -> None:
    """Kling does not retry a callback: polling finds the ends instead, from 5 s on. Reads of one account that fall
    due within seconds of each other wait for each other, so tasks created half a second apart cost Kling one list call
    rather than a query each."""
    nobody = f"http://127.0.0.1:{free_port()}"  # where the callbacks go: nothing listens, so every one is lost
    async with running_gateway(gateway_settings(simulator, public_url=nobody)) as gateway:
        headers = bearer(await gateway.new_api_key("acme"))
        task_ids = []
        for _ in range(4):  # created in turn, spread over about 1.5 s: their first reads fall due as far apart
            created = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x"}, headers=headers)
            task_ids.append(created.json()["task_id"])
            await anyio.sleep(0.5)
        with anyio.fail_after(20):
            ended = [
                await gateway.http.get(f"{gateway.url}/tasks/{task_id}", params={"wait_seconds": 15}, headers=headers)
                for task_id in task_ids
            ]
    assert [response.json()["status"] for response in ended] == ["succeeded"] * 4
    stats = await simulator.stats()
    assert stats["callbacks_sent"] == 0  # all lost
    assert (stats["queries"], stats["lists"]) == (1, 1)


async def test_callbacks_with_a_forged_token_are_refused(gateway: RunningGateway) -> None:
    forged = CallbackTokens(b"another-key-" + b"x" * 20).token_for("kgw-123")
    response = await gateway.http.post(f"{gateway.url}/callbacks/kling/{forged}", json={"task_id": "1"})
    assert response.status_code == 404


def test_standard_webhook_signatures_are_checked_with_tolerance() -> None:
    secret_bytes = b"s" * 24
    secret = "whsec_" + base64.b64encode(secret_bytes).decode()
    body, timestamp = b'{"task_id": "1"}', str(int(time.time()))
    mac = hmac.new(secret_bytes, f"msg_1.{timestamp}.".encode() + body, hashlib.sha256).digest()
    headers = {"webhook-id": "msg_1", "webhook-timestamp": timestamp,
               "webhook-signature": "v1,bogus v1," + base64.b64encode(mac).decode()}  # fmt: skip
    assert verify_standard_webhook(secret, headers, body)
    assert not verify_standard_webhook(secret, headers, body + b" ")
    assert not verify_standard_webhook(secret, headers | {"webhook-timestamp": str(int(time.time()) - 3600)}, body)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_state_older_than_the_recorded_one_never_replaces_it(backend: str, redis: Redis) -> None:
    """A poll answer still under way while another replica recorded the callback's final state arrives late:
    the record stays final, or waiters and `GET /tasks` would see a finished task running again."""
    store: TaskStore = MemoryTaskStore() if backend == "memory" else RedisTaskStore(redis)
    processing = TaskRecord(
        task_id="task-late-poll", tenant_id="t_1", external_task_id="e_1", model_name="kling-v1", num_images=1,
        status=TaskStatus.PROCESSING, created_at_ms=1_000, updated_at_ms=2_000,
    )  # fmt: skip
    succeeded = replace(processing, status=TaskStatus.SUCCEEDED, updated_at_ms=3_000, images=[(0, "https://x/0")])
    assert await store.save(succeeded)
    assert not await store.save(processing)
    assert await store.get("task-late-poll") == succeeded
    corrected = replace(succeeded, status_message="re-sent")  # the same moment again: the later write wins
    assert await store.save(corrected)
    assert await store.get("task-late-poll") == corrected


async def test_only_a_state_recorded_with_announce_reaches_the_other_replicas(redis: Redis) -> None:
    """Recording and publishing are one step: what was refused (older) or saved quietly is never heard."""
    store = RedisTaskStore(redis)
    submitted = TaskRecord(
        task_id="task-announced", tenant_id="t_1", external_task_id="e_1", model_name="kling-v1", num_images=1,
        status=TaskStatus.SUBMITTED, created_at_ms=1_000, updated_at_ms=1_000,
    )  # fmt: skip
    succeeded = replace(submitted, status=TaskStatus.SUCCEEDED, updated_at_ms=3_000, images=[(0, "https://x/0")])
    processing = replace(submitted, status=TaskStatus.PROCESSING, updated_at_ms=2_000)
    sent, heard = anyio.create_memory_object_stream[TaskRecord](10)
    later = replace(succeeded, status_message="later")
    async with sent, heard, TaskUpdates(redis).listening(sent.send_nowait):
        assert await store.save(submitted)  # quietly, as a new task is recorded
        assert await store.save(succeeded, announce=True)
        assert not await store.save(processing, announce=True)  # older: neither recorded nor published
        assert await store.save(later, announce=True)
        with anyio.fail_after(5):
            # One channel delivers in order: had the quiet or the refused state been published, it came first.
            assert [await heard.receive(), await heard.receive()] == [succeeded, later]
