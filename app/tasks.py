"""Task records (who owns which Kling task, and its last known state), idempotency claims, poll leases.

A record is written as soon as Kling accepts a task, so any replica can answer `GET /tasks/{id}` and
resume waiting. Records live as long as Kling keeps the images (30 days).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import Protocol

from redis.asyncio import Redis

from app.kling import KlingTask
from app.models import IMAGE_URL_LIFETIME_DAYS, ImageView, TaskStatus, TaskView, datetime_from_ms
from app.script_batches import ScriptBatcher

TASK_TTL_S = IMAGE_URL_LIFETIME_DAYS * 86_400
# Compare-and-set on an idempotency claim: only its owner may complete (ARGV[2] set for ARGV[3] s) or drop it.
IF_OWNER = """
local current = redis.call('GET', KEYS[1])
if not current or cjson.decode(current)['owner'] ~= ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
return 1
"""
# Take or renew a task's poll lease: whoever holds it queries Kling for everyone.
# One round trip per poll turn of each followed task: the claim and the follow mark, or, when another replica
# holds the lease, the record it keeps current (what a replica that does not poll catches up from). A task
# submitted here needs none for its first turn: the script that recorded it took the lease (SAVE_IF_NOT_OLDER).
CLAIM_POLLING = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return {0, redis.call('GET', KEYS[3])} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return {1}
"""
RELEASE_POLLING = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# A task's end, handled: its poll lease (if ARGV[1] holds it) and its follow mark go in one round trip.
UNFOLLOW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('ZREM', KEYS[2], ARGV[2])
"""
# Write a task's state unless the stored one is newer (Kling's updated_at): a poll answer that was under way
# while another replica recorded a callback's terminal state must not turn the record back. A state written is
# published on the channel ARGV[4] names (none when empty): recorded and announced in one round trip. KEYS[2] and
# KEYS[3] (the followed set and the task's poll lease) go with ARGV[5]: 'follow' marks the task ARGV[6] followed
# as of ARGV[9] and takes its poll lease for ARGV[7] (for ARGV[8] ms), stored or not (a task just submitted);
# 'unfollow' drops the follow mark once the state is stored (a task's end, nothing left to do). Its poll lease is
# left to lapse: until then a watcher on another replica that has not heard of the end yet is refused the lease
# and given this record, rather than claiming the lease, following the task again and asking Kling once more.
SAVE_IF_NOT_OLDER = """
local mode = ARGV[5]
if mode == 'follow' then
  redis.call('ZADD', KEYS[2], ARGV[9], ARGV[6])
  local holder = redis.call('GET', KEYS[3])
  if not holder or holder == ARGV[7] then redis.call('SET', KEYS[3], ARGV[7], 'PX', tonumber(ARGV[8])) end
