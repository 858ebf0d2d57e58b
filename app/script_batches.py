"""Lua script calls made together, sent to Redis together: one pipeline, one round trip, for all of them.

A list call answers the status reads of dozens of tasks at once, and each task then records its new state and,
if it ended, releases its slots: a few scripts each, all falling due in the same turn of the event loop. Sent one
by one, each is a round trip of its own, with its own trip through redis-py and its own wake-up of the worker when
its answer comes, queued on the event loop ahead of the next step of every request. Here the calls made in one
turn of the loop go out in the next as one pipeline of `EVALSHA`s, and their answers come back together.

Only for work that can wait a turn of the loop: a request's own round trips go straight to Redis (the calls
batched here save nothing when they come alone). The pipeline sends `EVALSHA` directly: redis-py's own pipeline
support for scripts asks `SCRIPT EXISTS` first, a round trip of its own. A script Redis does not know (a new or
restarted server, a failover) is run on its own through redis-py's `Script`, which loads it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, KeyT


@dataclass(frozen=True)
class _Call:
    script: AsyncScript
    keys: Sequence[KeyT]
    args: Sequence[EncodableT]
    answer: asyncio.Future[Any]


class ScriptBatcher:
    """Runs script calls on `redis`, those made in the same turn of the event loop in one round trip."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pending: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def run(self, script: AsyncScript, keys: Sequence[KeyT], args: Sequence[EncodableT]) -> Any:
        """What `script(keys=keys, args=args)` returns, or raises what it raises, one turn of the loop later."""
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, loop.create_future())
        self._pending.append(call)
        if len(self._pending) == 1:
            # The task's first step runs in the loop's next turn, when every call of this one has joined.
            # A fresh context: the round trip is no single caller's, and must not be booked to the first one.
            sending = loop.create_task(self._send_pending(), context=contextvars.Context())
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)
        try:
            return await asyncio.shield(call.answer)
        except asyncio.CancelledError:
            # The call goes out all the same (the others' batch may be on its way). The caller is let go once Redis
            # has run it: whatever the caller sends next (a slot's release, on another connection) must not reach
            # Redis before it.
            await asyncio.wait([call.answer])
            raise

    async def _send_pending(self) -> None:
        batch, self._pending = self._pending, []
        try:
            if len(batch) == 1:
                await _run_alone(batch[0])
                return
            replies = await self._pipelined(batch)
        except BaseException as exc:
            for call in batch:
                _fail(call, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                await _run_alone(call)  # loads the script, then runs it: once per script and server
            elif isinstance(reply, Exception):
                _fail(call, reply)
            elif not call.answer.done():
                call.answer.set_result(reply)

    async def _pipelined(self, batch: list[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in batch:
                pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies


async def _run_alone(call: _Call) -> None:
    try:
        reply = await call.script(keys=call.keys, args=call.args)
    except BaseException as exc:
        _fail(call, exc)
        if not isinstance(exc, Exception):
            raise
    else:
        if not call.answer.done():
            call.answer.set_result(reply)


def _fail(call: _Call, exc: BaseException) -> None:
    if call.answer.done():
        return
    # A batch cancelled (shutdown) is a Redis failure to its callers: a cancellation handed to one would be taken
    # for its own, and stop it.
    failure = exc if isinstance(exc, Exception) else RedisConnectionError("the batch was abandoned (shutdown)")
    call.answer.set_exception(failure)
    # Its caller may have given up already: mark the failure seen, so asyncio does not log it as never retrieved.
    call.answer.add_done_callback(_seen)


def _seen(answer: asyncio.Future[Any]) -> None:
    if not answer.cancelled():
        answer.exception()
