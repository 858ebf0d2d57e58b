"""The limiter and account-governor contract, run against both backends; two replicas and Redis failures."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import pytest
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

import app.ratelimit
from app.errors import InvalidRequest, LimitsUnavailable, RateLimited
from app.main import create_redis
from app.ratelimit import (
    LOCAL_PREFIX,
    AccountGovernor,
    Admission,
    FallbackGovernor,
    FallbackLimiter,
    Limiter,
    MemoryAccountGovernor,
    MemoryLimiter,
    RedisAccountGovernor,
    RedisLimiter,
    Remaining,
    TenantLimits,
)
from tests.servers import free_port

pytestmark = pytest.mark.anyio
T = TypeVar("T")
TENANT = "t_acme"
CREDENTIAL = "c_kling"
HIGH = 1_000  # a limit that a test never reaches


@contextlib.asynccontextmanager
async def production_client(url: str) -> AsyncIterator[Redis]:
    """A client built as the gateway builds the limiter's: short timeouts, a blocking pool, no retries."""
    client = create_redis(url, retries=0)
    try:
        yield client
    finally:
        await client.aclose()


@dataclass
class Backend:
    name: str
    redis: Redis | None

    def limiter(self, lease_ttl_s: float = 60.0) -> Limiter:
        if self.redis is None:
            return MemoryLimiter(lease_ttl_s=lease_ttl_s)
        return RedisLimiter(self.redis, lease_ttl_s=lease_ttl_s)

    def governor(self, lease_ttl_s: float = 60.0) -> AccountGovernor:
        if self.redis is None:
            return MemoryAccountGovernor(lease_ttl_s=lease_ttl_s)
        return RedisAccountGovernor(self.redis, lease_ttl_s=lease_ttl_s)

    async def queued(self, governor: AccountGovernor, credential_id: str = CREDENTIAL) -> int:
        """How many waiters are in the account's FIFO queue."""
        if self.redis is None:
            assert isinstance(governor, MemoryAccountGovernor)
            return len(governor._queues.get(credential_id, {}))
        return int(await self.redis.zcard(f"kgw:gov:{{c:{credential_id}}}:queue"))


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield Backend("memory", None)
        return
    async with production_client(request.getfixturevalue("redis_url")) as client:
        await client.flushdb()
        yield Backend("redis", client)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    async with production_client(redis_url) as client:
        await client.flushdb()
        yield client


@pytest.fixture
async def dead_redis() -> AsyncIterator[Redis]:
    """A client for a loopback port nothing listens on: every command fails with a connection error."""
    async with production_client(f"redis://127.0.0.1:{free_port()}") as client:
        yield client


async def concurrently(count: int, call: Callable[[int], Awaitable[T]]) -> tuple[list[T], list[RateLimited]]:
    """Run `call(0..count-1)` at once, each after a random 0-1 ms, and sort the outcomes (reliability.md §1.5)."""
    admitted: list[T] = []
    refused: list[RateLimited] = []

    async def one(index: int) -> None:
        await anyio.sleep(random.random() / 1000)
        try:
            admitted.append(await call(index))
        except RateLimited as exc:
            refused.append(exc)

    async with anyio.create_task_group() as group:
        for index in range(count):
            group.start_soon(one, index)
    return admitted, refused


async def refused_by(limit: str, call: Awaitable[object]) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await call
    assert caught.value.details["limit"] == limit
    assert caught.value.status == 429
    assert caught.value.retry_after is not None
    assert caught.value.retry_after >= 1
    return caught.value


async def until_queued(backend: Backend, governor: AccountGovernor, count: int) -> None:
    """Poll (bounded) until `count` waiters are queued: the queue has no event to await."""
    with anyio.fail_after(2):
        while True:
            if await backend.queued(governor) == count:
                return
            await anyio.sleep(0.005)


@dataclass
class Waiter:
    """An `acquire` running in its own task and cancel scope; `done` is set once it holds its lease."""

    slots: int
    done: anyio.Event
    scope: anyio.CancelScope
    lease: str | None = None


