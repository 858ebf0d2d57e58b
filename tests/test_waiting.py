"""Waiting is coalesced: however many callers wait on a task, on however many replicas, Kling is queried
by one poller at a time, and a replica that stops hands the polling over. Waiters hear at least every 5 s."""

from __future__ import annotations

import faulthandler
import itertools
import signal

import anyio
import httpx2
import pytest
from redis.asyncio import Redis

from app.follower import TaskFollower
from app.http_pool import create_kling_pool
from app.kling import KlingClient, KlingCredentials
from app.models import TaskStatus
from app.tasks import MemoryTaskStore, TaskRecord
from tests.conftest import (
    PRIMARY,
    RunningGateway,
    Simulator,
    bearer,
    gateway_settings,
    mcp_client,
    redis_gateway_settings,
    replica_env,
    running_gateway,
    text_of,
)
from tests.servers import Replica, gateway_process

pytestmark = pytest.mark.anyio
POLL_S = 0.5


async def _queries(simulator: Simulator) -> int:
    queries = (await simulator.stats())["queries"]
    assert isinstance(queries, int)
    return queries


async def _wait_on(http: httpx2.AsyncClient, url: str, task_id: str, headers: dict[str, str]) -> str:
    response = await http.get(f"{url}/tasks/{task_id}", params={"wait_seconds": 20}, headers=headers)
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]
    return status


@pytest.mark.sim_delay(3.0)
async def test_thirty_waiters_on_two_replicas_cost_one_poll_per_interval(
    simulator: Simulator, redis: Redis, redis_url: str
) -> None:
    env = replica_env(redis_url, simulator.url, poll_interval_seconds=str(POLL_S))
    settings = redis_gateway_settings(simulator, redis_url, poll_interval_seconds=POLL_S)
    async with gateway_process(env) as other, running_gateway(settings) as submitter:
        url, http = submitter.url, submitter.http
        headers = bearer(await submitter.new_api_key("acme"))
        created = await http.post(f"{url}/generate", json={"prompt": "a lighthouse"}, headers=headers)
        assert created.status_code == 202, created.text
        task_id = created.json()["task_id"]
        before = await _queries(simulator)
        statuses: list[str] = []

        async def wait_on(replica_url: str) -> None:
            statuses.append(await _wait_on(http, replica_url, task_id, headers))

        started = anyio.current_time()
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                for index in range(30):
                    group.start_soon(wait_on, url if index % 2 else other.url)
        elapsed = anyio.current_time() - started
        queries = await _queries(simulator) - before
    assert statuses == ["succeeded"] * 30
    # One poller backing off from POLL_S (0.5, 1.25, 2.4, 4.1 s...) asks about 4 times for a 3 s task, 5 if
    # the lease changes hands once. Each waiter polling on its own would cost over 90, and one poller per
    # replica about 8.
    assert queries <= 6, f"{queries} queries in {elapsed:.1f} s"


@pytest.mark.sim_delay(1.0)
async def test_tasks_followed_together_on_one_account_are_polled_together(simulator: Simulator) -> None:
    async with running_gateway(gateway_settings(simulator, poll_interval_seconds=POLL_S)) as gateway:
        headers = bearer(await gateway.new_api_key("acme"))
        before = await simulator.stats()
        task_ids = []
        for _ in range(8):
            body = {"prompt": "a lighthouse", "wait_seconds": 0}
            created = await gateway.http.post(f"{gateway.url}/generate", json=body, headers=headers)
            assert created.status_code == 202, created.text
            task_ids.append(created.json()["task_id"])
        with anyio.fail_after(20):
            statuses = [await _wait_on(gateway.http, gateway.url, task_id, headers) for task_id in task_ids]
        after = await simulator.stats()
    assert statuses == ["succeeded"] * 8
    reads, lists = (int(str(after[name])) - int(str(before[name])) for name in ("queries", "lists"))
    # Polled one by one, each 1 s task is asked at 0.5 and 1.25 s: 16 queries. Gathered, a list call a turn.
    assert lists >= 1
    assert reads <= 6, f"{reads} reads, {lists} of them list calls"


