"""Script calls made together go to a real Redis together, and each caller still gets exactly its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.main import create_redis
from app.script_batches import ScriptBatcher
from tests.servers import free_port

pytestmark = pytest.mark.anyio
INCREMENT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
REFUSE = "return redis.error_reply('refused ' .. ARGV[1])"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    client = create_redis(redis_url, retries=0)  # as the gateway builds the limiter's
    await client.flushdb()
    yield client
    await client.aclose()


async def test_calls_made_together_each_get_their_own_answer_and_error(client: Redis) -> None:
    batches = ScriptBatcher(client)
    increment, refuse = client.register_script(INCREMENT), client.register_script(REFUSE)
    await increment(keys=["kgw:test:loaded"], args=[0])  # both scripts known to Redis, as in service
    await client.script_load(REFUSE)
    with anyio.fail_after(5):
        outcomes = await asyncio.gather(
            *(batches.run(increment, [f"kgw:test:n{index % 3}"], [index]) for index in range(9)),
            batches.run(refuse, [], ["this one"]),
            return_exceptions=True,
        )
    *counts, refusal = outcomes
    # Each key's calls ran in the order they were made: 0+3+6, 1+4+7, 2+5+8 as running totals.
    assert counts == [0, 1, 2, 3, 5, 7, 9, 12, 15]
    assert isinstance(refusal, ResponseError)
    assert "refused this one" in str(refusal)


async def test_scripts_redis_does_not_know_are_loaded_and_run(client: Redis) -> None:
    """A restarted or failed-over Redis has lost the scripts: the batch's calls still run, once each."""
    batches = ScriptBatcher(client)
    increment = client.register_script(INCREMENT)
    await increment(keys=["kgw:test:n"], args=[1])
    await client.script_flush()
    with anyio.fail_after(5):
        answers = await asyncio.gather(*(batches.run(increment, ["kgw:test:n"], [10]) for _ in range(3)))
    assert sorted(answers) == [11, 21, 31]
    assert await client.get("kgw:test:n") == b"31"


async def test_calls_that_ran_keep_their_answers_when_a_lost_script_cannot_be_loaded(client: Redis) -> None:
    """A call that ran is reported as run, whatever becomes of the batch's calls of scripts Redis lost: an
    admission that was charged must not read as failed (its caller would answer 503 and hold its lease)."""
    batches = ScriptBatcher(client)
    increment = client.register_script(INCREMENT)
    await increment(keys=["kgw:test:ran"], args=[0])  # known to Redis
    unloadable = client.register_script("this is not Lua")  # unknown to Redis, and its load fails
    with anyio.fail_after(5):
        outcomes: list[object] = await asyncio.gather(
            batches.run(increment, ["kgw:test:ran"], [1]), batches.run(unloadable, [], []), return_exceptions=True
        )
    ran, failed = outcomes
    assert ran == 1
    assert isinstance(failed, ResponseError)
    assert await client.get("kgw:test:ran") == b"1"


async def test_a_caller_that_gives_up_leaves_its_call_and_the_others_to_run(client: Redis) -> None:
    batches = ScriptBatcher(client)
    increment = client.register_script(INCREMENT)
    with anyio.fail_after(5):
        leaving = asyncio.ensure_future(batches.run(increment, ["kgw:test:left"], [1]))
        staying = asyncio.ensure_future(batches.run(increment, ["kgw:test:stayed"], [1]))
        await asyncio.sleep(0)  # both calls made, their batch not yet sent
        leaving.cancel()
        assert await staying == 1
        with pytest.raises(asyncio.CancelledError):
            await leaving
    # It went in the same round trip: a release whose caller gave up still happens (it is how a slot comes back).
    assert await client.get("kgw:test:left") == b"1"


async def test_when_redis_is_away_every_call_of_the_batch_fails_as_a_redis_error() -> None:
    client = create_redis(f"redis://127.0.0.1:{free_port()}", retries=0)
    try:
        batches = ScriptBatcher(client)
        increment = client.register_script(INCREMENT)
        with anyio.fail_after(10):
            outcomes = await asyncio.gather(
                *(batches.run(increment, ["kgw:test:n"], [1]) for _ in range(3)), return_exceptions=True
            )
        assert all(isinstance(outcome, RedisConnectionError) for outcome in outcomes)
    finally:
        await client.aclose()
