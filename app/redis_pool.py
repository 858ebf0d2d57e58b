"""The process's Redis connections: redis-py's pool, bounded, waiting for a connection when all are in use.

redis-py's own `ConnectionPool` raises at once when it is full, which would fail requests during a burst that a
moment's wait would serve. Its `BlockingConnectionPool` waits instead, but makes every command pay for that: it
enters an `asyncio.Condition` and arms a timer to take a connection, and enters the condition again to give it
back, even with connections to spare: about 15 µs of CPU per command here (a GET 125 against 110 µs, 30 rounds
alternating in one process), over every Redis round trip a task costs the gateway. This pool takes a free
connection the way redis-py's plain pool does; only a command that finds none waits, and only then are a
condition and a timer involved.

Its connections also send each command more cheaply than redis-py's asyncio ones (`LeanCommands`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection, Connection
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT
from redis.utils import HIREDIS_AVAILABLE

# redis-py's own hiredis packer (its synchronous client's), where hiredis is installed: it is a dependency here.
_HIREDIS = HiredisRespSerializer() if HIREDIS_AVAILABLE else None


class LeanCommands(AbstractConnection):
    """Mixed into redis-py's asyncio connection classes, two changes to how a command is sent.

    Its arguments are packed by hiredis, as redis-py's own synchronous client does when hiredis is installed
    (redis/redis-py#4176: the asyncio client does not yet): 6 against 16 µs for a limiter script's EVALSHA.

    Its write is bounded by `asyncio.timeout`, and only when it can wait at all, where redis-py's own puts every
    write under `asyncio.wait_for`. On Python 3.11 wait_for runs the write in a task of its own, so each command
    costs a task's creation and scheduling, and leaves only on the event loop's next turn, behind whatever else is
    ready then: a GET cost 92 µs of CPU against 75 without it (one process, 8 rounds alternating). A write the
    socket takes at once, as a command's almost always is, has nothing to wait for; one it does not take waits for
    the socket under the timeout. The outcomes are redis-py's: a write that times out or fails drops the
    connection and raises its TimeoutError or ConnectionError."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        # hiredis writes text as strict UTF-8, redis-py's default: a pool told otherwise (`encoding=` in its URL)
        # keeps redis-py's own packer.
        if _HIREDIS is None or (self.encoder.encoding, self.encoder.encoding_errors) != ("utf-8", "strict"):
            return super().pack_command(*args)
        packed: list[bytes] = _HIREDIS.pack(*args)  # type: ignore[arg-type]  # redis-py types each argument as a list
        return packed

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        if not self.socket_timeout:  # no timeout to take: redis-py writes directly then
            await super().send_packed_command(command, check_health)
            return
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        if isinstance(command, str):
            command = command.encode()
        chunks = [command] if isinstance(command, bytes) else command
        writer = self._writer
        if writer is None:  # connected just above: only a disconnect racing this command leaves none
            raise RedisConnectionError("Connection closed before the command was written")
        try:
            writer.writelines(chunks)
            if writer.transport.get_write_buffer_size():  # the socket did not take it all: the drain may wait
                async with asyncio.timeout(self.socket_timeout):
                    await writer.drain()
            else:
                await writer.drain()  # returns at once (or raises, the connection lost): nothing left to wait for
        except TimeoutError:  # before OSError, which it is a kind of
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            # Cancelled mid-write, say: what was sent of the command is unknown, so the connection cannot be reused.
            await self.disconnect(nowait=True)
            raise


_LEAN: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def lean_commands(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """`connection_class` with `LeanCommands` mixed in (the class a pool's URL or options chose: plain, TLS, Unix
    socket or Sentinel-managed), made once per class."""
    if issubclass(connection_class, LeanCommands):
        return connection_class
    if connection_class not in _LEAN:
        name = f"Lean{connection_class.__name__}"
        # After the class, just before redis-py's AbstractConnection: a subclass's own send (the Sentinel-managed
        # connection's, which first asks the sentinels where to connect) still runs first, then comes here.
        _LEAN[connection_class] = type(name, (connection_class, LeanCommands), {})
    return _LEAN[connection_class]


class BoundedConnectionPool(ConnectionPool):
    """At most `max_connections` connections; a command that finds all in use waits up to `timeout` seconds
    (None: for ever) for one to come back, then fails with redis-py's ConnectionError, as `BlockingConnectionPool`
    does."""

    def __init__(self, *, timeout: float | None = 20.0, **kwargs: Any) -> None:
        kwargs["connection_class"] = lean_commands(kwargs.get("connection_class", Connection))
        super().__init__(**kwargs)
        self.timeout = timeout
        self._returned = asyncio.Condition()
        self._waiting = 0

    async def get_connection(self, *args: Any, **options: Any) -> AbstractConnection:
        deadline: float | None = None  # set at the first wait; None with a timeout of None: wait for ever
        while True:
            if not self.can_get_connection():
                if deadline is None and self.timeout is not None:
                    deadline = asyncio.get_running_loop().time() + self.timeout
                await self._wait_for_a_connection(deadline)
            try:
                # Passed on as given: redis-py deprecates the arguments, and leaves this method untyped.
                connection: AbstractConnection = await super().get_connection(*args, **options)  # type: ignore[no-untyped-call]
            except MaxConnectionsError:
                continue  # another command took the one that came back while this one was being woken
            return connection

    async def release(self, connection: AbstractConnection) -> None:
        await super().release(connection)
        if self._waiting:  # the condition only when somebody waits on it: the common case is nobody
            async with self._returned:
                self._returned.notify()

    async def _wait_for_a_connection(self, deadline: float | None) -> None:
        self._waiting += 1
        try:
            async with self._returned:
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._returned.wait_for(self.can_get_connection)
                except BaseException:
                    # Woken for a connection given back, then cancelled (its caller hung up) or timed out before
                    # taking it: Python 3.11's condition does not pass the wake-up on, so the next waiter would
                    # sit out its whole timeout beside an idle connection.
                    if self.can_get_connection():
                        self._returned.notify()
                    raise
        except TimeoutError as exc:
            raise RedisConnectionError("No connection available.") from exc
        finally:
            self._waiting -= 1