@pytest.mark.sim_delay(2.0)
async def test_a_waiter_gets_the_result_after_the_submitting_replica_stops(
    simulator: Simulator, redis: Redis, redis_url: str
) -> None:
    settings = redis_gateway_settings(simulator, redis_url, poll_interval_seconds=POLL_S)
    env = replica_env(redis_url, simulator.url, poll_interval_seconds=str(POLL_S))
    async with running_gateway(settings) as waiter:
        url, http = waiter.url, waiter.http
        headers = bearer(await waiter.new_api_key("acme"))
        async with gateway_process(env) as submitter:
            created = await http.post(f"{submitter.url}/generate", json={"prompt": "x"}, headers=headers)
            assert created.status_code == 202, created.text
            task_id = created.json()["task_id"]
            result: list[str] = []

            async def wait_then_record() -> None:
                result.append(await _wait_on(http, url, task_id, headers))

            # A lapsed poll lease would hand over only after three poll intervals (15 s): this bound needs a release.
            with anyio.fail_after(10):
                await _until_polled(redis, task_id)
                async with anyio.create_task_group() as group:
                    group.start_soon(wait_then_record)
                    await _stop(submitter)  # it gives its poll lease up as it stops: the waiter's replica polls
    assert result == ["succeeded"]


async def _until_polled(redis: Redis, task_id: str) -> None:
    for _ in range(100):  # the submitter takes the lease at its first turn; Redis has no event for it
        if await redis.exists(f"kgw:poller:{task_id}"):
            return
        await anyio.sleep(0.05)
    raise AssertionError("the submitting replica never took the poll lease")


async def _stop(replica: Replica) -> None:
    replica.process.send_signal(signal.SIGTERM)
    await replica.process.wait()


@pytest.mark.sim_delay(11.0)
async def test_progress_keeps_an_mcp_client_alive_at_least_every_5_s_of_a_slow_task(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    arrivals: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append((anyio.current_time(), message))

    async with mcp_client(gateway, api_key) as client:
        started = anyio.current_time()
        with anyio.fail_after(30):
            result = await client.call_tool(
                "generate_image", {"prompt": "x", "wait_seconds": 30}, progress_callback=on_progress
            )
        ended = anyio.current_time()
    assert not result.is_error, text_of(result)
    times = [started, *(at for at, _ in arrivals), ended]
    assert max(later - earlier for earlier, later in itertools.pairwise(times)) <= 5.5
    assert all(message and message.endswith(" s)") for _, message in arrivals)  # e.g. "generating (7 s)"


@pytest.mark.sim_delay(60.0)
async def test_a_caller_waiting_on_a_task_its_follower_gives_up_on_is_answered_then(simulator: Simulator) -> None:
    """A follow can end before its task does (the follower gives up after its longest follow): a caller waiting
    without progress reports is answered at once with the task as it stands, and the worker goes on serving."""
    credentials = KlingCredentials(PRIMARY.access_key, PRIMARY.secret_key, credential_id="c_primary")
    async with create_kling_pool() as pool:
        kling = KlingClient(pool, simulator.url, deadline_s=10)
        task = await kling.create_image_task(credentials, {"model_name": "kling-v1", "prompt": "x", "n": 1})
        record = TaskRecord(
            task_id=task.task_id, tenant_id="t_1", external_task_id="e_1", model_name="kling-v1", num_images=1,
            status=TaskStatus.SUBMITTED, created_at_ms=task.created_at, updated_at_ms=task.updated_at,
            credential_id=credentials.credential_id,
        ).updated_from(task)  # fmt: skip
        store = MemoryTaskStore()
        await store.save(record)
        leases = _SignalledLeases()
        follower = TaskFollower(kling, store, first_interval_s=0.05, max_follow_s=0.3)
        follower.follow(record, credentials, leases)
        # A waiter that spins holds the event loop, where no timeout can fire: end the run (exit 1) after 30 s.
        faulthandler.dump_traceback_later(30, exit=True)
        try:
            with anyio.fail_after(10):
                latest = await follower.wait(record, credentials, 60, None)
                await leases.released.wait()  # the loop went on to its end: the worker was not held by the waiter
        finally:
            faulthandler.cancel_dump_traceback_later()
            await follower.aclose()
    assert latest.task_id == record.task_id
    assert not latest.status.is_terminal


class _SignalledLeases:
    """A task's leases that tell when the follower gives them back."""

    def __init__(self) -> None:
        self.released = anyio.Event()

    async def refresh(self) -> None:
        return None

    async def release(self) -> None:
        self.released.set()