def start_waiter(
    group: TaskGroup, governor: AccountGovernor, slots: int, capacity: int = 4, wait_s: float = 10
) -> Waiter:
    waiter = Waiter(slots, anyio.Event(), anyio.CancelScope())

    async def run() -> None:
        with waiter.scope:
            waiter.lease = await governor.acquire(CREDENTIAL, slots, capacity, wait_s)
            waiter.done.set()

    group.start_soon(run)
    return waiter


async def completes(waiter: Waiter) -> str:
    with anyio.fail_after(2):
        await waiter.done.wait()
    assert waiter.lease is not None
    return waiter.lease


# --- Rate limits ----------------------------------------------------------------------------------------


async def test_concurrent_requests_are_admitted_exactly_up_to_the_rate(backend: Backend) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=10)
    admitted, refused = await concurrently(40, lambda _: limiter.admit_request(TENANT, "k1", limits))
    assert len(admitted) == 10
    assert len(refused) == 30
    for refusal in refused:
        assert refusal.details["limit"] == "requests_per_minute"
        assert refusal.retry_after is not None
        assert refusal.retry_after >= 1


async def test_the_per_key_rate_limits_each_key_on_its_own(backend: Backend) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=HIGH, requests_per_minute_per_key=2)

    def on_key(key_id: str) -> Callable[[int], Awaitable[Remaining]]:
        return lambda _: limiter.admit_request(TENANT, key_id, limits)

    for key_id in ("key-a", "key-b"):
        admitted, refused = await concurrently(5, on_key(key_id))
        assert len(admitted) == 2
        assert {refusal.details["limit"] for refusal in refused} == {"requests_per_minute_per_key"}
    await refused_by("requests_per_minute_per_key", limiter.admit_task(TENANT, "key-a", limits, 1))
    assert (await limiter.admit_task(TENANT, "key-c", limits, 1)).remaining.requests_this_minute == 1


async def test_tenants_do_not_share_rate_limits(backend: Backend) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=1)
    await limiter.admit_request("t_one", "k", limits)
    await refused_by("requests_per_minute", limiter.admit_request("t_one", "k", limits))
    await limiter.admit_request("t_two", "k", limits)


# --- Concurrency and daily images -----------------------------------------------------------------------


async def test_concurrent_tasks_are_admitted_exactly_up_to_the_limit_and_release_frees_one(backend: Backend) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=HIGH, concurrent_tasks=3)
    admitted, refused = await concurrently(8, lambda _: limiter.admit_task(TENANT, "k1", limits, 1))
    assert len(admitted) == 3
    assert len({admission.lease_id for admission in admitted}) == 3
    assert len(refused) == 5
    assert {refusal.details["limit"] for refusal in refused} == {"concurrent_tasks"}

    await limiter.release(TENANT, admitted[0].lease_id)
    await limiter.release(TENANT, admitted[0].lease_id)  # idempotent: frees nothing more
    await limiter.admit_task(TENANT, "k1", limits, 1)
    await refused_by("concurrent_tasks", limiter.admit_task(TENANT, "k1", limits, 1))


async def test_daily_images_are_reserved_per_task_and_refunds_give_room_again(backend: Backend) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=HIGH, concurrent_tasks=HIGH, images_per_day=5)
    first = await limiter.admit_task(TENANT, "k1", limits, 2)
    await limiter.admit_task(TENANT, "k1", limits, 2)
    refusal = await refused_by("images_per_day", limiter.admit_task(TENANT, "k1", limits, 2))
    assert refusal.retry_after is not None
    assert refusal.retry_after <= 86_400

    await limiter.release(TENANT, first.lease_id, refund_images=2)
    again = await limiter.admit_task(TENANT, "k1", limits, 2)
    assert again.remaining.images_today == 1
    await limiter.release(TENANT, first.lease_id, refund_images=2)  # a second release refunds nothing
    await refused_by("images_per_day", limiter.admit_task(TENANT, "k1", limits, 2))


