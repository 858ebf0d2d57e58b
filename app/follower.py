"""TaskFollower: follows every task this replica submitted until Kling finishes it, whether or not a client
still waits, then releases the task's leases (the tenant's concurrency lease and the Kling account's slots).

While following it refreshes the leases, so they outlive no replica: if this process dies, they expire by
their TTL. Callers waiting on a task followed here are woken by the follower instead of polling Kling
themselves, so one task costs one stream of queries however many wait on it in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from app.kling import KlingClient, KlingCredentials, KlingFailure
from app.tasks import MAX_POLL_INTERVAL_S, ProgressCallback, TaskRecord, TaskStore

logger = logging.getLogger(__name__)
MAX_FOLLOW_S = 3600.0
FINISHED_KEPT = 1000  # Kling image tasks take seconds to minutes; past this the task is given up on


@dataclass(frozen=True)
class Leases:
    """What a submitted task holds, as callables so the follower needs to know nothing about limits."""

    refresh: Callable[[], Awaitable[None]]
    release: Callable[[], Awaitable[None]]


class TaskFollower:
    def __init__(
        self, kling: KlingClient, tasks: TaskStore, *, first_interval_s: float, max_follow_s: float = MAX_FOLLOW_S
    ) -> None:
        self._kling = kling
        self._tasks = tasks
        self._first_interval_s = first_interval_s
        self._max_follow_s = max_follow_s
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._latest: dict[str, TaskRecord] = {}
        self._changed: dict[str, asyncio.Event] = {}
        # The last state of recently finished tasks, for waiters that wake just after their follower ended.
        self._finished: OrderedDict[str, TaskRecord] = OrderedDict()

    def follow(self, record: TaskRecord, kling: KlingCredentials, leases: Leases) -> None:
        self._latest[record.task_id] = record
        self._changed[record.task_id] = asyncio.Event()
        task = asyncio.create_task(self._follow(record, kling, leases), name=f"follow {record.task_id}")
        self._followers[record.task_id] = task

    def heard(self, record: TaskRecord) -> None:
        """A state learnt elsewhere (a callback, maybe on another replica): wake this task's waiters now."""
        current = self._latest.get(record.task_id)
        if current is not None and record != current and record.updated_at_ms >= current.updated_at_ms:
            self._publish(record)

    def latest(self, task_id: str) -> TaskRecord | None:
        return self._latest.get(task_id) or self._finished.get(task_id)

    def following(self, task_id: str) -> bool:
        return task_id in self._followers

    async def _follow(self, record: TaskRecord, kling: KlingCredentials, leases: Leases) -> None:
        started = time.monotonic()
        interval = self._first_interval_s
        try:
            while not record.status.is_terminal and time.monotonic() - started < self._max_follow_s:
                changed = self._changed.get(record.task_id)
                if changed is not None:  # a callback may end the wait before the next poll is due
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(interval):
                            await changed.wait()
                interval = min(interval * 1.5, MAX_POLL_INTERVAL_S)
                heard = self._latest.get(record.task_id, record)
                record = heard if heard.status.is_terminal else await self._poll(heard, kling)
                await leases.refresh()
            if not record.status.is_terminal:
                logger.warning("gave up following task %s after %.0f s", record.task_id, self._max_follow_s)
        except asyncio.CancelledError:
            # Shutdown: the task still runs at Kling and still holds its slots there, so its leases are
            # left to lapse by their TTL rather than freed for other replicas to over-admit.
            self._forget(record)
            raise
        await asyncio.shield(self._finish(record, leases))

    async def _poll(self, record: TaskRecord, kling: KlingCredentials) -> TaskRecord:
        try:
            latest = record.updated_from(await self._kling.get_image_task(kling, record.task_id))
        except KlingFailure as exc:
            logger.warning("could not query task %s: %s", record.task_id, type(exc).__name__)
            return record
        if latest != record:
            try:
                await self._tasks.save(latest)
            except RedisError:
                logger.warning("could not record the state of task %s", record.task_id)
            self._publish(latest)
        return latest

    def _publish(self, record: TaskRecord) -> None:
        self._latest[record.task_id] = record
        changed = self._changed.get(record.task_id)
        if changed is not None:
            changed.set()
            self._changed[record.task_id] = asyncio.Event()

    async def _finish(self, record: TaskRecord, leases: Leases) -> None:
        try:
            await leases.release()
        except (RedisError, OSError):
            logger.warning("could not release the leases of task %s; they expire by themselves", record.task_id)
        finally:
            self._forget(record)

    def _forget(self, record: TaskRecord) -> None:
        self._finished[record.task_id] = record
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)
        self._followers.pop(record.task_id, None)
        self._latest.pop(record.task_id, None)
        changed = self._changed.pop(record.task_id, None)
        if changed is not None:
            changed.set()

    async def wait(self, record: TaskRecord, wait_s: float, on_progress: ProgressCallback | None) -> TaskRecord:
        """Wait up to `wait_s` for a task followed here, reporting each change and a heartbeat every 5 s."""
        started = time.monotonic()
        deadline = started + wait_s
        while not record.status.is_terminal:
            remaining = deadline - time.monotonic()
            changed = self._changed.get(record.task_id)
            if changed is None:  # the follower has ended: its last word is final
                record = self._finished.get(record.task_id) or await self._tasks.get(record.task_id) or record
                break
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, MAX_POLL_INTERVAL_S)):
                    await changed.wait()
            record = self._latest.get(record.task_id) or await self._tasks.get(record.task_id) or record
            if on_progress is not None:
                await on_progress(record, time.monotonic() - started)
        return record

    async def aclose(self) -> None:
        """Stop following (shutdown). The tasks go on at Kling; their leases lapse by their TTL."""
        followers = list(self._followers.values())
        for follower in followers:
            follower.cancel()
        for follower in followers:
            with contextlib.suppress(asyncio.CancelledError):
                await follower
