"""A task outlives the replica that followed it: another replica adopts it, so its end is still handled
(waiters woken, webhook delivered) once, and a callback heard where nobody follows the task counts too."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import anyio
import anyio.lowlevel
import pytest
from redis.asyncio import Redis

from app.follower import TaskFollower
from app.http_pool import create_kling_pool
from app.kling import KlingClient, KlingCredentials
from app.models import TaskStatus
from app.tasks import MemoryTaskStore, PollClaim, PollLease, RedisTaskStore, TaskRecord, TaskStore
from tests.conftest import PRIMARY, Simulator, bearer, redis_gateway_settings, running_gateway

pytestmark = pytest.mark.anyio
CREDENTIALS = KlingCredentials(PRIMARY.access_key, PRIMARY.secret_key, credential_id="c_primary")


@pytest.fixture
async def kling(simulator: Simulator) -> AsyncIterator[KlingClient]:
    async with create_kling_pool() as pool:
        yield KlingClient(pool, simulator.url, deadline_s=10)


async def _submitted(kling: KlingClient, store: RedisTaskStore) -> TaskRecord:
    task = await kling.create_image_task(CREDENTIALS, {"model_name": "kling-v1", "prompt": "x", "n": 1})
    record = TaskRecord(
        task_id=task.task_id, tenant_id="t_1", external_task_id="e_1", model_name="kling-v1", num_images=1,
        status=TaskStatus.SUBMITTED, created_at_ms=task.created_at, updated_at_ms=task.updated_at,
        credential_id=CREDENTIALS.credential_id, webhook_url="https://hooks.example.com/x",
    ).updated_from(task)  # fmt: skip
    # As the gateway records a task it submits; then that replica stops, giving the poll lease up.
    await store.save(record, polled_by=PollLease("stopped-replica", 60))
    await store.release_polling(record.task_id, "stopped-replica")
    return record


class _NoLeases:
    """Leases of a task whose limits these tests do not look at."""

    async def refresh(self) -> None:
        return None

    async def release(self) -> None:
        return None


@pytest.mark.sim_delay(1.0)
async def test_a_task_whose_replica_stopped_is_adopted_once_and_its_end_handled(
    kling: KlingClient, redis: Redis
) -> None:
    store = RedisTaskStore(redis)
    record = await _submitted(kling, store)
    stopped = TaskFollower(kling, store, first_interval_s=0.05)
    stopped.follow(record, CREDENTIALS, _NoLeases())
    await anyio.lowlevel.checkpoint()  # its follow loop starts, and pauses until its first poll
    await stopped.aclose()  # the replica stops (or dies) before Kling finishes: nothing follows the task now
    await store.mark_followed(record.task_id, at=0.0)  # and a poll lease's time has passed since its last turn

    ends: list[TaskRecord] = []
    ended = anyio.Event()
    polled_while_handed_on: list[bool] = []

    async def on_finished(finished: TaskRecord) -> None:
        # The adopter still holds the poll lease: other replicas' watchers read the record, not Kling.
        polled_while_handed_on.append(await store.is_polled(finished.task_id))
        ends.append(finished)
        ended.set()

    async def credentials_of(credential_id: str) -> KlingCredentials | None:
        return CREDENTIALS if credential_id == CREDENTIALS.credential_id else None

    adopter = TaskFollower(kling, store, first_interval_s=0.05, on_finished=on_finished, credentials_of=credentials_of)
    latecomer = TaskFollower(kling, store, first_interval_s=0.05, credentials_of=credentials_of)
    try:
        assert await adopter.adopt_orphans() == 1
        assert await latecomer.adopt_orphans() == 0  # the adopter polls it now
        with anyio.fail_after(10):
            await ended.wait()
    finally:
        await adopter.aclose()
        await latecomer.aclose()
    assert [end.status for end in ends] == [TaskStatus.SUCCEEDED]
    assert (await store.get(record.task_id)) == ends[0]
    assert await store.stale_followed(-60, 10) == []  # nobody needs to follow it any more
    assert polled_while_handed_on == [True]
    assert not await store.is_polled(record.task_id)  # and nobody polls it after


async def test_a_task_submitted_through_the_gateway_is_adoptable_as_soon_as_it_is_recorded(
    simulator: Simulator, redis: Redis, redis_url: str
) -> None:
    # No poll for 30 s: the follow mark can only come from the submission itself, not a first poll's claim.
    settings = redis_gateway_settings(simulator, redis_url, poll_interval_seconds=30)
    async with running_gateway(settings) as gateway:
        key = await gateway.new_api_key("adoptable")
        answer = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x", "wait_seconds": 0},
                                         headers=bearer(key))  # fmt: skip
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        assert await redis.zscore("kgw:followed", task_id) is not None  # should this replica stop, another adopts it
        assert await redis.exists(f"kgw:task:{task_id}")


async def test_a_task_just_submitted_is_polled_by_its_replica_alone_from_the_start(
    simulator: Simulator, redis: Redis, redis_url: str
) -> None:
    """The record of a task submitted here takes its poll lease too: another replica asked about it at once reads
    the record rather than Kling, though the submitting replica's first poll is 30 s away."""
    settings = redis_gateway_settings(simulator, redis_url, poll_interval_seconds=30)
    async with running_gateway(settings) as submitter, running_gateway(settings) as other:
        headers = bearer(await submitter.new_api_key("polled-once"))
        answer = await submitter.http.post(f"{submitter.url}/generate", json={"prompt": "x"}, headers=headers)
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        asked = await other.http.get(f"{other.url}/tasks/{task_id}", headers=headers)
    assert asked.status_code == 200, asked.text
    assert asked.json()["status"] == "submitted"
    assert (await simulator.stats())["queries"] == 0


