"""Redis Sentinel: clients of the master that the sentinels name, which follow it when it fails over.

A pool asks the sentinels for the master's address whenever it opens a connection (redis-py's
`SentinelConnectionPool`), so a connection that breaks, or that meets a demoted master (READONLY, which
redis-py turns into a connection error), is opened again to the new master, within the command's usual retry.
That alone leaves a gap when the old master is still up after a failover (a planned `SENTINEL FAILOVER`, a
partition): it keeps accepting writes until Sentinel turns it into a replica about 10 s later, and those writes
are then lost. So while the gateway runs, `following_failovers` listens to every sentinel's `+switch-master`
and closes the connections to the old master at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from app.metrics import CountingConnectionPool

logger = logging.getLogger(__name__)
SWITCH_CHANNEL = "+switch-master"
Address = tuple[str, int]


@dataclass(frozen=True)
class SentinelTarget:
    """Where the master is found: the sentinels, the name they monitor it by, and their own password."""

    sentinels: tuple[Address, ...]
    service: str
    password: str | None = None


class SentinelConnection(SentinelManagedConnection):
    """redis-py's connection to the master the sentinels name, except that a connection dropped between two
    attempts of a command asks the sentinels again before the retry dials: redis-py's would dial the old
    address (redis/redis-py#3874), so a retry after READONLY would meet the demoted master again."""

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]
        await super().send_packed_command(command, check_health)


class SentinelSSLConnection(SentinelConnection, SentinelManagedSSLConnection):
    pass


class SentinelPool(SentinelConnectionPool, CountingConnectionPool):
    """The direct pool's behaviour (bounded, blocking, counting failures) for connections to the master the
    sentinels name. It owns its `Sentinel`, whose connections to the sentinels close with the pool."""

    sentinel_manager: Sentinel
    service_name: str
    master_address: Address | None

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()

    async def master_switched(self, master: Address, announcer: Address) -> None:
        """Follow a switch that the sentinel at `announcer` announced."""
        # Ask that sentinel first from now on: the others learn of the switch up to seconds later.
        # A new list, not a sort in place: redis-py may be iterating the old one in a look-up right now.
        self.sentinel_manager.sentinels = sorted(
            self.sentinel_manager.sentinels, key=lambda sentinel: sentinel_address(sentinel) != announcer
        )
        if self.master_address in (None, master):
            return  # nothing connected yet, or already moved (another sentinel announced it first)
        # In use or not: a command in flight on the old master fails as on a dropped connection, and is retried
        # on the new master if its client retries. Pub/sub connections reconnect and subscribe again. Every
        # connection is closed even if one fails to close cleanly, and such a one is gone as well.
        with contextlib.suppress(RedisError, OSError):
            await self.disconnect()


def sentinel_master(url: str, target: SentinelTarget, **pool_options: Any) -> Redis:
    """A client of the master `target` names, with the password, username, db and TLS of `url` (whose host and
    port are not used) and the given pool options (sizes, timeouts, retry)."""
    options: dict[str, Any] = dict(parse_url(url))
    tls = options.pop("connection_class", None) is SSLConnection
    options.pop("host", None)
    options.pop("port", None)
    sentinel_options: dict[str, Any] = {
        "password": target.password,
        "socket_timeout": pool_options.get("socket_timeout"),
        "socket_connect_timeout": pool_options.get("socket_connect_timeout"),
        # A stale connection to a sentinel is dialled again once; then the next sentinel is asked.
        "retry": Retry(NoBackoff(), 1),
        # At most one question per master connection being opened at the same time.
        "max_connections": pool_options.get("max_connections"),
        "ssl": tls,
        **{name: value for name, value in options.items() if name.startswith("ssl")},
        # Only as given: an explicit None would turn CLIENT SETINFO off.
        **({"driver_info": pool_options["driver_info"]} if "driver_info" in pool_options else {}),
    }
    manager = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    # As with a direct URL, options in its query string win.
    client: Redis = manager.master_for(
        target.service,
        connection_pool_class=SentinelPool,
        connection_class=SentinelSSLConnection if tls else SentinelConnection,
        **(pool_options | options),
    )
    return client


def sentinel_address(sentinel: Redis) -> Address:
    options = sentinel.connection_pool.connection_kwargs
    return str(options["host"]), int(options["port"])


@contextlib.asynccontextmanager
async def following_failovers(*clients: Redis | None) -> AsyncIterator[None]:
    """For the app's lifetime, move those of `clients` that talk to a Sentinel-named master to the new master as
    soon as a sentinel announces a switch. A no-op for clients of a fixed address, or without Redis."""
    pools = [client.connection_pool for client in clients if client is not None]
    followers = [pool for pool in pools if isinstance(pool, SentinelPool)]
    if not followers:
        yield
        return
    sentinels = list(followers[0].sentinel_manager.sentinels)
    subscribed = [asyncio.Event() for _ in sentinels]
    tasks = [
        asyncio.create_task(_listen(sentinel, followers, ready), name=f"sentinel {sentinel_address(sentinel)}")
        for sentinel, ready in zip(sentinels, subscribed, strict=True)
    ]
    try:
        # Like the other subscriptions: switches are heard from the start, without holding the start up for long.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await asyncio.gather(*(ready.wait() for ready in subscribed))
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _listen(sentinel: Redis, pools: Sequence[SentinelPool], subscribed: asyncio.Event) -> None:
    # A switch announced while this sentinel is unreachable goes unheard here: another sentinel announces it
    # too, and otherwise connections still move on their first error (READONLY once the old master is demoted).
    announcer = sentinel_address(sentinel)
    while True:
        try:
            async with sentinel.pubsub() as pubsub:
                await pubsub.subscribe(SWITCH_CHANNEL)
                subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await _switched(message["data"], announcer, pools)
        except (RedisError, OSError, ValueError):
            logger.warning("lost Redis Sentinel %s:%d; listening again in 1 s", *announcer)
            await asyncio.sleep(1.0)


async def _switched(data: bytes, announcer: Address, pools: Sequence[SentinelPool]) -> None:
    fields = data.decode().split()  # "<name> <old ip> <old port> <new ip> <new port>"
    if len(fields) != 5:
        return
    name, _, _, host, port = fields
    moving = [pool for pool in pools if pool.service_name == name]
    if not moving:
        return  # a master this gateway does not use, monitored by the same sentinels
    for pool in moving:
        await pool.master_switched((host, int(port)), announcer)
    logger.warning("Redis master %s is now %s:%s (Sentinel %s:%d); connections moved", name, host, port, *announcer)
