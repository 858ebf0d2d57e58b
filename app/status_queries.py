"""StatusQueries: the status reads of followed tasks, answered per Kling account by list calls where that is
cheaper than a query per task.

Kling answers one task per query, or a page of an account's tasks (newest first, up to 500 a page, no filter)
per list call (reference/kling-api.md §5). A replica following many tasks on one account would otherwise send a
query per task per poll turn: each an HTTP call here and one more request against the account's rate limit at
Kling. Reads for one account that fall due within `window_s` of each other are gathered; the pages reaching back
to as many of them as is worth it (newest first) answer those, in one list call or a few. How far back a read
is comes from the tasks this replica created on the account since, plus slack; a read the pages do not reach
(an old task, or one pushed down by tasks created elsewhere) is asked alone, as is a lone read.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
from collections import deque
from collections.abc import Coroutine
from typing import Any

from app.kling import LIST_PAGE_MAX, KlingClient, KlingCredentials, KlingFailure, KlingTask, KlingTransportError

BATCH_WINDOW_S = 0.2  # added to a read's latency at most; polls are a second or more apart anyway
# With Kling's callbacks coming, polls are only the fallback for a lost one, 5 to 30 s apart (app/follower.py): a
# read may wait this long for others of its account, so thousands of waiting tasks are read a page at a time.
FALLBACK_BATCH_WINDOW_S = 2.5
LIST_PAGES_MAX = 4  # how far back one batch lists: 2,000 entries, in pages of at most LIST_PAGE_MAX
# A listed task costs this process a small share of a query of its own (bytes to decode, no round trip), and
# Kling the rendering of an entry: pages are worth it while they have at most this many entries per task wanted
# from them. Twenty was measured too long: with 10,000 tasks held, the simulator spent itself on long pages and
# its callbacks came late (bench.waiting).
ENTRIES_PER_READ = 10


# The reads of one account gathered in one window: task id -> (its created_at in ms, its answer).
_Batch = dict[str, tuple[int, asyncio.Future[KlingTask]]]


class StatusQueries:
    def __init__(self, kling: KlingClient, *, window_s: float = BATCH_WINDOW_S) -> None:
        self._kling = kling
        self._window_s = window_s
        self._open: dict[KlingCredentials, _Batch] = {}
        # Kling's created_at (ms) of the tasks this replica created on each account, newest last.
        self._created: dict[KlingCredentials, deque[int]] = {}
        self._answering: dict[asyncio.Task[None], _Batch] = {}

    def created(self, credentials: KlingCredentials, created_at_ms: int) -> None:
        """A task was just created on the account here: later pages have to reach past it."""
        self._created.setdefault(credentials, deque(maxlen=LIST_PAGES_MAX * LIST_PAGE_MAX)).append(created_at_ms)

    async def status(self, credentials: KlingCredentials, task_id: str, created_at_ms: int) -> KlingTask:
        """The task as Kling has it now (at most `window_s` from now); a KlingFailure when Kling cannot say."""
        batch = self._open.get(credentials)
        if batch is None:
            batch = self._open[credentials] = {}
            self._start(self._answer(credentials, batch), batch)
        read = batch.get(task_id)
        if read is None:
            answer: asyncio.Future[KlingTask] = asyncio.get_running_loop().create_future()
            answer.add_done_callback(_retrieved)
            read = batch[task_id] = (created_at_ms, answer)
        # Shielded: one reader giving up (its waiter left) must not take the answer from the others.
        return await asyncio.shield(read[1])

    async def aclose(self) -> None:
        answering = dict(self._answering)
        for task in answering:
            task.cancel()
        for task, batch in answering.items():
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # A batch cancelled before it began never answered: never leave a reader waiting.
            _fail_unanswered(batch, _abandoned())

    def _start(self, work: Coroutine[Any, Any, None], batch: _Batch) -> None:
        # A fresh context: the calls are nobody's request, and must not be booked to the one that opened the batch.
        answering = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
        self._answering[answering] = batch
        answering.add_done_callback(lambda done: self._answering.pop(done, None))

    async def _answer(self, credentials: KlingCredentials, batch: _Batch) -> None:
        try:
            try:
                await asyncio.sleep(self._window_s)
            finally:
                del self._open[credentials]  # reads from now on gather in a new batch
            page_size, pages = self._pages(credentials, batch)
            for page_number in range(1, pages + 1):
                unanswered = frozenset(task_id for task_id, (_, answer) in batch.items() if not answer.done())
                if not unanswered:
                    break
                listed = await self._kling.list_image_tasks(credentials, page_size, unanswered, page_number)
                for task_id, task in listed.items():
                    batch[task_id][1].set_result(task)
            alone = [(task_id, answer) for task_id, (_, answer) in batch.items() if not answer.done()]
            await asyncio.gather(*(self._ask_alone(credentials, task_id, answer) for task_id, answer in alone))
        except KlingFailure as exc:  # a list call failed: no news this turn for any read not yet answered
            _fail_unanswered(batch, exc)
        except BaseException as exc:
            # Never a cancellation handed to a reader: its loop would take it for its own and stop.
            _fail_unanswered(batch, exc if isinstance(exc, Exception) else _abandoned())
            raise

    def _pages(self, credentials: KlingCredentials, batch: _Batch) -> tuple[int, int]:
        """The pages worth listing, as (page size, pages): those reaching the most reads, newest first, with at
        most ENTRIES_PER_READ entries per read they reach. No pages when asking each alone is cheaper. Reads they
        do not reach are asked alone: an account's old tasks need not keep its young ones from a list call."""
        created = sorted(self._created.get(credentials, ()))
        best = (0, 0)
        for reached, oldest in enumerate(sorted((at for at, _ in batch.values()), reverse=True), start=1):
            newer = len(created) - bisect.bisect_left(created, oldest)
            reach = newer + newer // 4 + 10  # slack for tasks created meanwhile by other replicas
            pages = -(-reach // LIST_PAGE_MAX)
            page_size = -(-reach // pages)  # pages of one size (pageNum counts in them), as few entries as will do
            if pages > LIST_PAGES_MAX:
                break
            if reached >= 2 and page_size * pages <= ENTRIES_PER_READ * reached:
                best = (page_size, pages)
        return best

    async def _ask_alone(self, credentials: KlingCredentials, task_id: str, answer: asyncio.Future[KlingTask]) -> None:
        try:
            task = await self._kling.get_image_task(credentials, task_id)
        except Exception as exc:  # even one not foreseen: this read's failure, not its batch's
            answer.set_exception(exc)
        else:
            answer.set_result(task)


def _abandoned() -> KlingTransportError:
    return KlingTransportError("the status read was abandoned (shutdown)", timed_out=False, sent=False)


def _fail_unanswered(batch: _Batch, failure: Exception) -> None:
    for _, answer in batch.values():
        if not answer.done():
            answer.set_exception(failure)


def _retrieved(answer: asyncio.Future[KlingTask]) -> None:
    # Every reader may have given up before the answer came: mark a failure seen, so asyncio does not log it.
    if not answer.cancelled():
        answer.exception()