async def test_an_end_heard_where_no_loop_follows_the_task_is_still_handled(kling: KlingClient, redis: Redis) -> None:
    store = RedisTaskStore(redis)
    record = await _submitted(kling, store)
    ends: list[TaskRecord] = []

    async def on_finished(finished: TaskRecord) -> None:
        ends.append(finished)

    elsewhere = TaskFollower(kling, store, first_interval_s=0.05, on_finished=on_finished)
    # Kling's callback for the end arrives at a replica that neither submitted nor watches the task.
    done = TaskRecord(**{**vars(record), "status": TaskStatus.SUCCEEDED, "updated_at_ms": record.updated_at_ms + 1})
    await elsewhere.announce(done)
    assert ends == [done]


@pytest.mark.sim_delay(1.0)
async def test_a_task_that_cannot_be_adopted_does_not_stop_the_others(kling: KlingClient, redis: Redis) -> None:
    store = RedisTaskStore(redis)
    good = await _submitted(kling, store)
    await redis.set("kgw:task:damaged", "{not json")  # a record no replica can read
    await store.mark_followed("damaged", at=0.0)
    await store.mark_followed(good.task_id, at=1.0)

    async def credentials_of(credential_id: str) -> KlingCredentials | None:
        return CREDENTIALS

    adopter = TaskFollower(kling, store, first_interval_s=0.05, credentials_of=credentials_of)
    try:
        assert await adopter.adopt_orphans() == 1  # the damaged one first, then the good one all the same
        assert adopter.following(good.task_id)
    finally:
        await adopter.aclose()
    assert await store.stale_followed(1, 10) == []  # the damaged one is tried again later, not every sweep


