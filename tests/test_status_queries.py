"""StatusQueries against the Kling simulator served on loopback: reads of one account that fall due together
are answered by list calls as far back as their pages are worth it, and by queries of their own otherwise."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import anyio
import pytest

from app.http_pool import create_kling_pool
from app.kling import KlingClient, KlingCredentials, KlingError, KlingFailure, KlingTask
from app.status_queries import StatusQueries
from tests.conftest import Simulator

pytestmark = pytest.mark.anyio
BODY = {"model_name": "kling-v3", "prompt": "a red fox in the snow", "n": 1}


@pytest.fixture
async def account(simulator: Simulator) -> KlingCredentials:
    """An account of its own with room for every task a test creates."""
    credentials = KlingCredentials("ak-batch-" + secrets.token_hex(4), "sk-batch-" + secrets.token_hex(24))
    await simulator.control(
        "accounts", {"access_key": credentials.access_key, "secret_key": credentials.secret_key, "concurrency": 100}
    )
    return credentials


@pytest.fixture
async def kling(simulator: Simulator) -> AsyncIterator[KlingClient]:
    async with create_kling_pool() as pool:
        yield KlingClient(pool, simulator.url, deadline_s=10)


async def created(kling: KlingClient, account: KlingCredentials, queries: StatusQueries | None) -> KlingTask:
    """A task created on `account`; told to `queries` as the follower does, unless it was made elsewhere."""
    task = await kling.create_image_task(account, BODY)
    if queries is not None:
        queries.created(account, task.created_at)
    return task


async def reads(simulator: Simulator) -> tuple[object, object]:
    stats = await simulator.stats()
    return stats["queries"], stats["lists"]


async def test_reads_due_together_on_one_account_cost_one_list_call(
    simulator: Simulator, kling: KlingClient, account: KlingCredentials
) -> None:
    queries = StatusQueries(kling, window_s=0.1)
    tasks = [await created(kling, account, queries) for _ in range(5)]
    with anyio.fail_after(10):
        answers = await asyncio.gather(*(queries.status(account, t.task_id, t.created_at) for t in tasks))
    assert [answer.task_id for answer in answers] == [task.task_id for task in tasks]
    assert await reads(simulator) == (1, 1)


async def test_a_task_the_page_does_not_reach_is_asked_alone(
    simulator: Simulator, kling: KlingClient, account: KlingCredentials
) -> None:
    queries = StatusQueries(kling, window_s=0.1)
    oldest = await created(kling, account, queries)
    for _ in range(30):  # created on the same account by someone else: pushed the oldest off a short page
        await created(kling, account, None)
    newest = await created(kling, account, queries)
    with anyio.fail_after(10):
        answers = await asyncio.gather(
            queries.status(account, oldest.task_id, oldest.created_at),
            queries.status(account, newest.task_id, newest.created_at),
        )
    assert [answer.task_id for answer in answers] == [oldest.task_id, newest.task_id]
    assert await reads(simulator) == (2, 1)  # the list call, then the oldest's own query


async def test_an_old_tasks_read_does_not_keep_young_ones_from_a_list_call(
    simulator: Simulator, kling: KlingClient, account: KlingCredentials
) -> None:
    queries = StatusQueries(kling, window_s=0.1)
    old = await created(kling, account, queries)
    for _ in range(60):  # created here since, and not read now: a page back to the old task would be too long
        await created(kling, account, queries)
    young = [await created(kling, account, queries) for _ in range(3)]
    with anyio.fail_after(10):
        answers = await asyncio.gather(*(queries.status(account, t.task_id, t.created_at) for t in [old, *young]))
    assert [answer.task_id for answer in answers] == [task.task_id for task in [old, *young]]
    assert await reads(simulator) == (2, 1)  # the young ones' list call, then the old one's own query


async def test_reads_reaching_past_one_page_are_answered_page_by_page(simulator: Simulator, kling: KlingClient) -> None:
    account = KlingCredentials("ak-pages-" + secrets.token_hex(4), "sk-pages-" + secrets.token_hex(24))
    await simulator.control(
        "accounts", {"access_key": account.access_key, "secret_key": account.secret_key, "concurrency": 1000}
    )
    queries = StatusQueries(kling, window_s=0.2)
    tasks = [await created(kling, account, queries) for _ in range(600)]
    wanted = tasks[:60] + tasks[-60:]  # 120 reads reaching back past the newest 500: two pages (of 380) are worth it
    with anyio.fail_after(20):
        answers = await asyncio.gather(*(queries.status(account, t.task_id, t.created_at) for t in wanted))
    assert [answer.task_id for answer in answers] == [task.task_id for task in wanted]
    assert await reads(simulator) == (2, 2)


async def test_a_lone_read_is_a_query_of_its_own(
    simulator: Simulator, kling: KlingClient, account: KlingCredentials
) -> None:
    queries = StatusQueries(kling, window_s=0.05)
    task = await created(kling, account, queries)
    with anyio.fail_after(10):
        answer = await queries.status(account, task.task_id, task.created_at)
    assert answer.task_id == task.task_id
    assert await reads(simulator) == (1, 0)


async def test_a_failed_list_call_is_no_news_for_every_read_and_nothing_else_is_asked(
    simulator: Simulator, kling: KlingClient, account: KlingCredentials
) -> None:
    queries = StatusQueries(kling, window_s=0.1)
    tasks = [await created(kling, account, queries) for _ in range(3)]
    await simulator.control("faults", {"code": 5001, "http_status": 503, "times": 1, "path": "query"})
    with anyio.fail_after(10):
        answers = await asyncio.gather(
            *(queries.status(account, t.task_id, t.created_at) for t in tasks), return_exceptions=True
        )
    assert all(isinstance(answer, KlingError) and answer.code == 5001 for answer in answers)
    assert (await simulator.stats())["queries"] == 1


async def test_reads_of_a_closed_batcher_fail_as_kling_failures_not_as_cancellations(
    kling: KlingClient, account: KlingCredentials
) -> None:
    queries = StatusQueries(kling, window_s=30)
    task = await created(kling, account, queries)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            reading = asyncio.ensure_future(queries.status(account, task.task_id, task.created_at))
            group.start_soon(queries.aclose)
        # A CancelledError (a BaseException) would escape pytest.raises and fail the test here.
        with pytest.raises(KlingFailure, match="abandoned"):
            await reading