async def test_a_task_refused_on_concurrency_consumes_no_rate_and_no_images(backend: Backend) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=6, concurrent_tasks=1, images_per_day=2)
    held = await limiter.admit_task(TENANT, "k1", limits, 1)
    for _ in range(5):
        await refused_by("concurrent_tasks", limiter.admit_task(TENANT, "k1", limits, 1))
    await limiter.release(TENANT, held.lease_id)

    second = await limiter.admit_task(TENANT, "k1", limits, 1)
    assert second.remaining == Remaining(requests_this_minute=4, concurrent_tasks=0, images_today=0)
    for _ in range(4):
        await limiter.admit_request(TENANT, "k1", limits)
    await refused_by("requests_per_minute", limiter.admit_request(TENANT, "k1", limits))


async def test_a_task_refused_on_rate_takes_no_lease_and_no_images(backend: Backend) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=HIGH, requests_per_minute_per_key=1, concurrent_tasks=1, images_per_day=1)
    first = await limiter.admit_task(TENANT, "key-a", limits, 1)
    await limiter.release(TENANT, first.lease_id, refund_images=1)
    for _ in range(3):
        await refused_by("requests_per_minute_per_key", limiter.admit_task(TENANT, "key-a", limits, 1))
    admitted = await limiter.admit_task(TENANT, "key-b", limits, 1)
    assert admitted.remaining.concurrent_tasks == 0
    assert admitted.remaining.images_today == 0


async def test_a_task_refused_on_images_consumes_no_rate_and_no_lease(backend: Backend) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=3, concurrent_tasks=1, images_per_day=2)
    for _ in range(3):
        await refused_by("images_per_day", limiter.admit_task(TENANT, "k1", limits, 3))
    admitted = await limiter.admit_task(TENANT, "k1", limits, 2)
    assert admitted.remaining == Remaining(requests_this_minute=2, concurrent_tasks=0, images_today=0)


async def test_remaining_reports_what_is_left_of_each_limit(backend: Backend) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=10, concurrent_tasks=3, images_per_day=10)
    assert await limiter.admit_request(TENANT, "k1", limits) == Remaining(requests_this_minute=9)
    assert await limiter.admit_request(TENANT, "k1", limits) == Remaining(requests_this_minute=8)
    first = await limiter.admit_task(TENANT, "k1", limits, 3)
    assert first.remaining == Remaining(requests_this_minute=7, concurrent_tasks=2, images_today=7)
    second = await limiter.admit_task(TENANT, "k1", limits, 2)
    assert second.remaining == Remaining(requests_this_minute=6, concurrent_tasks=1, images_today=5)
    await limiter.release(TENANT, first.lease_id, refund_images=3)
    third = await limiter.admit_task(TENANT, "k1", limits, 1)
    assert third.remaining == Remaining(requests_this_minute=5, concurrent_tasks=1, images_today=7)


async def test_remaining_requests_is_the_tighter_of_the_tenant_and_key_rates(backend: Backend) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=10, requests_per_minute_per_key=3)
    assert (await limiter.admit_request(TENANT, "key-a", limits)).requests_this_minute == 2
    assert (await limiter.admit_request(TENANT, "key-b", limits)).requests_this_minute == 2
    loose = TenantLimits(requests_per_minute=4, requests_per_minute_per_key=HIGH)
    assert (await limiter.admit_request("t_other", "key-a", loose)).requests_this_minute == 3


# --- Leases ---------------------------------------------------------------------------------------------


async def test_a_lease_that_is_not_refreshed_expires_and_a_refreshed_one_survives(backend: Backend) -> None:
    limiter = backend.limiter(lease_ttl_s=0.3)
    limits = TenantLimits(requests_per_minute=HIGH, concurrent_tasks=1)
    abandoned = await limiter.admit_task(TENANT, "k1", limits, 1)
    await refused_by("concurrent_tasks", limiter.admit_task(TENANT, "k1", limits, 1))

    with anyio.fail_after(1):  # no event marks an expiry: ask until the slot comes back
        while True:
            try:
                kept = await limiter.admit_task(TENANT, "k1", limits, 1)
                break
            except RateLimited:
                await anyio.sleep(0.02)
    assert not await limiter.refresh(TENANT, abandoned.lease_id)

    admitted_at = time.monotonic()
    while time.monotonic() - admitted_at < 0.45:  # well past the original 0.3 s, refreshing every 0.1 s
        await anyio.sleep(0.1)
        assert await limiter.refresh(TENANT, kept.lease_id)
    await refused_by("concurrent_tasks", limiter.admit_task(TENANT, "k1", limits, 1))
    await limiter.release(TENANT, kept.lease_id)
    await limiter.admit_task(TENANT, "k1", limits, 1)