end
local current = redis.call('GET', KEYS[1])
if current then
  local ok, stored = pcall(cjson.decode, current)
  if ok and type(stored) == 'table' and tonumber(stored['updated_at_ms'] or 0) > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[3]))
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[1]) end
if mode == 'unfollow' then redis.call('ZREM', KEYS[2], ARGV[6]) end
return 1
"""
# Where every replica hears the task states recorded by the others (app/callbacks.py, TaskUpdates).
TASK_UPDATES_CHANNEL = "kgw:task-updates"
IDEMPOTENCY_TTL_S = 86_400

_KLING_STATUS = {
    "submitted": TaskStatus.SUBMITTED,
    "processing": TaskStatus.PROCESSING,
    "succeed": TaskStatus.SUCCEEDED,
    "failed": TaskStatus.FAILED,
}


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    tenant_id: str
    external_task_id: str
    model_name: str
    num_images: int
    status: TaskStatus
    created_at_ms: int
    updated_at_ms: int
    status_message: str | None = None
    images: list[tuple[int, str]] = field(default_factory=list)
    credential_id: str = ""  # the Kling account the task runs on
    webhook_url: str | None = None  # where the caller wants the final result delivered

    def supersedes(self, other: TaskRecord) -> bool:
        """Whether this state replaces `other`: it differs and is no older (Kling's updated_at)."""
        return self != other and self.updated_at_ms >= other.updated_at_ms

    def updated_from(self, task: KlingTask) -> TaskRecord:
        return replace(
            self,
            status=_KLING_STATUS.get(task.task_status, TaskStatus.PROCESSING),
            status_message=task.task_status_msg or None,
            updated_at_ms=task.updated_at,
            images=[(image.index, image.url) for image in task.task_result.images],
        )

    def view(self) -> TaskView:
        created = datetime_from_ms(self.created_at_ms)
        return TaskView(
            task_id=self.task_id,
            status=self.status,
            status_message=self.status_message,
            model_name=self.model_name,
            num_images=self.num_images,
            images=[ImageView(index=index, url=url) for index, url in self.images],
            created_at=created,
            updated_at=datetime_from_ms(self.updated_at_ms),
            images_expire_at=created + timedelta(days=IMAGE_URL_LIFETIME_DAYS) if self.images else None,
        )


def record_to_json(record: TaskRecord) -> str:
    # A shallow dict, not `asdict`: that deep-copies every field, a few percent of a worker's CPU at load (py-spy),
    # and json.dumps writes the same text from the originals (the images' tuples as arrays, the status's value).
    return json.dumps({name: getattr(record, name) for name in _RECORD_FIELD_ORDER})


def record_from_json(raw: str | bytes) -> TaskRecord:
    # Fields a newer replica added are dropped, so replicas of two versions can share records (rolling deploy).
    fields = {key: value for key, value in json.loads(raw).items() if key in _RECORD_FIELDS}
    fields["status"] = TaskStatus(fields["status"])
    fields["images"] = [tuple(image) for image in fields["images"]]
    return TaskRecord(**fields)


_RECORD_FIELD_ORDER = tuple(TaskRecord.__dataclass_fields__)
_RECORD_FIELDS = frozenset(_RECORD_FIELD_ORDER)


@dataclass(frozen=True)
class PollClaim:
    """A poll turn's claim: this poller holds the lease, or another does and `stored` is the task's record."""

    claimed: bool
    stored: TaskRecord | None = None


@dataclass(frozen=True)
class PollLease:
    """A replica's claim to poll a task for every replica: who holds it, and for how long at a time."""

    poller: str
    ttl_s: float


@dataclass(frozen=True)
class IdempotencyClaim:
    """Who first used an idempotency key: the request's fingerprint and, once Kling accepted it, the task."""

    fingerprint: str
    task_id: str | None = None
    owner: str = ""  # which request made the claim, so a replayed SET cannot look like someone else's


class TaskStore(Protocol):
    async def save(
        self,
        record: TaskRecord,
        *,
        announce: bool = False,
        polled_by: PollLease | None = None,
        ended: bool = False,
    ) -> bool:
        """Store the task's state unless the stored one is newer (a higher `updated_at_ms`); True if stored. With
        `announce`, a stored state is also published to every replica (TASK_UPDATES_CHANNEL), in the same step.
        With `polled_by`, stored or not, the task is also marked followed as of now and its poll lease taken, unless
        another poller holds it (what `claim_polling` does): a task just submitted is recorded and its first poll
        turn claimed in one round trip, rather than three. With `ended` (a terminal state whose end needs nothing
        more, such as a webhook; not with `polled_by`, which it contradicts), a stored state also ends the task's
        following (`unmark_followed`) in the same round trip; its poll lease is left to lapse, so that until then
        a poll turn elsewhere is refused it and reads this record (`claim_polling`) instead of asking Kling."""

    async def get(self, task_id: str) -> TaskRecord | None: ...

    async def claim_idempotency(self, scope: str, claim: IdempotencyClaim, ttl_s: float) -> IdempotencyClaim | None:
        """Claim `scope` atomically for `ttl_s` (until completed); None when this caller won, else the existing
        claim. An unfinished claim lapses after `ttl_s`, so a crashed request cannot block its key for a day."""

    async def complete_idempotency(self, scope: str, claim: IdempotencyClaim) -> None:
        """Record the claim's task for 24 h, if the claim is still `claim.owner`'s."""

    async def release_idempotency(self, scope: str, owner: str) -> None:
        """Drop the claim, if it is still `owner`'s (a lapsed claim may have been taken by another request)."""

    async def mark_submitting(self, external_task_id: str) -> bool:
        """Record that a create with this id is about to be sent; True if one was recorded before (and never
        confirmed), i.e. an earlier attempt may have created the task."""

    async def confirm_submitted(self, external_task_id: str) -> None: ...

    async def claim_polling(self, task_id: str, poller: str, ttl_s: float) -> PollClaim:
        """Take or renew the task's poll lease for `ttl_s`, and mark the task followed as of now (see
        `mark_followed`). While another poller holds it: not claimed, nothing changed, and the stored record."""

    async def release_polling(self, task_id: str, poller: str) -> None:
        """Give the poll lease up, if `poller` still holds it, so another replica can take over at once."""

    async def is_polled(self, task_id: str) -> bool:
        """Whether some replica holds the task's poll lease (so its record is being kept current)."""

    async def claim_webhook(self, task_id: str) -> bool:
        """True for the first caller only: who delivers the task's webhook."""

    async def release_webhook(self, task_id: str) -> None:
        """A delivery was cut short (shutdown): let whoever handles the task's end next deliver it."""

    async def mark_followed(self, task_id: str, at: float | None = None) -> None:
        """Record that a replica follows the task now (`at`, default now): the mark goes stale if it stops."""

    async def unmark_followed(self, task_id: str, poller: str | None = None) -> None:
        """Nobody is to follow the task any more. With `poller`, its poll lease goes too, if `poller` holds it:
        a task's end, handled, costs one round trip rather than two."""

    async def stale_followed(self, older_than_s: float, limit: int) -> list[str]:
        """Tasks whose follow mark is older than `older_than_s`: their follower stopped before their end."""


class MemoryTaskStore:
    """In-process backend, bounded so a long-running demo cannot grow without limit."""

    def __init__(self, max_records: int = 100_000) -> None:
        self._records: OrderedDict[str, TaskRecord] = OrderedDict()
        self._claims: dict[str, tuple[IdempotencyClaim, float]] = {}
        self._submitting: set[str] = set()
        self._pollers: dict[str, tuple[str, float]] = {}
        self._webhooks: OrderedDict[str, None] = OrderedDict()
        self._followed: dict[str, float] = {}
        self._max_records = max_records

    async def save(
        self,
        record: TaskRecord,
        *,
        announce: bool = False,
        polled_by: PollLease | None = None,
        ended: bool = False,
    ) -> bool:
        # One process, no other replica to tell: `announce` has nothing to do here.
        if polled_by is not None:
            await self.claim_polling(record.task_id, polled_by.poller, polled_by.ttl_s)
        stored = self._records.get(record.task_id)
        if stored is not None and stored.updated_at_ms > record.updated_at_ms:
            return False
        self._records[record.task_id] = record
        self._records.move_to_end(record.task_id)
        while len(self._records) > self._max_records:
            self._records.popitem(last=False)
        if ended and polled_by is None:
            await self.unmark_followed(record.task_id)
        return True

    async def get(self, task_id: str) -> TaskRecord | None:
        return self._records.get(task_id)

    async def claim_idempotency(self, scope: str, claim: IdempotencyClaim, ttl_s: float) -> IdempotencyClaim | None:
        existing = self._claims.get(scope)
        if existing is not None and existing[1] > time.monotonic():
            return existing[0]
        self._claims[scope] = (claim, time.monotonic() + ttl_s)
        return None

    def _owned(self, scope: str, owner: str) -> bool:
        existing = self._claims.get(scope)
        return existing is not None and existing[0].owner == owner

    async def complete_idempotency(self, scope: str, claim: IdempotencyClaim) -> None:
        if self._owned(scope, claim.owner):
            self._claims[scope] = (claim, time.monotonic() + IDEMPOTENCY_TTL_S)

    async def release_idempotency(self, scope: str, owner: str) -> None:
        if self._owned(scope, owner):
            del self._claims[scope]

    async def mark_submitting(self, external_task_id: str) -> bool:
        earlier = external_task_id in self._submitting
        self._submitting.add(external_task_id)
        return earlier

    async def confirm_submitted(self, external_task_id: str) -> None:
        self._submitting.discard(external_task_id)

    async def claim_polling(self, task_id: str, poller: str, ttl_s: float) -> PollClaim:
        holder, until = self._pollers.get(task_id, (poller, 0.0))
        if holder != poller and until > time.monotonic():
            return PollClaim(claimed=False, stored=self._records.get(task_id))
        self._pollers[task_id] = (poller, time.monotonic() + ttl_s)
        self._followed[task_id] = time.time()
        return PollClaim(claimed=True)

    async def release_polling(self, task_id: str, poller: str) -> None:
        if self._pollers.get(task_id, ("", 0.0))[0] == poller:
            del self._pollers[task_id]

    async def is_polled(self, task_id: str) -> bool:
        return self._pollers.get(task_id, ("", 0.0))[1] > time.monotonic()

    async def claim_webhook(self, task_id: str) -> bool:
        claimed = task_id not in self._webhooks
        self._webhooks[task_id] = None
        while len(self._webhooks) > self._max_records:
            self._webhooks.popitem(last=False)
        return claimed

    async def release_webhook(self, task_id: str) -> None:
        self._webhooks.pop(task_id, None)

    async def mark_followed(self, task_id: str, at: float | None = None) -> None:
        self._followed[task_id] = time.time() if at is None else at

    async def unmark_followed(self, task_id: str, poller: str | None = None) -> None:
        self._followed.pop(task_id, None)
        if poller is not None:
            await self.release_polling(task_id, poller)

    async def stale_followed(self, older_than_s: float, limit: int) -> list[str]:
        cutoff = time.time() - older_than_s
        return [task_id for task_id, at in self._followed.items() if at < cutoff][:limit]


class RedisTaskStore:
    def __init__(self, redis: Redis, namespace: str = "kgw") -> None:
        self._redis = redis
        self._ns = namespace
        # What followers record of tasks already running: many at once when a list call answers them together.
        self._batches = ScriptBatcher(redis)
        self._if_owner = redis.register_script(IF_OWNER)
        self._claim_polling = redis.register_script(CLAIM_POLLING)
        self._release_polling = redis.register_script(RELEASE_POLLING)
        self._unfollow = redis.register_script(UNFOLLOW)
        self._save_if_not_older = redis.register_script(SAVE_IF_NOT_OLDER)

    async def save(
        self,
        record: TaskRecord,
        *,
        announce: bool = False,
        polled_by: PollLease | None = None,
        ended: bool = False,
    ) -> bool:
        channel = TASK_UPDATES_CHANNEL if announce else ""
        keys = [f"{self._ns}:task:{record.task_id}"]
        args: list[str | int | float] = [record_to_json(record), record.updated_at_ms, TASK_TTL_S, channel]
        following: list[str | int | float] = []  # what the script does to the follow mark and the poll lease
        if polled_by is not None:
            following = ["follow", record.task_id, polled_by.poller, int(polled_by.ttl_s * 1000), time.time()]
        elif ended:
            following = ["unfollow", record.task_id]
        if following:
            keys += [f"{self._ns}:followed", f"{self._ns}:poller:{record.task_id}"]
        if polled_by is not None:  # a task just created, its request waiting for this one round trip: at once
            return bool(await self._save_if_not_older(keys=keys, args=args + following))
        return bool(await self._batches.run(self._save_if_not_older, keys, args + following))

    async def get(self, task_id: str) -> TaskRecord | None:
        raw = await self._redis.get(f"{self._ns}:task:{task_id}")
        return record_from_json(raw) if raw is not None else None

    async def claim_idempotency(self, scope: str, claim: IdempotencyClaim, ttl_s: float) -> IdempotencyClaim | None:
        key = f"{self._ns}:idem:{scope}"
        # SET NX GET: claim and read the previous claim in one round trip, atomically across replicas.
        previous = await self._redis.set(key, json.dumps(asdict(claim)), nx=True, get=True, px=int(ttl_s * 1000))
        return IdempotencyClaim(**json.loads(previous)) if isinstance(previous, (str, bytes)) else None

    async def complete_idempotency(self, scope: str, claim: IdempotencyClaim) -> None:
        args: list[str | int] = [claim.owner, json.dumps(asdict(claim)), IDEMPOTENCY_TTL_S]
        await self._if_owner(keys=[f"{self._ns}:idem:{scope}"], args=args)

    async def release_idempotency(self, scope: str, owner: str) -> None:
        await self._if_owner(keys=[f"{self._ns}:idem:{scope}"], args=[owner, "", 0])

    async def mark_submitting(self, external_task_id: str) -> bool:
        # SET GET: record and learn of an earlier, unconfirmed attempt in one round trip.
        key = f"{self._ns}:submitting:{external_task_id}"
        earlier = await self._redis.set(key, "1", get=True, ex=IDEMPOTENCY_TTL_S)
        return earlier is not None

    async def confirm_submitted(self, external_task_id: str) -> None:
        await self._redis.delete(f"{self._ns}:submitting:{external_task_id}")

    async def claim_polling(self, task_id: str, poller: str, ttl_s: float) -> PollClaim:
        keys = [f"{self._ns}:poller:{task_id}", f"{self._ns}:followed", f"{self._ns}:task:{task_id}"]
        reply = await self._claim_polling(keys=keys, args=[poller, int(ttl_s * 1000), time.time(), task_id])
        if reply[0]:
            return PollClaim(claimed=True)
        raw = reply[1] if len(reply) > 1 else None
        return PollClaim(claimed=False, stored=record_from_json(raw) if raw is not None else None)

    async def release_polling(self, task_id: str, poller: str) -> None:
        # Straight to Redis, as the claim it undoes is: batched, a watch's release could reach Redis after the claim of
        # a new watch of the same task on this replica, and drop its lease.
        await self._release_polling(keys=[f"{self._ns}:poller:{task_id}"], args=[poller])

    async def is_polled(self, task_id: str) -> bool:
        return bool(await self._redis.exists(f"{self._ns}:poller:{task_id}"))

    async def claim_webhook(self, task_id: str) -> bool:
        return bool(await self._redis.set(f"{self._ns}:webhook:{task_id}", "1", nx=True, ex=IDEMPOTENCY_TTL_S))

    async def release_webhook(self, task_id: str) -> None:
        await self._redis.delete(f"{self._ns}:webhook:{task_id}")

    async def mark_followed(self, task_id: str, at: float | None = None) -> None:
        await self._redis.zadd(f"{self._ns}:followed", {task_id: time.time() if at is None else at})

    async def unmark_followed(self, task_id: str, poller: str | None = None) -> None:
        if poller is None:
            await self._redis.zrem(f"{self._ns}:followed", task_id)
            return
        keys = [f"{self._ns}:poller:{task_id}", f"{self._ns}:followed"]
        await self._batches.run(self._unfollow, keys, [poller, task_id])

    async def stale_followed(self, older_than_s: float, limit: int) -> list[str]:
        cutoff = time.time() - older_than_s
        found = await self._redis.zrangebyscore(f"{self._ns}:followed", "-inf", cutoff, start=0, num=limit)
        return [item.decode() if isinstance(item, bytes) else str(item) for item in found]


ProgressCallback = Callable[[TaskRecord, float], Awaitable[None]]
