"""Limits that hold across replicas: per-tenant rate, concurrency and daily images, and a governor per
Kling account. Facts behind the design: reference/reliability.md §1-§4.

- Every decision is one Lua script, atomic on Redis, clocked by Redis `TIME` (so replicas' clocks do not
  matter), and a request refused by one limit consumes nothing from the others. (With Redis, a submission tries
  for a free slot of its account while its tenant's limits are decided, app/images.py: a refused one gives a slot
  it took straight back, having held it for a round trip, and it never queues; an admitted one queues only if
  the try found the account full.)
- Every key of one script shares one hash tag (`{t:<tenant>}` or `{c:<credential>}`): Cluster-safe.
- Concurrency is held as leases that expire: a crashed replica's slots come back by themselves, and a
  live one refreshes them while it follows its tasks. Nothing is an INCR/DECR counter that could leak.
- The memory backends implement the same contract for a single process (tests/test_ratelimit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.errors import InvalidRequest, LimitsUnavailable, RateLimited
from app.metrics import LIMITER_DECISIONS
from app.observability import Waiting
from app.script_batches import ScriptBatcher

logger = logging.getLogger(__name__)
REDIS_FAILURES = (RedisError, OSError, TimeoutError)

ACCOUNT_QUEUE_STALE_MS = 5_000  # a queued waiter that has not asked again for this long has gone away
CONCURRENCY_RETRY_HINT_S = 5  # leases free when tasks end, which no one can predict
SECONDS_PER_DAY = 86_400  # a UTC day in POSIX time, leap seconds never counted
_EPOCH = date(1970, 1, 1)


@dataclass(frozen=True)
class TenantLimits:
    requests_per_minute: int = 60
    requests_per_minute_per_key: int | None = None
    concurrent_tasks: int = 10
    images_per_day: int = 1000


@dataclass(frozen=True)
class Remaining:
    """What is left after this request; sent back to callers so they can pace themselves."""

    requests_this_minute: int
    concurrent_tasks: int | None = None
    images_today: int | None = None


@dataclass(frozen=True)
class Admission:
    lease_id: str
    remaining: Remaining


def limit_refused(limit: str, retry_after_ms: int, policy: str) -> RateLimited:
    """The caller's error for a refusal by `limit` (counting it is for whoever decided it: `_refusal`)."""
    retry_after = max(1, math.ceil(retry_after_ms / 1000))
    return RateLimited(
        f"Rate limited: {limit.replace('_', ' ')} reached ({policy}); retry after {retry_after} s",
        retry_after,
        limit=limit,
        policy=policy,
    )


def _refusal(limit: str, retry_after_ms: int, policy: str) -> RateLimited:
    """A refusal this limiter decided: counted once, for the limit that refused."""
    LIMITER_DECISIONS.labels(limit, "refused").inc()
    return limit_refused(limit, retry_after_ms, policy)


# Bound once: an admission counts two to four of these, and `labels()` is a lookup under a lock each time.
_ADMITTED = {
    limit: LIMITER_DECISIONS.labels(limit, "admitted")
    for limit in ("requests_per_minute", "requests_per_minute_per_key", "concurrent_tasks", "images_per_day",
                  "kling_account")
}  # fmt: skip


def count_admitted(limits: TenantLimits, *, task: bool) -> None:
    """An admission passed every limit it was checked against: count one for each."""
    _ADMITTED["requests_per_minute"].inc()
    if limits.requests_per_minute_per_key:
        _ADMITTED["requests_per_minute_per_key"].inc()
    if task:
        _ADMITTED["concurrent_tasks"].inc()
        _ADMITTED["images_per_day"].inc()


def count_slot_taken() -> None:
    """A submission kept the account slot its `try_acquire` took (`acquire` counts its own)."""
    _ADMITTED["kling_account"].inc()


def seconds_until_utc_midnight(now: float | None = None) -> int:
    now = time.time() if now is None else now
    return SECONDS_PER_DAY - int(now) % SECONDS_PER_DAY