async def test_refreshing_a_lease_past_its_expiry_fails_even_before_anything_purges_it(backend: Backend) -> None:
    limiter = backend.limiter(lease_ttl_s=0.3)
    limits = TenantLimits(requests_per_minute=HIGH, concurrent_tasks=2)
    lost = await limiter.admit_task(TENANT, "k1", limits, 1)
    expires_by = time.monotonic() + 0.3
    await anyio.sleep(0.2)
    await limiter.admit_task(TENANT, "k1", limits, 1)  # keeps the tenant's lease keys alive past `lost`
    await anyio.sleep(max(0.0, expires_by + 0.05 - time.monotonic()))
    assert not await limiter.refresh(TENANT, lost.lease_id)


async def test_a_lapsed_lease_refreshed_with_retake_counts_again_until_released(backend: Backend) -> None:
    # Leases lapse after 0.5 s: the retaken ones must outlive the three checks that follow their retake.
    limiter, governor = backend.limiter(lease_ttl_s=0.5), backend.governor(lease_ttl_s=0.5)
    limits = TenantLimits(requests_per_minute=HIGH, concurrent_tasks=1)
    slots = await governor.acquire(CREDENTIAL, 3, 4, 0)  # first, so it has lapsed when the tenant's lease has
    running = await limiter.admit_task(TENANT, "k1", limits, 1)
    with anyio.fail_after(2):  # no event marks an expiry: ask until the slot comes back
        while True:
            try:
                await limiter.release(TENANT, (await limiter.admit_task(TENANT, "k1", limits, 1)).lease_id)
                break
            except RateLimited:
                await anyio.sleep(0.02)
    assert not await limiter.refresh(TENANT, running.lease_id, retake=1)
    assert not await governor.refresh(CREDENTIAL, slots, retake=3)
    await refused_by("concurrent_tasks", limiter.admit_task(TENANT, "k1", limits, 1))  # the task counts again
    assert await governor.try_acquire(CREDENTIAL, 2, 4) is None  # and so do its 3 slots of 4
    assert await limiter.refresh(TENANT, running.lease_id, retake=1)  # held again: a plain refresh
    await limiter.release(TENANT, running.lease_id)
    await governor.release(CREDENTIAL, slots)
    await limiter.admit_task(TENANT, "k1", limits, 1)
    assert await governor.try_acquire(CREDENTIAL, 4, 4) is not None


async def test_a_refunded_rate_charge_admits_another_request_in_its_place(backend: Backend) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=2, requests_per_minute_per_key=2, concurrent_tasks=HIGH)
    first = await limiter.admit_task(TENANT, "k1", limits, 1)
    await limiter.admit_task(TENANT, "k1", limits, 1)
    await refused_by("requests_per_minute", limiter.admit_task(TENANT, "k1", limits, 1))
    await limiter.release(TENANT, first.lease_id)
    await limiter.refund_rate(TENANT, "k1", limits, first.lease_id)
    await limiter.admit_task(TENANT, "k1", limits, 1)  # the tenant's and the key's buckets both gave one back
    await refused_by("requests_per_minute", limiter.admit_task(TENANT, "k1", limits, 1))