async def test_a_task_given_up_on_is_not_adopted_again(kling: KlingClient, redis: Redis) -> None:
    store = RedisTaskStore(redis)
    record = await _submitted(kling, store)
    old = TaskRecord(**{**vars(record), "created_at_ms": record.created_at_ms - 2 * 3600 * 1000})
    await store.save(old)
    await store.mark_followed(old.task_id, at=0.0)

    async def credentials_of(credential_id: str) -> KlingCredentials | None:
        return CREDENTIALS

    adopter = TaskFollower(kling, store, first_interval_s=0.05, credentials_of=credentials_of)
    try:
        assert await adopter.adopt_orphans() == 0
    finally:
        await adopter.aclose()
    assert await store.stale_followed(-60, 10) == []


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_unfollowing_an_ended_task_gives_up_only_its_own_poll_lease(backend: str, redis: Redis) -> None:
    store: TaskStore = MemoryTaskStore() if backend == "memory" else RedisTaskStore(redis)
    for task_id, holder in (("mine", "replica-a"), ("theirs", "replica-b")):
        assert (await store.claim_polling(task_id, holder, ttl_s=60)).claimed  # which marks it followed too
        await store.unmark_followed(task_id, "replica-a")
    assert await store.stale_followed(-60, 10) == []
    assert not await store.is_polled("mine")
    assert await store.is_polled("theirs")  # another replica's lease is left to it


def _ended(record: TaskRecord) -> TaskRecord:
    return replace(record, status=TaskStatus.SUCCEEDED, updated_at_ms=record.updated_at_ms + 1)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_recording_a_task_s_end_can_unfollow_it_in_the_same_step(backend: str, redis: Redis) -> None:
    store: TaskStore = MemoryTaskStore() if backend == "memory" else RedisTaskStore(redis)
    record = TaskRecord(task_id="t", tenant_id="t_1", external_task_id="e_t", model_name="kling-v1", num_images=1,
                        status=TaskStatus.SUBMITTED, created_at_ms=1, updated_at_ms=1)  # fmt: skip
    await store.save(record, polled_by=PollLease("replica-a", 60))
    ended = _ended(record)
    assert await store.save(ended, announce=True, ended=True)
    assert await store.stale_followed(-60, 10) == []  # nobody is to adopt it
    # Its poll lease is left to lapse: a poll turn elsewhere that has not heard of the end reads it, not Kling.
    assert await store.claim_polling(record.task_id, "replica-b", 60) == PollClaim(claimed=False, stored=ended)

    # A state older than the one recorded is not stored, and ends nothing either.
    await store.mark_followed(record.task_id)
    assert not await store.save(replace(ended, updated_at_ms=0), ended=True)
    assert await store.stale_followed(-60, 10) == [record.task_id]
    assert await store.get(record.task_id) == ended


@pytest.mark.parametrize("webhook_url", [None, "https://hooks.example.com/x"])
async def test_a_followed_task_s_end_is_unfollowed_only_once_nothing_is_left_to_hand_over(
    kling: KlingClient, redis: Redis, webhook_url: str | None
) -> None:
    """A task with a webhook stays marked followed until its end is handed over (should this replica die first,
    another adopts it and delivers); one without is unfollowed as its end is recorded."""
    store = RedisTaskStore(redis)
    task = await kling.create_image_task(CREDENTIALS, {"model_name": "kling-v1", "prompt": "x", "n": 1})
    record = TaskRecord(
        task_id=task.task_id, tenant_id="t_1", external_task_id="e_1", model_name="kling-v1", num_images=1,
        status=TaskStatus.SUBMITTED, created_at_ms=task.created_at, updated_at_ms=task.updated_at,
        credential_id=CREDENTIALS.credential_id, webhook_url=webhook_url,
    ).updated_from(task)  # fmt: skip
    followed_at_hand_over: list[list[str]] = []

    async def on_finished(finished: TaskRecord) -> None:
        followed_at_hand_over.append(await store.stale_followed(-60, 10))

    follower = TaskFollower(kling, store, first_interval_s=0.05, on_finished=on_finished)
    await store.save(record, polled_by=follower.poll_lease)  # as the gateway records a task it submits
    follower.follow(record, CREDENTIALS, _NoLeases())
    try:
        with anyio.fail_after(10):
            assert (await follower.wait(record, CREDENTIALS, 10, None)).status is TaskStatus.SUCCEEDED
    finally:
        await follower.aclose()  # which waits for the task's end to be handled
    assert followed_at_hand_over == [[] if webhook_url is None else [record.task_id]]
    assert await store.stale_followed(-60, 10) == []
