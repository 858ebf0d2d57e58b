"""TaskFollower: one stream of Kling queries per task across all replicas, however many callers wait on it.

A task submitted here is *followed* here until Kling finishes it, whether or not anyone still waits: the
follower refreshes the task's leases (the tenant's concurrency lease, the Kling account's slots) while it
runs and releases them at the end. If this process dies, the leases expire by their TTL.

Callers waiting here on a task submitted elsewhere *watch* it: one watch per task per replica, shared by
all its local waiters and ended when the last of them leaves.

Follows and watches run the same loop. Each turn, the replica holding the task's poll lease (in Redis)
queries Kling, records the new state and broadcasts it to every replica; the others read the record and
listen. So a task costs one query per interval across the cluster, and if the polling replica dies, its
lease lapses and a watcher takes over. A state heard from Kling's callbacks (`announce`, `heard`) wakes
every loop and waiter at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from redis.exceptions import RedisError

from app.kling import KlingClient, KlingCredentials, KlingFailure, KlingTask
from app.metrics import TASKS_IN_FLIGHT
from app.status_queries import StatusQueries
from app.tasks import PollClaim, PollLease, ProgressCallback, TaskRecord, TaskStore

logger = logging.getLogger(__name__)
MAX_FOLLOW_S = 3600.0
MAX_POLL_INTERVAL_S = 5.0  # also the longest silence between progress reports while waiting
FINISHED_KEPT = 1000  # Kling image tasks take seconds to minutes; past this the task is given up on
# How long a watch outlives its last waiter: callers that wait in short rounds (the events stream, short
# `wait_seconds`) keep one watch, and its first turn, instead of starting a new one every round.
WATCH_GRACE_S = MAX_POLL_INTERVAL_S
# With Kling's callbacks coming, polling is only the fallback for a lost one (Kling does not retry them): it
# starts late and stays slow, and its reads wait longer for others of their account to share list calls
# (status_queries.FALLBACK_BATCH_WINDOW_S), so thousands of waiting tasks cost Kling (and this process) few reads.
CALLBACK_FALLBACK_POLL_S = 30.0
ADOPT_EVERY_S = 10.0  # how often each replica looks for tasks nobody follows any more
ADOPT_BATCH = 100
# How many loops record what a poll brought (the record, the broadcast, the releases at the end) at once. One
# list call answers dozens of tasks together. Their scripts, made in the same turn of the event loop, go to Redis
# in one pipeline (app/script_batches.py); the bound keeps the Python work of one such burst short, as the next
# step of every request waits behind it (unbounded, before the pipelines, requests waited tens of ms at p99).
RECORDING_AT_ONCE = 32
# A bound on bursts, not a queue: a loop that waited this long for its turn goes ahead anyway. With Redis slow
# (each turn held for seconds) news would otherwise reach waiters minutes late, and shutdown wait as long.
RECORDING_QUEUE_S = 0.5
CredentialsOf = Callable[[str], Awaitable[KlingCredentials | None]]
OnFinished = Callable[[TaskRecord], Awaitable[None]]


class Leases(Protocol):
    """What a submitted task holds: the follower renews it while it follows the task and gives it back at the
    task's end, knowing nothing about limits."""

    async def refresh(self) -> None: ...

    async def release(self) -> None: ...


def _new_signal() -> asyncio.Future[None]:
    """A watch's signal, done when its task's state changes or its loop ends (`_signal`)."""
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Watch:
    """One task's loop on this replica, its latest state, and the signal its waiters sleep on: a future done
    when the state changes (then replaced by a fresh one) or when the loop ends (then left done)."""

    record: TaskRecord
    kling: KlingCredentials
    leases: Leases | None  # set only on the replica that submitted the task
    changed: asyncio.Future[None] = field(default_factory=_new_signal)
    adopted: bool = False  # taken over from a replica that stopped following it: runs to the end
    waiters: int = 0
    loop: asyncio.Task[None] | None = None
    stopping: asyncio.TimerHandle | None = None  # a watch nobody waits on any more, stopped after a grace
    refresh_at: float = 0.0  # monotonic time the leases are due to be renewed
    # Until this monotonic time, this replica surely holds the task's poll lease, taken as the task was recorded.
    lease_held_until: float = 0.0
    unfollowed: bool = False  # its end was recorded with its follow mark dropped (`_ends_with_save`)

    @property
    def unneeded(self) -> bool:
        """Nobody here waits on it, and it was neither submitted nor adopted here: it may stop."""
        return self.waiters == 0 and self.leases is None and not self.adopted