async def test_a_refund_after_utc_midnight_does_not_free_images_of_the_new_day(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = backend.limiter()
    limits = TenantLimits(requests_per_minute=HIGH, concurrent_tasks=HIGH, images_per_day=2)
    monkeypatch.setattr(app.ratelimit, "utc_day", lambda now=None: "2030-01-01")
    yesterday = await limiter.admit_task(TENANT, "k1", limits, 2)
    monkeypatch.setattr(app.ratelimit, "utc_day", lambda now=None: "2030-01-02")
    await limiter.admit_task(TENANT, "k1", limits, 2)
    await limiter.release(TENANT, yesterday.lease_id, refund_images=2)
    await refused_by("images_per_day", limiter.admit_task(TENANT, "k1", limits, 2))


# --- Account governor -----------------------------------------------------------------------------------


async def test_a_waiter_for_account_slots_is_served_when_enough_are_released(backend: Backend) -> None:
    governor = backend.governor()
    holder = await governor.acquire(CREDENTIAL, 3, 4, 0)
    async with anyio.create_task_group() as group:
        waiter = start_waiter(group, governor, slots=2)
        await until_queued(backend, governor, 1)
        assert not waiter.done.is_set()
        await governor.release(CREDENTIAL, holder)
        lease = await completes(waiter)
    assert await backend.queued(governor) == 0
    assert await governor.refresh(CREDENTIAL, lease)
    await governor.release(CREDENTIAL, lease)
    await governor.release(CREDENTIAL, lease)  # idempotent
    assert not await governor.refresh(CREDENTIAL, lease)


async def test_a_waiter_whose_wait_runs_out_is_refused_and_leaves_the_queue(backend: Backend) -> None:
    governor = backend.governor()
    holder = await governor.acquire(CREDENTIAL, 4, 4, 0)
    with anyio.fail_after(2):
        await refused_by("kling_account", governor.acquire(CREDENTIAL, 1, 4, 0.2))
    assert await backend.queued(governor) == 0
    await governor.release(CREDENTIAL, holder)
    await governor.acquire(CREDENTIAL, 4, 4, 0)  # nobody is left ahead of it


async def test_a_request_for_more_slots_than_the_account_has_is_refused_at_once(backend: Backend) -> None:
    governor = backend.governor()
    with anyio.fail_after(0.5), pytest.raises(InvalidRequest) as caught:
        await governor.acquire(CREDENTIAL, 5, 4, 10)
    assert (caught.value.status, caught.value.details["field"]) == (422, "num_images")
    assert await backend.queued(governor) == 0
    await governor.acquire(CREDENTIAL, 4, 4, 0)


async def test_a_cancelled_waiter_leaves_the_queue_at_once(backend: Backend) -> None:
    governor = backend.governor()
    await governor.acquire(CREDENTIAL, 3, 4, 0)
    async with anyio.create_task_group() as group:
        head = start_waiter(group, governor, slots=2)
        await until_queued(backend, governor, 1)
        behind = start_waiter(group, governor, slots=1)  # would fit, but waits behind the head
        await until_queued(backend, governor, 2)
        assert not behind.done.is_set()
        head.scope.cancel()
        await completes(behind)  # long before a stale waiter would be dropped (5 s)
    assert not head.done.is_set()
    assert await backend.queued(governor) == 0


async def test_the_queue_is_strictly_fifo_so_a_big_request_is_not_starved(backend: Backend) -> None:
    governor = backend.governor()
    holder = await governor.acquire(CREDENTIAL, 3, 4, 0)
    async with anyio.create_task_group() as group:
        big = start_waiter(group, governor, slots=4)
        await until_queued(backend, governor, 1)
        small = start_waiter(group, governor, slots=1)
        await until_queued(backend, governor, 2)
        assert not small.done.is_set()  # it would fit beside the holder, but the big one is first

        await governor.release(CREDENTIAL, holder)
        big_lease = await completes(big)
        assert not small.done.is_set()
        await governor.release(CREDENTIAL, big_lease)
        await completes(small)


async def test_a_try_takes_free_slots_at_once_and_never_takes_a_place_in_the_queue(backend: Backend) -> None:
    governor = backend.governor()
    first = await governor.try_acquire(CREDENTIAL, 3, 4)
    assert first is not None
    assert await governor.try_acquire(CREDENTIAL, 2, 4) is None  # one slot left
    assert await governor.try_acquire(CREDENTIAL, 5, 4) is None  # never fits; `acquire` says why (422)
    assert await backend.queued(governor) == 0
    await governor.release(CREDENTIAL, first)
    second = await governor.try_acquire(CREDENTIAL, 4, 4)
    assert second is not None
    assert await governor.refresh(CREDENTIAL, second)


async def test_a_try_does_not_jump_the_queue(backend: Backend) -> None:
    governor = backend.governor()
    holder = await governor.acquire(CREDENTIAL, 3, 4, 0)
    async with anyio.create_task_group() as group:
        big = start_waiter(group, governor, slots=2)
        await until_queued(backend, governor, 1)
        assert await governor.try_acquire(CREDENTIAL, 1, 4) is None  # it would fit, but a waiter is first
        await governor.release(CREDENTIAL, holder)
        await completes(big)
    assert await governor.try_acquire(CREDENTIAL, 1, 4) is not None  # nobody queues now, and it fits


async def test_a_caller_that_hangs_up_during_its_admission_is_charged_no_lease_and_no_images(
    redis_client: Redis,
) -> None:
    """The script may have admitted it before the hang-up reached it: what it took goes back at once."""
    limiter = RedisLimiter(redis_client, lease_ttl_s=60)
    limits = TenantLimits(requests_per_minute=HIGH, concurrent_tasks=1, images_per_day=2)
    admitting = asyncio.ensure_future(limiter.admit_task(TENANT, "k1", limits, 2))
    await asyncio.sleep(0)  # one turn: its script call is made, and goes out in the next
    admitting.cancel()
    with anyio.fail_after(2), pytest.raises(asyncio.CancelledError):
        await admitting
    admitted = await limiter.admit_task(TENANT, "k1", limits, 2)  # neither the lease nor the images are held
    assert admitted.remaining == Remaining(requests_this_minute=HIGH - 2, concurrent_tasks=0, images_today=0)


async def test_a_try_whose_caller_hangs_up_leaves_no_slot_taken(redis_client: Redis) -> None:
    governor = RedisAccountGovernor(redis_client, lease_ttl_s=60)
    scripts_run = await scripts_run_by(redis_client)
    trying = asyncio.ensure_future(governor.try_acquire(CREDENTIAL, 4, 4))
    await asyncio.sleep(0)  # one turn: its script call is made, and goes out in the next
    trying.cancel()
    with anyio.fail_after(2), pytest.raises(asyncio.CancelledError):
        await trying
    assert await scripts_run_by(redis_client) == scripts_run + 2  # the try ran, and then the release
    assert await governor.try_acquire(CREDENTIAL, 4, 4) is not None


async def scripts_run_by(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)) for command in ("evalsha", "eval"))


