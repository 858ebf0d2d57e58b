"""The usage store and audit log contracts, run against memory, Redis, and Redis with decoded responses (and the
usage store also through the gateway's buffer in front of Redis); then the buffer's own promises."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.usage import (
    AuditLog,
    Counts,
    DailyUsage,
    MemoryAuditLog,
    MemoryUsageStore,
    RedisAuditLog,
    RedisUsageStore,
    UsageStore,
)
from app.usage_buffer import BufferedUsage

pytestmark = pytest.mark.anyio
TODAY = date(2025, 3, 10)
BACKENDS = ["memory", "redis", "redis-decoded"]


async def _redis_client(request: pytest.FixtureRequest) -> Redis:
    # Both reply types are exercised: the stores must not assume how the client was configured.
    client = Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=request.param == "redis-decoded")
    await client.flushdb()
    return client


@pytest.fixture(params=[*BACKENDS, "redis-buffered"])
async def usage(request: pytest.FixtureRequest) -> AsyncIterator[UsageStore]:
    if request.param == "memory":
        yield MemoryUsageStore()
        return
    client = await _redis_client(request)
    # Buffered, the contract holds as written: every read writes what the buffer holds first.
    yield BufferedUsage(RedisUsageStore(client)) if request.param == "redis-buffered" else RedisUsageStore(client)
    await client.aclose()


@pytest.fixture(params=BACKENDS)
async def audit(request: pytest.FixtureRequest) -> AsyncIterator[AuditLog]:
    if request.param == "memory":
        yield MemoryAuditLog()
        return
    client = await _redis_client(request)
    yield RedisAuditLog(client)
    await client.aclose()


# --- usage contract -----------------------------------------------------------------------------------------------


async def test_counts_add_up_per_day_in_total_and_per_key(usage: UsageStore) -> None:
    await usage.record("t_a", "key1", requests=1, tasks=1, images=4, day=TODAY)
    await usage.record("t_a", "key1", requests=1, day=TODAY)
    await usage.record("t_a", "key2", requests=1, tasks=1, images=2, day=TODAY)

    assert await usage.tenant_usage("t_a", today=TODAY) == [
        DailyUsage(
            day=TODAY,
            total=Counts(requests=3, tasks=2, images=6),
            by_key={"key1": Counts(requests=2, tasks=1, images=4), "key2": Counts(requests=1, tasks=1, images=2)},
        )
    ]


async def test_days_come_back_newest_first_and_only_inside_the_window(usage: UsageStore) -> None:
    for offset in (-1, 0, 1, 5, 29, 30):  # -1 is tomorrow; 30 days back is just outside a 30-day window
        await usage.record("t_a", "key1", requests=1, day=TODAY - timedelta(days=offset))

    days = [daily.day for daily in await usage.tenant_usage("t_a", 30, today=TODAY)]

    assert days == [TODAY - timedelta(days=offset) for offset in (0, 1, 5, 29)]
    assert [daily.day for daily in await usage.tenant_usage("t_a", 2, today=TODAY)] == days[:2]


async def test_days_and_tenants_without_counts_are_omitted(usage: UsageStore) -> None:
    await usage.record("t_a", "key1", day=TODAY)  # all zero: nothing to record

    assert await usage.tenant_usage("t_a", today=TODAY) == []
    assert await usage.tenant_usage("t_unknown", today=TODAY) == []


async def test_tenants_are_isolated(usage: UsageStore) -> None:
    await usage.record("t_a", "key_a", requests=2, day=TODAY)
    await usage.record("t_b", "key_b", images=3, day=TODAY)

    [a] = await usage.tenant_usage("t_a", today=TODAY)
    [b] = await usage.tenant_usage("t_b", today=TODAY)

    assert (a.total, a.by_key) == (Counts(requests=2), {"key_a": Counts(requests=2)})
    assert (b.total, b.by_key) == (Counts(images=3), {"key_b": Counts(images=3)})


async def test_tenants_usage_answers_for_every_requested_tenant(usage: UsageStore) -> None:
    await usage.record("t_a", "key_a", requests=1, day=TODAY)
    await usage.record("t_b", "key_b", requests=1, day=TODAY - timedelta(days=1))
    await usage.record("t_b", "key_b", requests=2, day=TODAY)
    await usage.record("t_c", "key_c", requests=1, day=TODAY)  # not asked for

    report = await usage.tenants_usage(["t_a", "t_b", "t_none"], 7, today=TODAY)

    assert set(report) == {"t_a", "t_b", "t_none"}
    assert [daily.total.requests for daily in report["t_a"]] == [1]
    assert [(daily.day, daily.total.requests) for daily in report["t_b"]] == [
        (TODAY, 2),
        (TODAY - timedelta(days=1), 1),
    ]
    assert report["t_none"] == []
    assert await usage.tenants_usage([], today=TODAY) == {}


async def test_concurrent_records_lose_no_increment(usage: UsageStore) -> None:
    # 50 in flight at once: redis-py's default async pool refuses (rather than queues) past 100 connections.
    limiter = anyio.CapacityLimiter(50)

    async def record(key_id: str) -> None:
        async with limiter:
            await usage.record("t_a", key_id, requests=1, tasks=1, images=2, day=TODAY)

    async with anyio.create_task_group() as group:
        for index in range(200):
            group.start_soon(record, f"key{index % 2}")

    [daily] = await usage.tenant_usage("t_a", today=TODAY)

    assert daily.total == Counts(requests=200, tasks=200, images=400)
    assert daily.by_key == {"key0": Counts(100, 100, 200), "key1": Counts(100, 100, 200)}


async def test_callers_without_a_key_are_counted_under_the_key_id_they_give(usage: UsageStore) -> None:
    await usage.record("t_a", "oauth:user:42", requests=1, day=TODAY)  # ':' inside a key id is fine
    await usage.record("t_a", "", requests=1, day=TODAY)  # "" is not a key id: counted in the total only

    [daily] = await usage.tenant_usage("t_a", today=TODAY)

    assert daily.total == Counts(requests=2)
    assert daily.by_key == {"oauth:user:42": Counts(requests=1)}


async def test_negative_increments_are_refused(usage: UsageStore) -> None:
    with pytest.raises(ValueError, match="only grows"):
        await usage.record("t_a", "key1", requests=1, images=-1, day=TODAY)
    assert await usage.tenant_usage("t_a", today=TODAY) == []


async def test_records_without_a_day_count_for_today_in_utc(usage: UsageStore) -> None:
    before = datetime.now(UTC).date()
    await usage.record("t_a", "key1", requests=1)
    after = datetime.now(UTC).date()

    [daily] = await usage.tenant_usage("t_a")  # the window ends today by default

    assert daily.day in {before, after}  # equal unless the test straddles midnight UTC


async def test_the_memory_store_keeps_only_the_latest_retention_days_per_tenant() -> None:
    store = MemoryUsageStore(retention_days=3)
    await store.record("t_b", "key1", requests=1, day=TODAY - timedelta(days=2))
    for offset in range(5):
        await store.record("t_a", "key1", requests=1, day=TODAY - timedelta(days=offset))

    assert [daily.day for daily in await store.tenant_usage("t_a", 30, today=TODAY)] == [
        TODAY - timedelta(days=offset) for offset in range(3)
    ]
    assert len(await store.tenant_usage("t_b", 30, today=TODAY)) == 1  # other tenants keep their own days


@pytest.mark.parametrize("days", [0, -1])
async def test_an_empty_window_returns_nothing(usage: UsageStore, days: int) -> None:
    await usage.record("t_a", "key1", requests=1, day=TODAY)

    assert await usage.tenant_usage("t_a", days, today=TODAY) == []
    assert await usage.tenants_usage(["t_a"], days, today=TODAY) == {"t_a": []}


# --- usage, Redis only ----------------------------------------------------------------------------------------


async def test_a_usage_hash_is_keyed_by_tenant_and_day_and_lives_at_most_the_retention(redis: Redis) -> None:
    store = RedisUsageStore(redis, retention_days=7)
    await store.record("t_a", "key1", requests=1, images=2, day=TODAY)

    key = "kgw:usage:{t_a}:2025-03-10"
    assert await redis.hgetall(key) == {
        b"requests": b"1",
        b"images": b"2",
        b"k:key1:requests": b"1",
        b"k:key1:images": b"2",
    }
    assert 0 < await redis.ttl(key) <= 7 * 86_400


async def test_zero_increments_write_no_redis_key(redis: Redis) -> None:
    store = RedisUsageStore(redis)
    await store.record("t_a", "key1", day=TODAY)

    assert await redis.keys("*") == []


async def test_the_redis_window_is_capped_at_the_retention(redis: Redis) -> None:
    store = RedisUsageStore(redis, retention_days=2)
    for offset in range(3):  # written directly, as if an older hash had not expired yet
        await redis.hset(f"kgw:usage:{{t_a}}:{TODAY - timedelta(days=offset)}", "requests", 1)

    assert len(await store.tenant_usage("t_a", 30, today=TODAY)) == 2


# --- audit contract -----------------------------------------------------------------------------------------------


async def test_audit_entries_come_back_newest_first_and_bounded_by_limit(audit: AuditLog) -> None:
    for index in range(5):
        await audit.append("cli", f"action.{index}", "t_a")

    assert [entry.action for entry in await audit.recent(3)] == ["action.4", "action.3", "action.2"]
    assert [entry.action for entry in await audit.recent()] == [f"action.{index}" for index in (4, 3, 2, 1, 0)]
    assert await audit.recent(0) == []


async def test_an_empty_audit_log_has_no_entries(audit: AuditLog) -> None:
    assert await audit.recent() == []


async def test_audit_entries_round_trip_with_their_details(audit: AuditLog) -> None:
    details = {"key_id": "AbC123dEf456", "access_key": "ak-acme", "label": 'ci bot = "nightly"'}
    before = time.time()
    await audit.append("admin-api", "key.issue", "t_a", details)
    await audit.append("cli", "tenant.create", "t_b")
    after = time.time()

    newest, oldest = await audit.recent()

    assert (oldest.actor, oldest.action, oldest.target, oldest.details) == ("admin-api", "key.issue", "t_a", details)
    assert (newest.actor, newest.action, newest.target, newest.details) == ("cli", "tenant.create", "t_b", {})
    assert before <= oldest.at <= newest.at <= after


@pytest.mark.parametrize("name", ["secret_key", "password", "api_token", "key", "new_key_id", "Private_Key"])
async def test_a_details_key_that_names_a_secret_is_refused_and_nothing_is_recorded(
    audit: AuditLog, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="app.audit"), pytest.raises(ValueError, match="secret"):
        await audit.append("admin-api", "credential.create", "t_a", {name: "sk-live-value"})

    assert await audit.recent() == []
    assert "sk-live-value" not in caplog.text


async def test_each_audit_entry_is_logged_on_app_audit(audit: AuditLog, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.audit"):
        await audit.append("admin-api", "key.revoke", "AbC123dEf456", {"key_id": "AbC123dEf456", "reason": "lost\nx"})

    [log] = [record for record in caplog.records if record.name == "app.audit"]
    assert log.levelno == logging.INFO
    assert log.getMessage() == (
        'audit actor=admin-api action=key.revoke target=AbC123dEf456 key_id=AbC123dEf456 reason="lost\\nx"'
    )


async def test_the_memory_audit_log_keeps_only_the_latest_max_entries() -> None:
    log = MemoryAuditLog(max_entries=3)
    for index in range(5):
        await log.append("cli", f"action.{index}", "t_a")

    assert [entry.action for entry in await log.recent(10)] == ["action.4", "action.3", "action.2"]


# --- audit, Redis only ------------------------------------------------------------------------------------------


async def test_the_audit_stream_is_trimmed_near_max_entries(redis: Redis) -> None:
    log = RedisAuditLog(redis, max_entries=10)
    for index in range(500):
        await log.append("cli", f"action.{index}", "t_a")

    # MAXLEN ~ trims whole stream nodes (100 entries by default): at least max_entries stay, at most ~ a node more.
    assert 10 <= await redis.xlen("kgw:audit") <= 10 + 100
    assert [entry.action for entry in await log.recent(2)] == ["action.499", "action.498"]


# --- the buffer in front of Redis (app/usage_buffer.py) -----------------------------------------------------------


async def test_buffered_counts_wait_in_the_process_until_a_flush_writes_them(redis: Redis) -> None:
    buffered, redis_view = BufferedUsage(RedisUsageStore(redis)), RedisUsageStore(redis)
    for _ in range(5):
        await buffered.record("t_a", "key1", requests=1, day=TODAY)
    await buffered.record("t_a", "key1", tasks=1, images=3, day=TODAY)
    assert await redis_view.tenant_usage("t_a", today=TODAY) == []  # other replicas see nothing yet

    await buffered.flush()
    counted = Counts(requests=5, tasks=1, images=3)
    assert await redis_view.tenant_usage("t_a", today=TODAY) == [DailyUsage(TODAY, counted, {"key1": counted})]
    await buffered.flush()  # nothing left: the counts are written once
    assert (await redis_view.tenant_usage("t_a", today=TODAY))[0].total == counted


async def test_counts_a_flush_could_not_write_are_written_by_the_next(redis: Redis) -> None:
    buffered, redis_view = BufferedUsage(RedisUsageStore(redis)), RedisUsageStore(redis)
    await buffered.record("t_a", "key1", requests=2, tasks=1, images=1, day=TODAY)
    await redis.config_set("maxmemory", "1")  # Redis refuses every write (OOM), as a full one would
    try:
        with pytest.raises(RedisError):
            await buffered.flush()
        assert buffered.pending == 1
        await buffered.record("t_a", "key1", requests=1, day=TODAY)  # counting goes on meanwhile
    finally:
        await redis.config_set("maxmemory", "0")
    await buffered.flush()
    assert buffered.pending == 0
    [day] = await redis_view.tenant_usage("t_a", today=TODAY)
    assert day.total == Counts(requests=3, tasks=1, images=1)


async def test_a_read_through_the_buffer_answers_with_what_redis_holds_when_it_refuses_writes(redis: Redis) -> None:
    buffered = BufferedUsage(RedisUsageStore(redis))
    await buffered.record("t_a", "key1", requests=1, day=TODAY)
    await buffered.flush()
    await buffered.record("t_a", "key1", requests=1, day=TODAY)
    await redis.config_set("maxmemory", "1")
    try:
        [day] = await buffered.tenant_usage("t_a", today=TODAY)  # the read is not failed by the write before it
        with pytest.raises(RedisError):
            await buffered.flush()
        # Once a flush failed, reads no longer try to write first (each would wait out Redis in turn, behind the
        # others): the waiting count is left to the writer's next flush.
        await buffered.record("t_a", "key1", requests=1, day=TODAY)
        await redis.config_set("maxmemory", "0")
        [unflushed] = await buffered.tenant_usage("t_a", today=TODAY)
        assert buffered.pending == 1
        await buffered.flush()
    finally:
        await redis.config_set("maxmemory", "0")
    assert day.total.requests == unflushed.total.requests == 1  # what Redis held
    [day] = await buffered.tenant_usage("t_a", today=TODAY)
    assert day.total.requests == 3  # the flush that got through wrote both, and reads write first again


async def test_the_writer_flushes_on_its_interval_and_once_more_as_it_stops(redis: Redis) -> None:
    buffered, redis_view = BufferedUsage(RedisUsageStore(redis)), RedisUsageStore(redis)
    async with buffered.flushing_every(0.05):
        await buffered.record("t_a", "key1", requests=1, day=TODAY)
        with anyio.fail_after(5):
            while not await redis_view.tenant_usage("t_a", today=TODAY):  # noqa: ASYNC110 (Redis has no event)
                await anyio.sleep(0.01)
    async with buffered.flushing_every(3600):
        await buffered.record("t_a", "key1", requests=1, day=TODAY)
    [day] = await redis_view.tenant_usage("t_a", today=TODAY)
    assert day.total.requests == 2


async def test_counts_made_while_the_last_flush_writes_are_written_as_the_writer_stops(redis: Redis) -> None:
    buffered, redis_view = BufferedUsage(RedisUsageStore(redis)), RedisUsageStore(redis)
    await redis.client_pause(
        300, all=False
    )  # writes wait 0.3 s (CLIENT PAUSE WRITE): the writer's next flush hangs in Redis a while
    async with buffered.flushing_every(0.01):
        await buffered.record("t_a", "key1", requests=1, day=TODAY)
        with anyio.fail_after(5):
            while buffered.pending:  # noqa: ASYNC110 (the flush takes the counts, then waits on Redis)
                await anyio.sleep(0.005)
        await buffered.record("t_a", "key1", requests=1, day=TODAY)  # taken by no flush yet; the stop comes now
    [day] = await redis_view.tenant_usage("t_a", today=TODAY)
    assert day.total.requests == 2