class TaskFollower:
    def __init__(
        self,
        kling: KlingClient,
        tasks: TaskStore,
        *,
        first_interval_s: float,
        max_follow_s: float = MAX_FOLLOW_S,
        on_finished: OnFinished | None = None,
        credentials_of: CredentialsOf | None = None,
        callbacks: bool = False,
        lease_refresh_s: float = MAX_POLL_INTERVAL_S,
        queries: StatusQueries | None = None,
    ) -> None:
        self._kling = kling
        self._queries = queries  # poll turns read through it, gathered per account; without it, one query each
        self._tasks = tasks
        self._first_interval_s = max(first_interval_s, MAX_POLL_INTERVAL_S) if callbacks else first_interval_s
        self._max_interval_s = CALLBACK_FALLBACK_POLL_S if callbacks else MAX_POLL_INTERVAL_S
        # A poll lease outlives a few turns of the slowest interval, so one slow query does not hand polling over.
        self._lease_s = 3 * self._max_interval_s
        self._refresh_every_s = lease_refresh_s  # how often a submitted task's leases are renewed while it runs
        self._max_follow_s = max_follow_s
        self._on_finished = on_finished
        self._credentials_of = credentials_of
        self._finishing: set[asyncio.Task[None]] = set()  # shielded ends, awaited at shutdown
        self._recording = asyncio.Semaphore(RECORDING_AT_ONCE)  # for the loops only: requests never queue here
        self._replica = uuid.uuid4().hex  # who holds a poll lease
        self._watches: dict[str, _Watch] = {}
        # The last state of recently finished tasks, for waiters that arrive just after their loop ended.
        self._finished: OrderedDict[str, TaskRecord] = OrderedDict()

    # --- what the service calls ---

    @property
    def poll_lease(self) -> PollLease:
        """This replica's poll lease, for the record of a task just submitted here (`follow`)."""
        return PollLease(self._replica, self._lease_s)

    def follow(self, record: TaskRecord, kling: KlingCredentials, leases: Leases) -> None:
        """Follow a task just submitted here to its end, then release its leases. The caller records the task
        with `TaskStore.save(..., polled_by=self.poll_lease)`, which marks it followed and takes its poll lease in
        the round trip that records it, so the loop's first turn polls without claiming (while that lease surely
        holds: it was taken after this call, for the lease's whole time)."""
        TASKS_IN_FLIGHT.inc()
        if self._queries is not None:
            self._queries.created(kling, record.created_at_ms)
        refresh_at = time.monotonic() + self._refresh_every_s  # the leases were taken just now
        watch = self._watches.get(record.task_id)
        if watch is None:
            lease_held_until = time.monotonic() + self._lease_s
            self._start(_Watch(record, kling, leases, refresh_at=refresh_at, lease_held_until=lease_held_until))
        else:  # a caller here was already watching it (an idempotent replay racing the submission)
            watch.leases, watch.refresh_at = leases, refresh_at

    def following(self, task_id: str) -> bool:
        """Whether a loop on this replica keeps the task's state current (a follow or a watch)."""
        return task_id in self._watches

    def latest(self, task_id: str) -> TaskRecord | None:
        watch = self._watches.get(task_id)
        return watch.record if watch is not None else self._finished.get(task_id)

    async def wait(
        self, record: TaskRecord, kling: KlingCredentials, wait_s: float, on_progress: ProgressCallback | None
    ) -> TaskRecord:
        """Wait up to `wait_s` for the task's end, reporting each change and a heartbeat at least every
        MAX_POLL_INTERVAL_S. Joins this replica's loop on the task, starting a watch if there is none."""
        finished = self._finished.get(record.task_id)
        if finished is not None and finished.status.is_terminal:
            return finished
        watch = self._watches.get(record.task_id) or self._start(_Watch(record, kling, None))
        self.heard(record)  # the caller may know a newer state than the loop (a record read just now)
        watch.waiters += 1
        if watch.stopping is not None:
            watch.stopping.cancel()
            watch.stopping = None
        try:
            return await self._wait_on(watch, wait_s, on_progress)
        finally:
            watch.waiters -= 1
            if watch.unneeded:
                # Nobody here needs the task any more and it was not submitted here: stop watching soon.
                watch.stopping = asyncio.get_running_loop().call_later(WATCH_GRACE_S, self._stop_watch, watch)

    def _stop_watch(self, watch: _Watch) -> None:
        # Re-checked: the task may have been submitted here or adopted since the stop was scheduled.
        if watch.unneeded and watch.loop is not None:
            # Forgotten now, so a caller arriving meanwhile starts a fresh watch instead of joining a dying one.
            self._drop(watch)
            watch.loop.cancel()

    async def announce(self, record: TaskRecord) -> None:
        """A newer state learnt here (a poll or a Kling callback) and recorded, which told every replica (the
        store publishes what it saves with `announce=True`): wake this replica's waiters."""
        self.heard(record)
        if record.status.is_terminal and record.task_id not in self._watches:
            # Learnt here (a callback) while this replica runs no loop on it: its end is handled from here,
            # once across replicas (the webhook's own claim), in case no loop anywhere sees it.
            await self._ended(record)

    def heard(self, record: TaskRecord) -> None:
        """A state learnt elsewhere (maybe on another replica): wake this task's loop and waiters now."""
        watch = self._watches.get(record.task_id)
        if watch is not None and record.supersedes(watch.record):
            self._publish(watch, record)

    async def aclose(self) -> None:
        """Stop every loop (shutdown). The tasks go on at Kling; their leases lapse by their TTL."""
        loops = [watch.loop for watch in self._watches.values() if watch.loop is not None]
        for loop in loops:
            loop.cancel()
        for loop in loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        for watch in list(self._watches.values()):
            if watch.stopping is not None:
                watch.stopping.cancel()
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    # --- the loop ---

    def _start(self, watch: _Watch) -> _Watch:
        self._watches[watch.record.task_id] = watch
        # A fresh context: the loop outlives the request that started it, and must not be booked to it.
        watch.loop = asyncio.create_task(
            self._run(watch), name=f"follow {watch.record.task_id}", context=contextvars.Context()
        )
        # However the loop ends (cancelled even before its first step, say), its waiters answer at once.
        watch.loop.add_done_callback(functools.partial(_signal_loop_end, watch), context=_signal_context())
        return watch

    async def _run(self, watch: _Watch) -> None:
        started = time.monotonic()
        interval = self._first_interval_s
        # A task submitted here was just answered by Kling; one watched or adopted may be long overdue. One
        # submitted here is marked followed as it is recorded (`TaskStore.save(..., polled_by=...)`): from then
        # on, if this replica stops following it, another adopts it.
        quiet = watch.leases is not None
        try:
            while not watch.record.status.is_terminal and time.monotonic() - started < self._max_follow_s:
                heard = False
                if quiet:
                    heard = await self._pause(watch, interval)  # a callback may bring news before the next turn
                    interval = min(interval * 1.5, self._max_interval_s)
                quiet = True
                if not heard and not watch.record.status.is_terminal:  # news just heard needs no query
                    await self._turn(watch)
                await self._refresh_leases_if_due(watch)
            if not watch.record.status.is_terminal:
                logger.warning("gave up following task %s after %.0f s", watch.record.task_id, self._max_follow_s)
                with contextlib.suppress(RedisError):  # given up here: no other replica is to adopt it either
                    await self._tasks.unmark_followed(watch.record.task_id)
        except asyncio.CancelledError:
            await self._stop_following(watch)
            raise
        except Exception:
            # Not foreseen (a store failing in an unexpected way, a bug): stop as if this replica had stopped,
            # rather than leave a dead loop in place that waiters would join and that keeps refreshes away.
            logger.exception("following task %s failed; another replica or a later request takes it up",
                             watch.record.task_id)  # fmt: skip
            await self._stop_following(watch)
            _signal(watch.changed)  # its waiters answer with the task as it stands
            return
        finishing = asyncio.ensure_future(self._finish(watch))
        self._finishing.add(finishing)
        finishing.add_done_callback(self._finishing.discard)
        await asyncio.shield(finishing)

    async def _stop_following(self, watch: _Watch) -> None:
        """Shutdown, the last local waiter left, or the loop failed. A submitted task still runs at Kling and
        holds its slots there, so its leases are left to lapse by their TTL rather than freed to over-admit; and
        its follow mark goes stale, so another replica adopts it (`adopting`)."""
        if watch.leases is not None:
            TASKS_IN_FLIGHT.dec()
        await self._give_up_polling(watch.record.task_id)
        self._drop(watch)

    async def _pause(self, watch: _Watch, seconds: float) -> bool:
        """Sleep up to `seconds`, renewing a submitted task's leases when they are due (a pause can outlast a
        lease's TTL); True when news arrived."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if watch.leases is not None:
                remaining = max(0.0, min(remaining, watch.refresh_at - time.monotonic()))
            if await _changed_within(watch.changed, remaining):
                return True
            await self._refresh_leases_if_due(watch)
        return False

    async def _refresh_leases_if_due(self, watch: _Watch) -> None:
        if watch.leases is not None and time.monotonic() >= watch.refresh_at:
            watch.refresh_at = time.monotonic() + self._refresh_every_s
            await watch.leases.refresh()

    async def _turn(self, watch: _Watch) -> None:
        """Query Kling if this replica holds the poll lease; otherwise catch up from the shared record."""
        if time.monotonic() < watch.lease_held_until:  # taken as the task was recorded: no claim needed yet
            watch.lease_held_until = 0.0
            await self._poll(watch)
            return
        claim = await self._claim_polling(watch.record.task_id)  # which also marks the task followed, if claimed
        if claim.claimed:
            await self._poll(watch)
        elif claim.stored is not None:
            self.heard(claim.stored)

    async def _claim_polling(self, task_id: str) -> PollClaim:
        try:
            return await self._tasks.claim_polling(task_id, self._replica, self._lease_s)
        except RedisError:
            # Without Redis nobody can coordinate: each replica keeps its own waiters informed.
            return PollClaim(claimed=True)

    async def _give_up_polling(self, task_id: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._tasks.release_polling(task_id, self._replica)

    async def _poll(self, watch: _Watch) -> None:
        record, queries = watch.record, self._queries
        if queries is None:
            query = self._kling.get_image_task(watch.kling, record.task_id)
        else:
            query = queries.status(watch.kling, record.task_id, record.created_at_ms)
        await self._refreshed(record, query, bounded=True)

    async def refresh(self, record: TaskRecord, kling: KlingCredentials) -> TaskRecord:
        """Ask Kling for the task now; a newer state is recorded and announced. Returns the latest known state
        (the one given when the query failed: a failed query is "no news", not a failure)."""
        return await self._refreshed(record, self._kling.get_image_task(kling, record.task_id))

    async def _refreshed(
        self,
        record: TaskRecord,
        query: Awaitable[KlingTask],
        bounded: bool = False,
    ) -> TaskRecord:
        try:
            latest = record.updated_from(await query)
        except KlingFailure as exc:
            logger.warning("could not query task %s: %s", record.task_id, type(exc).__name__)
            return record
        async with self._turn_to_record() if bounded else contextlib.nullcontext():
            current = self._watches.get(record.task_id)
            known = current.record if current is not None else record
            if not latest.supersedes(known):
                return known  # nothing new, or older than what a callback brought while the query was under way
            ended = current is not None and self._ends_with_save(latest)
            try:
                saved = await self._tasks.save(latest, announce=True, ended=ended)
            except RedisError:
                # Neither recorded nor published (nor unfollowed), but this replica's waiters still learn of it.
                saved, ended = True, False
                logger.warning("could not record the state of task %s; other replicas poll", record.task_id)
            if not saved:
                return known  # a newer state is recorded (a callback on another replica, which announced it)
            if current is not None and ended:
                current.unfollowed = True
            await self.announce(latest)
        return latest

    def _ends_with_save(self, record: TaskRecord) -> bool:
        """Whether recording this state may also end the task's following (`TaskStore.save(..., ended=True)`):
        it is terminal and its end hands nothing over (`on_finished` delivers webhooks; this task asked for none).
        One round trip per task fewer than unmarking it after the releases; should this replica die in between,
        the leases lapse by their TTL, and there is nothing another replica would have to do."""
        return record.status.is_terminal and (self._on_finished is None or record.webhook_url is None)

    def _publish(self, watch: _Watch, record: TaskRecord) -> None:
        watch.record = record
        _signal(watch.changed)
        watch.changed = _new_signal()

    async def _finish(self, watch: _Watch) -> None:
        async with self._turn_to_record():
            await self._release_and_end(watch)

    @contextlib.asynccontextmanager
    async def _turn_to_record(self) -> AsyncIterator[None]:
        """Up to RECORDING_AT_ONCE loops at a time; one that waited RECORDING_QUEUE_S goes ahead regardless."""
        acquired = False
        with contextlib.suppress(TimeoutError):  # the turns are held long: Redis is slow, bounding no longer helps
            async with asyncio.timeout(RECORDING_QUEUE_S):
                acquired = await self._recording.acquire()
        try:
            yield
        finally:
            if acquired:
                self._recording.release()

    async def _release_and_end(self, watch: _Watch) -> None:
        record = watch.record
        try:
            if watch.leases is not None:
                TASKS_IN_FLIGHT.dec()
                await watch.leases.release()
        except (RedisError, OSError):
            logger.warning("could not release the leases of task %s; they expire by themselves", record.task_id)
        finally:
            if not record.status.is_terminal:  # a finished task's poll lease goes with its follow mark (`_ended`)
                await self._give_up_polling(record.task_id)
            self._finished[record.task_id] = record
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
            self._drop(watch)
            _signal(watch.changed)
        if record.status.is_terminal:
            await self._ended(record, unfollowed=watch.unfollowed)

    async def _ended(self, record: TaskRecord, *, unfollowed: bool = False) -> None:
        """The task is over: hand it to `on_finished` (webhooks), then nobody needs to follow it any more, nor
        poll it (the lease, if this replica holds it: kept until now, it tells other replicas' watchers to read
        the record rather than ask Kling), unless the save of its end did so already (`unfollowed`: the follow mark
        is gone, and the poll lease is left to lapse)."""
        try:
            if self._on_finished is not None:
                await self._on_finished(record)
            if not unfollowed:
                await self._tasks.unmark_followed(record.task_id, self._replica)
        except BaseException as exc:
            # The follow mark stays, so another replica takes the end up; the poll lease is of no use to it.
            await self._give_up_polling(record.task_id)
            if not isinstance(exc, RedisError | OSError):
                raise
            logger.warning("could not finish the bookkeeping of task %s; another replica will", record.task_id)

    def _drop(self, watch: _Watch) -> None:
        if self._watches.get(watch.record.task_id) is watch:
            del self._watches[watch.record.task_id]

    # --- adopting the tasks of replicas that stopped ---

    @contextlib.asynccontextmanager
    async def adopting(self) -> AsyncIterator[None]:
        """For the app's lifetime, take over tasks whose follower stopped (a replica shut down or died) so
        they still end: their waiters on other replicas hear it, their webhooks are delivered."""
        if self._credentials_of is None:
            yield
            return
        sweeper = asyncio.create_task(self._adopt_forever(), name="adopt tasks", context=contextvars.Context())
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def _adopt_forever(self) -> None:
        while True:
            await asyncio.sleep(ADOPT_EVERY_S * random.uniform(0.5, 1.5))  # replicas do not sweep in step
            try:
                await self.adopt_orphans()
            except (RedisError, OSError):
                logger.warning("could not look for tasks to adopt; trying again later")
            except Exception:  # the sweep must go on: it is how every replica's orphans still end
                logger.exception("looking for tasks to adopt failed; trying again later")

    async def adopt_orphans(self) -> int:
        """Adopt the tasks nobody has polled for a poll lease's time; returns how many."""
        adopted = 0
        for task_id in await self._tasks.stale_followed(self._lease_s, ADOPT_BATCH):
            try:
                adopted += await self._adopt(task_id)
            except (RedisError, OSError):
                raise
            except Exception:
                # One task that cannot be adopted (a credential sealed under a retired master key, a damaged
                # record) must not stop the others: it is tried again a lease's time later.
                logger.exception("could not adopt task %s", task_id)
                await self._tasks.mark_followed(task_id)
        if adopted:
            logger.info("adopted %d task(s) whose follower stopped", adopted)
        return adopted

    async def _adopt(self, task_id: str) -> int:
        if task_id in self._watches or not (await self._claim_polling(task_id)).claimed:
            return 0  # followed here already, or some replica polls it
        record = await self._tasks.get(task_id)
        if record is not None and record.status.is_terminal:  # ended (a webhook handed back at shutdown, say)
            await self._ended(record)
            return 0
        too_old = record is not None and time.time() * 1000 - record.created_at_ms > self._max_follow_s * 1000
        if record is None or too_old:  # gone, or given up on: nobody is to follow it any more
            await self._tasks.unmark_followed(task_id, self._replica)
            return 0
        assert self._credentials_of is not None
        kling = await self._credentials_of(record.credential_id)
        if kling is None:  # the credential is gone: nobody can ask Kling about the task any more
            await self._tasks.unmark_followed(task_id, self._replica)
            return 0
        watch = self._watches.get(task_id)  # a caller here may have started watching it meanwhile
        if watch is not None:
            watch.adopted = True
            return 0
        self._start(_Watch(record, kling, None, adopted=True))  # the claim above marked it followed
        return 1

    # --- waiting ---

    async def _wait_on(self, watch: _Watch, wait_s: float, on_progress: ProgressCallback | None) -> TaskRecord:
        started = time.monotonic()
        deadline = started + wait_s
        record = watch.record
        while not record.status.is_terminal:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # A heartbeat for progress reports; a caller without them sleeps until news, its deadline or the loop's end.
            heartbeat_s = MAX_POLL_INTERVAL_S if on_progress is not None else remaining
            changed = watch.changed
            await _changed_within(changed, min(remaining, heartbeat_s))
            record = watch.record
            if on_progress is not None:
                await on_progress(record, time.monotonic() - started)
            if changed.done() and changed is watch.changed:
                # Signalled and not replaced: the loop ended, or is ending (it may not be done yet, and waiting on
                # a signal already given would not yield to it). No news will come.
                break
        return record