async def test_with_a_fallback_a_dead_redis_has_a_try_take_a_share_of_account_slots_locally(dead_redis: Redis) -> None:
    """At once, as `acquire` falls back: asking the dead Redis again would cost the submission another timeout."""
    governor = FallbackGovernor(
        RedisAccountGovernor(dead_redis, lease_ttl_s=60), MemoryAccountGovernor(lease_ttl_s=60), replicas=2
    )
    first, second = await governor.try_acquire(CREDENTIAL, 1, 4), await governor.try_acquire(CREDENTIAL, 1, 4)
    assert first is not None
    assert first.startswith(LOCAL_PREFIX)
    assert second is not None
    assert await governor.try_acquire(CREDENTIAL, 1, 4) is None  # this replica's share is 2 of 4
    await governor.release(CREDENTIAL, first)
    assert await governor.try_acquire(CREDENTIAL, 1, 4) is not None


# --- Two replicas on one Redis --------------------------------------------------------------------------


async def test_two_replicas_on_one_redis_share_the_limits(redis_url: str) -> None:
    async with production_client(redis_url) as first, production_client(redis_url) as second:
        await first.flushdb()
        replicas = [RedisLimiter(first, lease_ttl_s=60), RedisLimiter(second, lease_ttl_s=60)]
        limits = TenantLimits(requests_per_minute=10, concurrent_tasks=3)
        admitted, refused = await concurrently(20, lambda i: replicas[i % 2].admit_request(TENANT, f"k{i % 2}", limits))
        assert len(admitted) == 10
        assert {refusal.details["limit"] for refusal in refused} == {"requests_per_minute"}

        other = "t_other"
        roomy = TenantLimits(requests_per_minute=HIGH, concurrent_tasks=3)
        tasks, _ = await concurrently(8, lambda i: replicas[i % 2].admit_task(other, "k", roomy, 1))
        assert len(tasks) == 3
        await replicas[0].release(other, tasks[0].lease_id)  # a lease taken on one replica, freed by another
        await replicas[1].admit_task(other, "k", roomy, 1)
        await refused_by("concurrent_tasks", replicas[0].admit_task(other, "k", roomy, 1))


