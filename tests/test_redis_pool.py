"""The Redis pool holds at most its connections, makes a command wait for one when all are in use, and fails
it with redis-py's ConnectionError when none comes back in time; a write Redis stops taking fails in time."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.main import create_redis
from app.redis_pool import BoundedConnectionPool
from tests.servers import free_port, start_redis

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def full_pool(
    redis_url: str, wait_s: float
) -> AsyncIterator[tuple[BoundedConnectionPool, Redis, AbstractConnection]]:
    """A pool of one connection, a client on it, and that connection held: the client's next command finds
    the pool full."""
    pool = BoundedConnectionPool.from_url(redis_url, max_connections=1, timeout=wait_s)
    client = Redis.from_pool(pool)
    try:
        yield pool, client, await pool.get_connection()
    finally:
        await client.aclose()


async def waiting_ping(pool: BoundedConnectionPool, client: Redis) -> asyncio.Task[bool]:
    """A PING sent on a full pool, once it waits for a connection (the pool has no event for that)."""

    async def ping() -> bool:
        return bool(await client.ping())

    waiters = pool._waiting
    sent = asyncio.create_task(ping())
    async with asyncio.timeout(10):
        while pool._waiting == waiters:  # noqa: ASYNC110 - the pool has no event for a command that waits
            await asyncio.sleep(0)
    return sent


async def test_a_burst_larger_than_the_pool_waits_its_turn_instead_of_failing(redis_url: str) -> None:
    client = create_redis(redis_url, max_connections=2)
    try:
        await client.set("burst", "ok")
        answers = await asyncio.gather(*(client.get("burst") for _ in range(50)))
        assert answers == [b"ok"] * 50
        pool = client.connection_pool
        assert isinstance(pool, BoundedConnectionPool)
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 2
    finally:
        await client.aclose()


async def test_a_command_waiting_for_a_connection_gets_the_one_given_back(redis_url: str) -> None:
    async with full_pool(redis_url, wait_s=30) as (pool, client, held):
        waiting = await waiting_ping(pool, client)
        assert not waiting.done()
        await pool.release(held)
        async with asyncio.timeout(10):
            assert await waiting is True


async def test_a_waiter_cancelled_as_it_is_woken_passes_the_connection_on_to_the_next(redis_url: str) -> None:
    async with full_pool(redis_url, wait_s=30) as (pool, client, held):
        first = await waiting_ping(pool, client)
        second = await waiting_ping(pool, client)
        await pool.release(held)  # wakes the first waiter...
        first.cancel()  # ...whose caller hangs up before it takes the connection
        async with asyncio.timeout(10):  # well within the pool's 30 s: the second is woken in its place
            assert await second is True
        with pytest.raises(asyncio.CancelledError):
            await first


async def test_a_command_that_finds_no_connection_in_time_fails_as_a_connection_error(redis_url: str) -> None:
    async with full_pool(redis_url, wait_s=0.05) as (pool, client, held):
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await client.ping()
        await pool.release(held)
        assert await client.ping() is True  # the pool is whole again: the failed wait took nothing


async def test_a_write_redis_stops_taking_fails_as_a_timeout_and_the_next_command_gets_a_new_connection() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        process = start_redis(port, workdir, "--save", "", "--appendonly", "no")
        client = create_redis(f"redis://127.0.0.1:{port}/0", retries=0)
        try:
            assert await client.ping()
            process.send_signal(signal.SIGSTOP)  # Redis hangs: it reads nothing more, and the socket's buffers fill
            try:
                with pytest.raises(RedisTimeoutError, match="writing"):
                    async with asyncio.timeout(10):  # the client's own timeout (1 s) must come first
                        await client.set("large", b"x" * (64 << 20))
            finally:
                process.send_signal(signal.SIGCONT)
            assert await client.ping()  # on a new connection: the one cut mid-write is not reused
        finally:
            await client.aclose()
            process.terminate()
            process.wait(timeout=10)


async def test_arguments_are_sent_as_redis_py_sends_them_and_one_it_cannot_send_fails_as_a_data_error(
    redis_url: str,
) -> None:
    client = create_redis(redis_url)
    try:
        assert await client.set("text", "thé ☕ 1 2")
        await client.mset({"int": 7, "float": 0.1})
        assert await client.mget("text", "int", "float") == ["thé ☕ 1 2".encode(), b"7", b"0.1"]
        with pytest.raises(DataError):
            await client.set("flag", True)  # a bool is not sent as 0 or 1: redis-py asks for an explicit type
        latin = create_redis(f"{redis_url}?encoding=latin-1")  # an encoding of the URL's own is kept
        try:
            await latin.set("latin", "thé")
        finally:
            await latin.aclose()
        assert await client.get("latin") == "thé".encode("latin-1")
    finally:
        await client.aclose()