# The context the signal's callbacks run in: they only complete a future, and read or set no context variable.
# Given none, asyncio copies the current context for every timer and done-callback: an object the collector tracks,
# several for each waiting caller. One per thread: a context cannot be entered twice at once, and a loop runs its
# callbacks one at a time, but loops in two threads of a process could each be inside one.
_signal_contexts = threading.local()


def _signal_context() -> contextvars.Context:
    context: contextvars.Context | None = getattr(_signal_contexts, "context", None)
    if context is None:
        context = _signal_contexts.context = contextvars.Context()
    return context


def _signal(changed: asyncio.Future[None], _: object = None) -> None:
    """Done, if not yet; also a timer's or another future's callback (which passes one argument more)."""
    if not changed.done():
        changed.set_result(None)


def _signal_loop_end(watch: _Watch, _: object) -> None:
    _signal(watch.changed)  # the watch's current signal: it is replaced at every change


async def _changed_within(changed: asyncio.Future[None], seconds: float) -> bool:
    """Whether `changed` (a watch's signal) is done within `seconds`. Not a wait under `asyncio.timeout`: its
    timeout is a cancellation thrown through the waiting task, with an exception and a traceback each time. With
    10,000 callers waiting, ending pauses this way (and waking callers without progress reports only for news)
    cut the worker's CPU by a third and its garbage collection by half. Nor `asyncio.wait`, which does the same
    with two more coroutines, two sets and a closure of four cells: objects every waiting caller keeps alive, and
    the garbage collector walks."""
    if changed.done():
        return True
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()
    wake, context = functools.partial(_signal, woken), _signal_context()
    timer = loop.call_later(seconds, wake, context=context)
    changed.add_done_callback(wake, context=context)
    try:
        await woken
    finally:
        timer.cancel()
        changed.remove_done_callback(wake)
    return changed.done()