async def test_two_replicas_on_one_redis_share_the_account_queue(redis_url: str) -> None:
    async with production_client(redis_url) as first, production_client(redis_url) as second:
        await first.flushdb()
        one, two = RedisAccountGovernor(first, lease_ttl_s=60), RedisAccountGovernor(second, lease_ttl_s=60)
        backend = Backend("redis", first)
        held = await one.acquire(CREDENTIAL, 3, 4, 0)
        await refused_by("kling_account", two.acquire(CREDENTIAL, 2, 4, 0.1))
        async with anyio.create_task_group() as group:
            head = start_waiter(group, two, slots=4)
            await until_queued(backend, two, 1)
            behind = start_waiter(group, one, slots=1)  # would fit beside the holder, but waits behind the head
            await until_queued(backend, one, 2)
            assert not head.done.is_set()
            assert not behind.done.is_set()

            await two.release(CREDENTIAL, held)  # taken on one replica, released on the other
            head_lease = await completes(head)
            assert not behind.done.is_set()
            await one.release(CREDENTIAL, head_lease)
            await completes(behind)
        assert await backend.queued(one) == 0


# --- When Redis fails -----------------------------------------------------------------------------------


async def test_without_a_fallback_a_dead_redis_refuses_everything_quickly(dead_redis: Redis) -> None:
    limiter = FallbackLimiter(RedisLimiter(dead_redis, lease_ttl_s=60), None, replicas=2)
    governor = FallbackGovernor(RedisAccountGovernor(dead_redis, lease_ttl_s=60), None, replicas=2)
    limits = TenantLimits()
    with anyio.fail_after(3):
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: limiter.admit_request(TENANT, "k1", limits),
            lambda: limiter.admit_task(TENANT, "k1", limits, 1),
            lambda: governor.acquire(CREDENTIAL, 1, 4, 1),
        ]
        for call in calls:
            with pytest.raises(LimitsUnavailable) as caught:
                await call()
            assert caught.value.status == 503
            assert caught.value.retry_after is not None
            assert caught.value.retry_after >= 1


async def test_with_a_fallback_a_dead_redis_admits_a_per_replica_share_of_the_rate(dead_redis: Redis) -> None:
    limiter = FallbackLimiter(RedisLimiter(dead_redis, lease_ttl_s=60), MemoryLimiter(lease_ttl_s=60), replicas=2)
    limits = TenantLimits(requests_per_minute=10)
    with anyio.fail_after(3):
        admitted, refused = await concurrently(12, lambda _: limiter.admit_request(TENANT, "k1", limits))
    assert len(admitted) == 5
    assert {refusal.details["limit"] for refusal in refused} == {"requests_per_minute"}


async def test_with_a_fallback_a_dead_redis_admits_a_per_replica_share_of_tasks(dead_redis: Redis) -> None:
    limiter = FallbackLimiter(RedisLimiter(dead_redis, lease_ttl_s=60), MemoryLimiter(lease_ttl_s=60), replicas=2)
    limits = TenantLimits(requests_per_minute=HIGH, concurrent_tasks=4, images_per_day=5)
    with anyio.fail_after(3):
        admissions: list[Admission] = [await limiter.admit_task(TENANT, "k1", limits, 1) for _ in range(2)]
        await refused_by("concurrent_tasks", limiter.admit_task(TENANT, "k1", limits, 1))
        assert all(admission.lease_id.startswith(LOCAL_PREFIX) for admission in admissions)
        assert await limiter.refresh(TENANT, admissions[0].lease_id)

        await limiter.release(TENANT, admissions[0].lease_id, refund_images=1)
        await limiter.release(TENANT, admissions[0].lease_id, refund_images=1)
        assert not await limiter.refresh(TENANT, admissions[0].lease_id)
        replacement = await limiter.admit_task(TENANT, "k1", limits, 1)
        assert replacement.remaining.images_today == 0  # a share of 5 // 2 = 2 images, 1 refunded
        await limiter.release(TENANT, replacement.lease_id)
        await refused_by("images_per_day", limiter.admit_task(TENANT, "k1", limits, 1))