def utc_day(now: float | None = None) -> str:
    return _day_name(int((time.time() if now is None else now) // SECONDS_PER_DAY))


@functools.lru_cache(maxsize=4)
def _day_name(days_since_epoch: int) -> str:
    # Every admission asks for today's name: a datetime and a strftime each time cost more than the rest of a
    # memory-backed decision, for a name that changes once a day (a POSIX day is exactly 86,400 s).
    return (_EPOCH + timedelta(days=days_since_epoch)).isoformat()


def new_lease_id(day: str) -> str:
    """Carries the UTC day its images were counted on, so a refund after midnight goes to that day."""
    return f"{day}.{uuid.uuid4().hex}"


def day_of_lease(lease_id: str) -> str:
    return lease_id.partition(".")[0]


class Limiter(Protocol):
    async def admit_request(self, tenant_id: str, key_id: str, limits: TenantLimits) -> Remaining:
        """Charge one request against the rate limits; raises RateLimited."""

    async def admit_task(self, tenant_id: str, key_id: str, limits: TenantLimits, images: int) -> Admission:
        """Charge one request, take a concurrency lease and reserve `images` of today's quota, all or nothing."""

    async def refresh(self, tenant_id: str, lease_id: str, *, retake: int = 0) -> bool:
        """Extend a lease; False when it was lost (expired). With `retake`, a lost lease is taken again for that
        weight, over the limit if need be: what it stands for (a task running at Kling) still takes its place."""

    async def release(self, tenant_id: str, lease_id: str, *, refund_images: int = 0) -> None:
        """Free a lease (idempotent); refund images Kling never accepted."""

    async def refund_rate(self, tenant_id: str, key_id: str, limits: TenantLimits, lease_id: str) -> None:
        """Give back the rate `admit_task` charged for the admission of `lease_id`: for a submission then refused
        on concurrency (no slot of the Kling account in time), which must not cost the tenant its rate as well
        (reference/reliability.md §1.3). Call it once per admission."""


class AccountGovernor(Protocol):
    async def acquire(self, credential_id: str, slots: int, capacity: int, wait_s: float) -> str:
        """Wait in the account's FIFO queue, up to `wait_s`, for `slots` free image slots; returns the lease id.
        Raises RateLimited (limit `kling_account`) when the wait runs out."""

    async def try_acquire(self, credential_id: str, slots: int, capacity: int) -> str | None:
        """`slots` image slots at once if they are free and no one queues for them; else None, and no place in the
        queue taken. For a submission not yet admitted: nothing is counted (`acquire` counts its refusals, and the
        caller a slot it keeps, `count_slot_taken`)."""
        ...

    async def refresh(self, credential_id: str, lease_id: str, *, retake: int = 0) -> bool:
        """As `Limiter.refresh`: `retake` is the slots a lost lease takes again."""

    async def release(self, credential_id: str, lease_id: str) -> None: ...


def _gcra_args(per_minute: int | None) -> tuple[int, int]:
    """(interval µs, burst) for a rate of `per_minute` with a burst of a whole minute; (0, 0) means off."""
    if not per_minute:
        return 0, 0
    return 60_000_000 // per_minute, per_minute


# --- Redis backends -------------------------------------------------------------------------------------

_LUA_GCRA = """
local function gcra(key, interval, burst, now)
  local tat = math.max(tonumber(redis.call('GET', key) or 0), now)
  local new_tat = tat + interval
  local excess = new_tat - now - burst * interval
  local remaining = math.floor((burst * interval - (new_tat - now)) / interval)
  return new_tat, excess, remaining
end
"""
_LUA_LEASES = """
local function purge(leases, weights, now)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  for _, id in ipairs(expired) do redis.call('ZREM', leases, id); redis.call('HDEL', weights, id) end
  local used = 0
  for _, w in ipairs(redis.call('HVALS', weights)) do used = used + tonumber(w) end
  return used
end
local function take(leases, weights, id, weight, ttl_ms, now)
  redis.call('ZADD', leases, now + ttl_ms * 1000, id)
  redis.call('HSET', weights, id, weight)
  redis.call('PEXPIRE', leases, ttl_ms); redis.call('PEXPIRE', weights, ttl_ms)
end
"""
# KEYS: tenant tat, key tat | ARGV: interval, burst, key interval (0 = off), key burst
ADMIT_REQUEST = (
    _LUA_GCRA
    + """
local t = redis.call('TIME'); local now = t[1] * 1000000 + t[2]
local tat, excess, remaining = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
if excess > 0 then return {0, 'requests_per_minute', math.ceil(excess / 1000)} end
local key_tat = 0
if tonumber(ARGV[3]) > 0 then
  local key_excess, key_remaining
  key_tat, key_excess, key_remaining = gcra(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), now)
  if key_excess > 0 then return {0, 'requests_per_minute_per_key', math.ceil(key_excess / 1000)} end
  remaining = math.min(remaining, key_remaining)
  redis.call('SET', KEYS[2], key_tat, 'PX', math.ceil((key_tat - now) / 1000) + 1)
end
redis.call('SET', KEYS[1], tat, 'PX', math.ceil((tat - now) / 1000) + 1)
return {1, remaining}
"""
)
# KEYS: tenant tat, key tat, leases, weights, day | ARGV: interval, burst, key interval, key burst,
#       lease id, max concurrent, lease ttl ms, images, max images per day, seconds to midnight
ADMIT_TASK = (
    _LUA_GCRA
    + _LUA_LEASES
    + """
local t = redis.call('TIME'); local now = t[1] * 1000000 + t[2]
local tat, excess, remaining = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
if excess > 0 then return {0, 'requests_per_minute', math.ceil(excess / 1000)} end
local key_tat, key_excess, key_remaining = 0, 0, remaining
if tonumber(ARGV[3]) > 0 then
  key_tat, key_excess, key_remaining = gcra(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), now)
  if key_excess > 0 then return {0, 'requests_per_minute_per_key', math.ceil(key_excess / 1000)} end
end
local used = purge(KEYS[3], KEYS[4], now)
local max_concurrent = tonumber(ARGV[6])
if used + 1 > max_concurrent then return {0, 'concurrent_tasks', tonumber(ARGV[11])} end
local images, max_images = tonumber(ARGV[8]), tonumber(ARGV[9])
local today = tonumber(redis.call('GET', KEYS[5]) or 0)
if today + images > max_images then return {0, 'images_per_day', tonumber(ARGV[10]) * 1000} end
redis.call('SET', KEYS[1], tat, 'PX', math.ceil((tat - now) / 1000) + 1)
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[2], key_tat, 'PX', math.ceil((key_tat - now) / 1000) + 1) end
take(KEYS[3], KEYS[4], ARGV[5], 1, tonumber(ARGV[7]), now)
redis.call('INCRBY', KEYS[5], images); redis.call('EXPIRE', KEYS[5], tonumber(ARGV[10]) + 3600)
return {1, math.min(remaining, key_remaining), max_concurrent - used - 1, max_images - today - images}
"""
)
# KEYS: leases, weights | ARGV: lease id, ttl ms, the weight a lost lease is taken again for (0: none). A retake cannot
# tell a lapsed lease from one released a moment before: a task's follower refreshes and releases its leases one after
# the other, never at once, and a lease revived all the same would lapse after one TTL, as any unrefreshed lease does.
REFRESH = (
    _LUA_LEASES
    + """
local t = redis.call('TIME'); local now = t[1] * 1000000 + t[2]
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires or tonumber(expires) <= now then  -- lost: expired, even if not purged yet
  if tonumber(ARGV[3]) > 0 then take(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[2]), now) end
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]) * 1000, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2]); redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
)
# KEYS: leases, weights, day | ARGV: lease id, images to refund
RELEASE = """
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if held == 1 and tonumber(ARGV[2]) > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('DECRBY', KEYS[3], ARGV[2])
end
return held
"""
# KEYS: tenant tat, key tat | ARGV: interval, key interval (0 = off). One interval off each, as if the request had not
# come; a bucket that runs no further ahead of now than that is simply full again.
REFUND_RATE = """
local t = redis.call('TIME'); local now = t[1] * 1000000 + t[2]
for i = 1, 2 do
  local interval = tonumber(ARGV[i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or 0)
  if interval > 0 and tat > 0 then
    local back = tat - interval
    if back <= now then redis.call('DEL', KEYS[i])
    else redis.call('SET', KEYS[i], back, 'PX', math.ceil((back - now) / 1000) + 1) end
  end
end
return 1
"""
# An account's state before a slot script decides: expired leases purged, waiters gone quiet dropped from its queue.
_LUA_ACCOUNT = """
local function tidied(stale_ms)  -- KEYS: leases, weights, queue, heartbeats; returns now, slots in use
  local t = redis.call('TIME'); local now = t[1] * 1000000 + t[2]
  local used = purge(KEYS[1], KEYS[2], now)
  local stale = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - stale_ms * 1000)
  for _, id in ipairs(stale) do redis.call('ZREM', KEYS[3], id); redis.call('ZREM', KEYS[4], id) end
  return now, used
end
"""
# KEYS: leases, weights, queue, heartbeats | ARGV: ticket, slots, capacity, lease ttl ms, stale ms
ACQUIRE_SLOTS = (
    _LUA_LEASES
    + _LUA_ACCOUNT
    + """
local now, used = tidied(tonumber(ARGV[5]))
redis.call('ZADD', KEYS[3], 'NX', now, ARGV[1]); redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('PEXPIRE', KEYS[3], 60000); redis.call('PEXPIRE', KEYS[4], 60000)
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
local slots = tonumber(ARGV[2])
if head == ARGV[1] and used + slots <= tonumber(ARGV[3]) then
  redis.call('ZREM', KEYS[3], ARGV[1]); redis.call('ZREM', KEYS[4], ARGV[1])
  take(KEYS[1], KEYS[2], ARGV[1], slots, tonumber(ARGV[4]), now)
  return {1, used + slots}
end
return {0, redis.call('ZRANK', KEYS[3], ARGV[1])}
"""
)
# KEYS: leases, weights, queue, heartbeats | ARGV: lease id, slots, capacity, lease ttl ms, stale ms
# Never joins the queue: slots are taken only if they are free and no live waiter is ahead. The queue stays FIFO
# among those in it; a submission whose try found the account full joins it once admitted, a round trip later,
# and a try meanwhile may take slots freed first (by a round trip's margin: nobody is starved).
TAKE_FREE_SLOTS = (
    _LUA_LEASES
    + _LUA_ACCOUNT
    + """
local now, used = tidied(tonumber(ARGV[5]))
local slots = tonumber(ARGV[2])
if redis.call('ZCARD', KEYS[3]) > 0 or used + slots > tonumber(ARGV[3]) then return 0 end
take(KEYS[1], KEYS[2], ARGV[1], slots, tonumber(ARGV[4]), now)
return 1
"""
)
# KEYS: leases, weights, queue, heartbeats | ARGV: ticket
LEAVE = """
redis.call('ZREM', KEYS[3], ARGV[1]); redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


def _decision(reply: Any, policy: str) -> list[int]:
    """The numbers of an admitting reply; raises RateLimited for a refusing one."""
    if int(reply[0]) == 0:
        limit = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        raise _refusal(limit, int(reply[2]), policy)
    return [int(value) for value in reply[1:]]


def _policy(limits: TenantLimits) -> str:
    per_key = f", {limits.requests_per_minute_per_key}/min per key" if limits.requests_per_minute_per_key else ""
    return (
        f"{limits.requests_per_minute}/min{per_key}, {limits.concurrent_tasks} concurrent tasks, "
        f"{limits.images_per_day} images/day"
    )


class RedisLimiter:
    """`redis` must not retry on its own: a timed-out script may have run, and a retry would charge twice."""

    def __init__(
        self, redis: Redis, *, lease_ttl_s: float, namespace: str = "kgw", batches: ScriptBatcher | None = None
    ) -> None:
        self._redis = redis
        self._ns = namespace
        self._lease_ttl_ms = int(lease_ttl_s * 1000)
        # Releases come as tasks end, many at once when a list call answers them together (app/script_batches.py).
        self._batches = batches or ScriptBatcher(redis)
        self._admit_request = redis.register_script(ADMIT_REQUEST)
        self._admit_task = redis.register_script(ADMIT_TASK)
        self._refresh = redis.register_script(REFRESH)
        self._release = redis.register_script(RELEASE)
        self._refund_rate = redis.register_script(REFUND_RATE)

    def _keys(self, tenant_id: str, key_id: str, day: str | None = None) -> list[str]:
        tag = f"{self._ns}:rl:{{t:{tenant_id}}}"
        images = f"{tag}:images:{day or utc_day()}"
        return [f"{tag}:rpm", f"{tag}:key:{key_id}", f"{tag}:leases", f"{tag}:weights", images]

    async def admit_request(self, tenant_id: str, key_id: str, limits: TenantLimits) -> Remaining:
        interval, burst = _gcra_args(limits.requests_per_minute)
        key_interval, key_burst = _gcra_args(limits.requests_per_minute_per_key)
        keys = self._keys(tenant_id, key_id)[:2]
        reply = await self._admit_request(keys=keys, args=[interval, burst, key_interval, key_burst])
        [remaining] = _decision(reply, _policy(limits))
        count_admitted(limits, task=False)
        return Remaining(requests_this_minute=remaining)

    async def admit_task(self, tenant_id: str, key_id: str, limits: TenantLimits, images: int) -> Admission:
        interval, burst = _gcra_args(limits.requests_per_minute)
        key_interval, key_burst = _gcra_args(limits.requests_per_minute_per_key)
        day = utc_day()
        lease_id = new_lease_id(day)
        args: list[int | str] = [
            interval,
            burst,
            key_interval,
            key_burst,
            lease_id,
            limits.concurrent_tasks,
            self._lease_ttl_ms,
            images,
            limits.images_per_day,
            seconds_until_utc_midnight(),
            CONCURRENCY_RETRY_HINT_S * 1000,
        ]
        try:
            # Batched: the submission tries for its account's slot at the same time (ImageService._admit_with_slot).
            reply = await self._batches.run(self._admit_task, self._keys(tenant_id, key_id, day), args)
        except BaseException:
            # The script may have run: a caller that hung up is let go only once Redis ran its call
            # (app/script_batches.py), and an answer that timed out may have been on its way. The lease and the images
            # go back at once (a lease the script did not take refunds nothing); if Redis is what failed, the lease
            # lapses and the images stay.
            await _given_back(self.release(tenant_id, lease_id, refund_images=images))
            raise
        requests, concurrent, images_left = _decision(reply, _policy(limits))
        count_admitted(limits, task=True)
        return Admission(lease_id, Remaining(requests, concurrent, images_left))

    async def refresh(self, tenant_id: str, lease_id: str, *, retake: int = 0) -> bool:
        keys = self._keys(tenant_id, "")[2:4]
        return bool(await self._refresh(keys=keys, args=[lease_id, self._lease_ttl_ms, retake]))

    async def release(self, tenant_id: str, lease_id: str, *, refund_images: int = 0) -> None:
        keys = self._keys(tenant_id, "", day_of_lease(lease_id))[2:5]
        await self._batches.run(self._release, keys, [lease_id, refund_images])

    async def refund_rate(self, tenant_id: str, key_id: str, limits: TenantLimits, lease_id: str) -> None:
        interval = _gcra_args(limits.requests_per_minute)[0]
        key_interval = _gcra_args(limits.requests_per_minute_per_key)[0]
        await self._refund_rate(keys=self._keys(tenant_id, key_id)[:2], args=[interval, key_interval])


class RedisAccountGovernor:
    def __init__(
        self, redis: Redis, *, lease_ttl_s: float, namespace: str = "kgw", batches: ScriptBatcher | None = None
    ) -> None:
        self._ns = namespace
        self._batches = batches or ScriptBatcher(redis)  # as the limiter's: one batch holds both of a task's releases
        self._lease_ttl_ms = int(lease_ttl_s * 1000)
        self._acquire = redis.register_script(ACQUIRE_SLOTS)
        self._take_free = redis.register_script(TAKE_FREE_SLOTS)
        self._refresh = redis.register_script(REFRESH)
        self._leave = redis.register_script(LEAVE)

    def _keys(self, credential_id: str) -> list[str]:
        tag = f"{self._ns}:gov:{{c:{credential_id}}}"
        return [f"{tag}:leases", f"{tag}:weights", f"{tag}:queue", f"{tag}:beats"]

    async def acquire(self, credential_id: str, slots: int, capacity: int, wait_s: float) -> str:
        refuse_impossible(slots, capacity)
        ticket = uuid.uuid4().hex
        args: list[int | str] = [ticket, slots, capacity, self._lease_ttl_ms, ACCOUNT_QUEUE_STALE_MS]

        async def attempt() -> bool:
            reply = await self._batches.run(self._acquire, self._keys(credential_id), args)
            return int(reply[0]) == 1

        try:
            await _wait_for_turn(attempt, wait_s, capacity)
        except BaseException:
            # Leave the queue; if Redis is what failed, the place lapses by itself (ACCOUNT_QUEUE_STALE_MS).
            await _given_back(self.release(credential_id, ticket))
            raise
        return ticket

    async def try_acquire(self, credential_id: str, slots: int, capacity: int) -> str | None:
        if slots > capacity:
            return None  # `acquire` says why
        lease_id = uuid.uuid4().hex
        args: list[int | str] = [lease_id, slots, capacity, self._lease_ttl_ms, ACCOUNT_QUEUE_STALE_MS]
        try:
            # Batched: a submission tries while its admission is decided (ImageService._admit_with_slot).
            taken = int(await self._batches.run(self._take_free, self._keys(credential_id), args)) == 1
        except BaseException:
            # The script may have run (as for `RedisLimiter.admit_task`): slots it took go straight back.
            await _given_back(self.release(credential_id, lease_id))
            raise
        return lease_id if taken else None

    async def refresh(self, credential_id: str, lease_id: str, *, retake: int = 0) -> bool:
        args: list[int | str] = [lease_id, self._lease_ttl_ms, retake]
        return bool(await self._refresh(keys=self._keys(credential_id)[:2], args=args))

    async def release(self, credential_id: str, lease_id: str) -> None:
        await self._batches.run(self._leave, self._keys(credential_id), [lease_id])


async def _given_back(release: Awaitable[None]) -> None:
    """A release after a failure or a cancellation: shielded, so it completes whatever cancels the caller again;
    if Redis is what failed, what it would release lapses by its TTL instead."""
    with contextlib.suppress(*REDIS_FAILURES):
        await asyncio.shield(release)


def refuse_impossible(slots: int, capacity: int) -> None:
    """A request for more image slots than the account has can never be served: say so at once (422, as
    retrying cannot help)."""
    if slots > capacity:
        raise InvalidRequest("num_images", f"the tenant's Kling account runs at most {capacity} images at once")


async def _wait_for_turn(attempt: Any, wait_s: float, capacity: int) -> None:
    """Ask again, backing off from 20 ms to 250 ms, until admitted or `wait_s` runs out."""
    deadline = time.monotonic() + wait_s
    delay = 0.02
    while not await attempt():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            message = f"the Kling account is busy ({capacity} images in flight)"
            raise _refusal("kling_account", CONCURRENCY_RETRY_HINT_S * 1000, message)
        # Polling, not an event: waiters on other replicas free slots, and a missed wake-up must not strand us.
        with Waiting(waiter=False):
            await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.25)
    _ADMITTED["kling_account"].inc()


# --- Memory backends (one process) ----------------------------------------------------------------------


class _Gcra:
    def __init__(self) -> None:
        self._tat: dict[str, float] = {}

    def check(self, key: str, per_minute: int | None, now: float) -> tuple[float, float, int]:
        """(new theoretical arrival time, excess seconds, remaining) without charging."""
        if not per_minute:
            return 0.0, 0.0, 1 << 30
        interval = 60.0 / per_minute
        tat = max(self._tat.get(key, 0.0), now)
        # In terms of how far the bucket runs ahead of now, which is exactly 0 for an idle one: `tat + interval
        # - now - limit * interval` in seconds could round above 0 and refuse a first request (the Redis script
        # counts in integer microseconds, where this cannot happen).
        backlog = tat - now
        excess = backlog - (per_minute - 1) * interval
        return tat + interval, excess, math.floor(per_minute - 1 - backlog / interval + 1e-9)

    def charge(self, key: str, tat: float) -> None:
        self._tat[key] = tat

    def refund(self, key: str, per_minute: int | None, now: float) -> None:
        """One interval off the bucket, as `REFUND_RATE` does."""
        tat = self._tat.get(key)
        if per_minute and tat is not None:
            self._tat[key] = max(now, tat - 60.0 / per_minute)


class _ScopeLeases:
    """One scope's leases, with their total weight kept as they come and go and a heap of expiry times, so a
    decision costs O(log n) instead of a scan of every lease (a Kling account can hold hundreds)."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[float, int]] = {}  # lease id -> (expires, weight)
        self.total = 0
        self._expiries: list[tuple[float, str]] = []  # may hold stale entries: refreshed or dropped leases

    def expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expires, lease_id = heapq.heappop(self._expiries)
            held = self.held.get(lease_id)
            if held is not None and held[0] == expires:  # else refreshed since, or already dropped
                self.drop(lease_id)

    def put(self, lease_id: str, expires: float, weight: int) -> None:
        previous = self.held.get(lease_id)
        self.total += weight - (previous[1] if previous else 0)
        self.held[lease_id] = (expires, weight)
        heapq.heappush(self._expiries, (expires, lease_id))

    def drop(self, lease_id: str) -> bool:
        held = self.held.pop(lease_id, None)
        if held is None:
            return False
        self.total -= held[1]
        return True


class _Leases:
    def __init__(self) -> None:
        self._scopes: dict[str, _ScopeLeases] = {}

    def _scope(self, scope: str) -> _ScopeLeases:
        leases = self._scopes.get(scope)
        if leases is None:
            leases = self._scopes[scope] = _ScopeLeases()
        return leases

    def used(self, scope: str, now: float) -> int:
        leases = self._scope(scope)
        leases.expire(now)
        return leases.total

    def take(self, scope: str, lease_id: str, weight: int, expires: float) -> None:
        self._scope(scope).put(lease_id, expires, weight)

    def refresh(self, scope: str, lease_id: str, expires: float, now: float, retake: int) -> bool:
        leases = self._scope(scope)
        leases.expire(now)
        held = leases.held.get(lease_id)
        if held is None:
            if retake:
                leases.put(lease_id, expires, retake)
            return False
        leases.put(lease_id, expires, held[1])
        return True

    def drop(self, scope: str, lease_id: str) -> bool:
        leases = self._scopes.get(scope)
        return leases is not None and leases.drop(lease_id)


class MemoryLimiter:
    """The same decisions in one process; no awaits inside a decision, so each is atomic on the loop."""

    def __init__(self, *, lease_ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._gcra = _Gcra()
        self._leases = _Leases()
        self._images: dict[tuple[str, str], int] = {}

    def _rate(
        self, tenant_id: str, key_id: str, limits: TenantLimits, now: float
    ) -> tuple[list[tuple[str, float]], int]:
        tenant_tat, excess, remaining = self._gcra.check(tenant_id, limits.requests_per_minute, now)
        if excess > 0:
            raise _refusal("requests_per_minute", int(excess * 1000), _policy(limits))
        charges = [(tenant_id, tenant_tat)]
        if limits.requests_per_minute_per_key:
            key_tat, key_excess, key_remaining = self._gcra.check(f"{tenant_id}:{key_id}",
                                                                  limits.requests_per_minute_per_key, now)  # fmt: skip
            if key_excess > 0:
                raise _refusal("requests_per_minute_per_key", int(key_excess * 1000), _policy(limits))
            charges.append((f"{tenant_id}:{key_id}", key_tat))
            remaining = min(remaining, key_remaining)
        return charges, remaining

    async def admit_request(self, tenant_id: str, key_id: str, limits: TenantLimits) -> Remaining:
        charges, remaining = self._rate(tenant_id, key_id, limits, self._clock())
        for key, tat in charges:
            self._gcra.charge(key, tat)
        count_admitted(limits, task=False)
        return Remaining(requests_this_minute=remaining)

    async def admit_task(self, tenant_id: str, key_id: str, limits: TenantLimits, images: int) -> Admission:
        now = self._clock()
        charges, remaining = self._rate(tenant_id, key_id, limits, now)
        used = self._leases.used(tenant_id, now)
        if used + 1 > limits.concurrent_tasks:
            raise _refusal("concurrent_tasks", CONCURRENCY_RETRY_HINT_S * 1000, _policy(limits))
        today_name = utc_day()
        day = (tenant_id, today_name)
        today = self._images.get(day, 0)
        if today + images > limits.images_per_day:
            raise _refusal("images_per_day", seconds_until_utc_midnight() * 1000, _policy(limits))
        for key, tat in charges:
            self._gcra.charge(key, tat)
        lease_id = new_lease_id(today_name)
        self._leases.take(tenant_id, lease_id, 1, now + self._lease_ttl_s)
        self._images[day] = today + images
        left = Remaining(remaining, limits.concurrent_tasks - used - 1, limits.images_per_day - today - images)
        count_admitted(limits, task=True)
        return Admission(lease_id, left)

    async def refresh(self, tenant_id: str, lease_id: str, *, retake: int = 0) -> bool:
        now = self._clock()
        return self._leases.refresh(tenant_id, lease_id, now + self._lease_ttl_s, now, retake)

    async def release(self, tenant_id: str, lease_id: str, *, refund_images: int = 0) -> None:
        if self._leases.drop(tenant_id, lease_id) and refund_images:
            day = (tenant_id, day_of_lease(lease_id))
            self._images[day] = max(0, self._images.get(day, 0) - refund_images)

    async def refund_rate(self, tenant_id: str, key_id: str, limits: TenantLimits, lease_id: str) -> None:
        now = self._clock()
        self._gcra.refund(tenant_id, limits.requests_per_minute, now)
        self._gcra.refund(f"{tenant_id}:{key_id}", limits.requests_per_minute_per_key, now)


class MemoryAccountGovernor:
    def __init__(self, *, lease_ttl_s: float) -> None:
        self._lease_ttl_s = lease_ttl_s
        self._leases = _Leases()
        self._queues: dict[str, OrderedDict[str, None]] = {}

    async def acquire(self, credential_id: str, slots: int, capacity: int, wait_s: float) -> str:
        refuse_impossible(slots, capacity)
        ticket = uuid.uuid4().hex
        queue = self._queues.setdefault(credential_id, OrderedDict())
        queue[ticket] = None

        async def attempt() -> bool:
            now = time.monotonic()
            if next(iter(queue)) != ticket or self._leases.used(credential_id, now) + slots > capacity:
                return False
            del queue[ticket]
            self._leases.take(credential_id, ticket, slots, now + self._lease_ttl_s)
            return True

        try:
            await _wait_for_turn(attempt, wait_s, capacity)
        except BaseException:
            await self.release(credential_id, ticket)
            raise
        return ticket

    async def try_acquire(self, credential_id: str, slots: int, capacity: int) -> str | None:
        now = time.monotonic()
        someone_queues = bool(self._queues.get(credential_id))
        if slots > capacity or someone_queues or self._leases.used(credential_id, now) + slots > capacity:
            return None
        lease_id = uuid.uuid4().hex
        self._leases.take(credential_id, lease_id, slots, now + self._lease_ttl_s)
        return lease_id

    async def refresh(self, credential_id: str, lease_id: str, *, retake: int = 0) -> bool:
        now = time.monotonic()
        return self._leases.refresh(credential_id, lease_id, now + self._lease_ttl_s, now, retake)

    async def release(self, credential_id: str, lease_id: str) -> None:
        self._queues.get(credential_id, OrderedDict()).pop(lease_id, None)
        self._leases.drop(credential_id, lease_id)


# --- When Redis fails -----------------------------------------------------------------------------------

LOCAL_PREFIX = "local:"  # lease ids handed out by the per-replica fallback


def _scaled(limits: TenantLimits, replicas: int) -> TenantLimits:
    """Each replica's share, so that `replicas` replicas falling back together stay within the limits."""

    def share(value: int) -> int:
        return max(1, value // replicas)

    per_key = limits.requests_per_minute_per_key
    return TenantLimits(share(limits.requests_per_minute), share(per_key) if per_key else None,
                        share(limits.concurrent_tasks), share(limits.images_per_day))  # fmt: skip


class FallbackLimiter:
    """Redis first. When it fails: refuse (`fallback=None`), never a free-for-all; or decide on a bounded
    per-replica share of each limit. Decisions resume on Redis as soon as it answers again."""

    def __init__(self, primary: Limiter, fallback: MemoryLimiter | None, replicas: int) -> None:
        self._primary = primary
        self._fallback = fallback
        self._replicas = replicas

    def _local(self, exc: Exception) -> MemoryLimiter:
        if self._fallback is None:
            LIMITER_DECISIONS.labels("all", "unavailable").inc()
            raise LimitsUnavailable() from exc
        logger.warning("limiter falling back to per-replica limits: %s", type(exc).__name__)
        return self._fallback

    async def admit_request(self, tenant_id: str, key_id: str, limits: TenantLimits) -> Remaining:
        try:
            return await self._primary.admit_request(tenant_id, key_id, limits)
        except REDIS_FAILURES as exc:
            return await self._local(exc).admit_request(tenant_id, key_id, _scaled(limits, self._replicas))

    async def admit_task(self, tenant_id: str, key_id: str, limits: TenantLimits, images: int) -> Admission:
        try:
            return await self._primary.admit_task(tenant_id, key_id, limits, images)
        except REDIS_FAILURES as exc:
            local = self._local(exc)
            admission = await local.admit_task(tenant_id, key_id, _scaled(limits, self._replicas), images)
            return Admission(LOCAL_PREFIX + admission.lease_id, admission.remaining)

    async def refresh(self, tenant_id: str, lease_id: str, *, retake: int = 0) -> bool:
        if lease_id.startswith(LOCAL_PREFIX) and self._fallback is not None:
            return await self._fallback.refresh(tenant_id, lease_id.removeprefix(LOCAL_PREFIX), retake=retake)
        return await self._primary.refresh(tenant_id, lease_id, retake=retake)

    async def refund_rate(self, tenant_id: str, key_id: str, limits: TenantLimits, lease_id: str) -> None:
        if lease_id.startswith(LOCAL_PREFIX) and self._fallback is not None:
            scaled = _scaled(limits, self._replicas)  # as the local admission charged it
            await self._fallback.refund_rate(tenant_id, key_id, scaled, lease_id.removeprefix(LOCAL_PREFIX))
            return
        await self._primary.refund_rate(tenant_id, key_id, limits, lease_id)

    async def release(self, tenant_id: str, lease_id: str, *, refund_images: int = 0) -> None:
        if lease_id.startswith(LOCAL_PREFIX) and self._fallback is not None:
            await self._fallback.release(tenant_id, lease_id.removeprefix(LOCAL_PREFIX), refund_images=refund_images)
            return
        await self._primary.release(tenant_id, lease_id, refund_images=refund_images)


class FallbackGovernor:
    """The account governor with the same policy as FallbackLimiter: refuse, or a per-replica share of slots."""

    def __init__(self, primary: AccountGovernor, fallback: MemoryAccountGovernor | None, replicas: int) -> None:
        self._primary = primary
        self._fallback = fallback
        self._replicas = replicas

    async def acquire(self, credential_id: str, slots: int, capacity: int, wait_s: float) -> str:
        try:
            return await self._primary.acquire(credential_id, slots, capacity, wait_s)
        except REDIS_FAILURES as exc:
            if self._fallback is None:
                LIMITER_DECISIONS.labels("kling_account", "unavailable").inc()
                raise LimitsUnavailable() from exc
            logger.warning("account governor falling back to per-replica slots: %s", type(exc).__name__)
            share = self._local_share(slots, capacity)
            return LOCAL_PREFIX + await self._fallback.acquire(credential_id, slots, share, wait_s)

    async def try_acquire(self, credential_id: str, slots: int, capacity: int) -> str | None:
        try:
            return await self._primary.try_acquire(credential_id, slots, capacity)
        except REDIS_FAILURES:
            if self._fallback is None:
                return None  # `acquire`, if it comes to that, refuses (503) and counts it
            # Tried locally at once, as `acquire` would fall back: asking a hung Redis again costs another timeout.
            lease = await self._fallback.try_acquire(credential_id, slots, self._local_share(slots, capacity))
            return None if lease is None else LOCAL_PREFIX + lease

    def _local_share(self, slots: int, capacity: int) -> int:
        """This replica's share of the slots, but never less than this request needs nor more than the account has."""
        return min(capacity, max(slots, capacity // self._replicas))

    async def refresh(self, credential_id: str, lease_id: str, *, retake: int = 0) -> bool:
        if lease_id.startswith(LOCAL_PREFIX) and self._fallback is not None:
            return await self._fallback.refresh(credential_id, lease_id.removeprefix(LOCAL_PREFIX), retake=retake)
        return await self._primary.refresh(credential_id, lease_id, retake=retake)

    async def release(self, credential_id: str, lease_id: str) -> None:
        if lease_id.startswith(LOCAL_PREFIX) and self._fallback is not None:
            await self._fallback.release(credential_id, lease_id.removeprefix(LOCAL_PREFIX))
            return
        await self._primary.release(credential_id, lease_id)
