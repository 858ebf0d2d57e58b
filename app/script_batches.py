"""Lua script calls made together, sent to Redis together: one pipeline, one round trip, for all of them.

A list call answers the status reads of dozens of tasks at once, and each task then records its new state and,
if it ended, releases its slots: a few scripts each, all falling due in the same turn of the event loop. Sent one
by one, each is a round trip of its own, with its own trip through redis-py and its own wake-up of the worker when
its answer comes, queued on the event loop ahead of the next step of every request. Here the calls made in one
turn of the loop go out in the next as one pipeline of `EVALSHA`s, and their answers come back together.

For calls that can wait a turn of the loop: the follower's records and releases, and a submission's admission and
account slot, made at once so that both go in one round trip (app/images.py). A request's other round trips go
straight to Redis: batched, a call that comes alone saves nothing and waits a turn. The pipeline sends `EVALSHA`
directly: redis-py's own pipeline support for scripts asks `SCRIPT EXISTS` first, a round trip of its own. Calls
of scripts Redis does not know (a new or restarted server, a failover) are sent again once each script is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
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
            # Redis before it. anyio cancels again at every turn of the loop, so each of those is sat out too; every
            # call is answered (`_send_pending`), within the client's socket timeouts.
            while not call.answer.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([call.answer])
            raise

    async def _send_pending(self) -> None:
        batch, self._pending = self._pending, []
        try:
            await self._answer(batch)
        except BaseException as exc:
            # Every call not yet answered failed with the round trip. A batch cancelled (shutdown) is a Redis failure
            # to its callers: a cancellation handed to one would be taken for its own, and stop it.
            failure = exc if isinstance(exc, Exception) else RedisConnectionError("the batch was abandoned (shutdown)")
            for call in batch:
                _fail(call, failure)
            if not isinstance(exc, Exception):
                raise

    async def _answer(self, batch: list[_Call]) -> None:
        if len(batch) == 1:  # alone, the plain call costs less than a pipeline, and loads its script itself
            call = batch[0]
            _settle(call, await call.script(keys=call.keys, args=call.args))
            return
        replies = await self._pipelined(batch)
        unknown = [call for call, reply in zip(batch, replies, strict=True) if isinstance(reply, NoScriptError)]
        for call, reply in zip(batch, replies, strict=True):
            if not isinstance(reply, NoScriptError):  # answered first: these ran, whatever becomes of the others
                _settle(call, reply)
        if unknown:
            # Redis lost its scripts (a restart, a failover): each is loaded once, then those calls go again together.
            # A caller has one call in a batch at most, so running these after the others reorders no caller's own.
            for script in {id(call.script): call.script for call in unknown}.values():
                script.sha = await self._redis.script_load(script.script)
            for call, reply in zip(unknown, await self._pipelined(unknown), strict=True):
                _settle(call, reply)

    async def _pipelined(self, batch: list[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in batch:
                pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies


def _settle(call: _Call, reply: Any) -> None:
    if isinstance(reply, Exception):
        _fail(call, reply)
    elif not call.answer.done():
        call.answer.set_result(reply)


def _fail(call: _Call, failure: Exception) -> None:
    if call.answer.done():
        return
    call.answer.set_exception(failure)
    # Its caller may have given up already: mark the failure seen, so asyncio does not log it as never retrieved.
    call.answer.add_done_callback(_seen)


def _seen(answer: asyncio.Future[Any]) -> None:
    if not answer.cancelled():
        answer.exception()