async def test_with_a_fallback_a_dead_redis_grants_a_per_replica_share_of_account_slots(dead_redis: Redis) -> None:
    governor = FallbackGovernor(
        RedisAccountGovernor(dead_redis, lease_ttl_s=60), MemoryAccountGovernor(lease_ttl_s=60), replicas=2
    )
    with anyio.fail_after(3):
        leases = [await governor.acquire(CREDENTIAL, 1, 4, 0) for _ in range(2)]
        assert all(lease.startswith(LOCAL_PREFIX) for lease in leases)
        await refused_by("kling_account", governor.acquire(CREDENTIAL, 1, 4, 0.1))
        assert await governor.refresh(CREDENTIAL, leases[0])
        await governor.release(CREDENTIAL, leases[0])
        await governor.release(CREDENTIAL, leases[1])
        big = await governor.acquire(CREDENTIAL, 3, 4, 0)  # the share is at least the slots asked for
        assert big.startswith(LOCAL_PREFIX)
        await refused_by("kling_account", governor.acquire(CREDENTIAL, 1, 4, 0))
        await governor.release(CREDENTIAL, big)
        await governor.acquire(CREDENTIAL, 1, 4, 0)


async def test_with_a_fallback_a_dead_redis_still_refuses_more_slots_than_the_account_has(dead_redis: Redis) -> None:
    governor = FallbackGovernor(
        RedisAccountGovernor(dead_redis, lease_ttl_s=60), MemoryAccountGovernor(lease_ttl_s=60), replicas=2
    )
    with anyio.fail_after(3), pytest.raises(InvalidRequest):
        await governor.acquire(CREDENTIAL, 9, 4, 0)


async def test_a_paused_redis_fails_fast_and_admissions_resume_after_it(redis_client: Redis, redis_url: str) -> None:
    limiter = FallbackLimiter(RedisLimiter(redis_client, lease_ttl_s=60), None, replicas=2)
    limits = TenantLimits(requests_per_minute=HIGH)
    await limiter.admit_request(TENANT, "k1", limits)  # scripts loaded, a connection in the pool
    async with production_client(redis_url) as admin:
        await admin.client_pause(1500, all=True)
    with anyio.fail_after(1.5):
        with pytest.raises(LimitsUnavailable) as caught:
            await limiter.admit_request(TENANT, "k1", limits)
    assert isinstance(caught.value.__cause__, RedisTimeoutError)
    with anyio.fail_after(3):
        while True:
            try:
                await limiter.admit_request(TENANT, "k1", limits)
                break
            except LimitsUnavailable:
                await anyio.sleep(0.05)


async def test_a_command_or_pipeline_cut_off_by_the_timeout_leaves_no_answer_for_the_next(redis_url: str) -> None:
    """The client's socket timeout ends a command mid-read; its late answer must never be read as a later one's."""
    async with production_client(redis_url) as client, production_client(redis_url) as admin:
        await client.set("kgw:test:a", "A")
        # Two connections open before the pause: the command's is dropped when it is cut off, and the pipeline
        # must be sent on the other (a new one's handshake would be held by the pause, and nothing sent).
        await asyncio.gather(client.get("kgw:test:a"), client.get("kgw:test:a"))
        await admin.client_pause(3000, all=True)
        with pytest.raises(RedisTimeoutError, match="reading"):
            await client.get("kgw:test:a")
        cut_off = client.pipeline(transaction=False)
        cut_off.get("kgw:test:a")  # queued: a pipeline's commands are sent by execute()
        cut_off.incr("kgw:test:n")
        with pytest.raises(RedisTimeoutError, match="reading"):  # raised, not answered: cut off before the pause's end
            await cut_off.execute()
        with anyio.fail_after(5):
            while True:  # the pause ends; asking again is the observation
                try:
                    await client.set("kgw:test:b", "B")
                    break
                except RedisTimeoutError:
                    await anyio.sleep(0.05)
        assert await client.get("kgw:test:b") == b"B"
        answered = client.pipeline(transaction=False)
        answered.get("kgw:test:a")
        answered.get("kgw:test:b")
        assert await answered.execute() == [b"A", b"B"]
